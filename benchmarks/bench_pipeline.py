"""Benchmark: one subject's chain, stage by stage — extraction → encoding → hierarchy tests
(issue 33).

At a stated size (default: the demo's — 200 embedded images, EfficientNet-Lite0 with its
ImageNet weights, the ``ce`` loss, a simulated subject with fMRI on fsaverage5 and MEG at
100 Hz, chapter 04's ``n_perm=10000`` and ``n_boot=200``), each stage runs once, in this
order, with nothing cached:

``extract``  model load + :func:`gradbrain.features.extract` (activations and gradients)
``study``    :func:`gradbrain.data.simulated.make_study` from those features (the
             subject's responses; a real subject is read from disk instead)
``encode``   :func:`~gradbrain.analysis.encoding.fmri_encoding` (with test predictions,
             as the tests need) and :func:`~gradbrain.analysis.encoding.meg_encoding`
``tests``    :func:`gradbrain.analysis.backprop.backprop_tests` on those encodings

Reported per stage: wall time and the peak resident memory of the process during the
stage (sampled every 5 ms; ``peak_mib``), and on a GPU the peak allocated GPU memory.
The last line is machine-readable::

    RESULT extract_s=… extract_peak_mib=… study_s=… study_peak_mib=… encode_s=…
           encode_peak_mib=… tests_s=… tests_peak_mib=… total_s=… n_images=… n_vertices=…
           device=… [extract_gpu_mib=… …]

Usage: ``python benchmarks/bench_pipeline.py [--n-images 200] [--n-perm 10000]
[--n-boot 200] [--no-meg] [--model efficientnet_lite0.imagenet] [--device cpu]``
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from contextlib import contextmanager

from _memory import PeakRSS

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@contextmanager
def _stage(name: str, results: dict, device):
    """Time a stage and sample the process's resident memory while it runs."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with PeakRSS() as memory:
        start = time.perf_counter()
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    results[f"{name}_s"] = seconds
    results[f"{name}_peak_mib"] = memory.peak / 2**20
    line = f"{name:>8}: {seconds:8.1f} s, peak resident {memory.peak / 2**20:7.0f} MiB"
    if device.type == "cuda":
        gpu = torch.cuda.max_memory_allocated(device) / 2**20
        results[f"{name}_gpu_mib"] = gpu
        line += f", peak GPU {gpu:7.0f} MiB"
    print(line, flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-images", type=int, default=200)
    parser.add_argument("--model", default="efficientnet_lite0.imagenet")
    parser.add_argument("--loss", default="ce")
    parser.add_argument("--n-perm", type=int, default=10_000)
    parser.add_argument("--n-boot", type=int, default=200)
    parser.add_argument("--cv", type=int, default=5)
    parser.add_argument("--no-meg", action="store_true", help="fMRI only")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    import gradbrain  # noqa: F401  (before timm, as the notebooks do)
    from gradbrain import models
    from gradbrain._utils import resolve_device
    from gradbrain.analysis.backprop import backprop_tests
    from gradbrain.analysis.encoding import fmri_encoding, meg_encoding
    from gradbrain.data import load_embedded
    from gradbrain.data.simulated import make_study
    from gradbrain.features import extract

    warnings.simplefilter("ignore")
    device = resolve_device(args.device)
    images = load_embedded(args.n_images)
    weights = "pretrained" if args.model.endswith(".imagenet") else None
    results: dict = {}
    start = time.perf_counter()
    with _stage("extract", results, device):
        net = models.load(args.model, weights=weights)
        feats = extract(net, images, losses=(args.loss,), device=device, cache=False)
    with _stage("study", results, device):
        study = make_study(0, model=args.model, weights=weights, n_images=args.n_images,
                           gradient_truth="paper", gradient_loss=args.loss, features=feats,
                           images=images, meg=not args.no_meg, cache=False)
    with _stage("encode", results, device):
        fmri = fmri_encoding(study, feats, cv=args.cv, device=device, return_prediction=True)
        meg = (None if args.no_meg else
               meg_encoding(study, feats, cv=args.cv, n_boot=args.n_boot, device=device))
    with _stage("tests", results, device):
        result = backprop_tests(study, feats, loss=args.loss, n_perm=args.n_perm,
                                n_boot=args.n_boot, cv=args.cv, device=device, fmri=fmri,
                                meg=meg)
    results["total_s"] = time.perf_counter() - start
    verdict = result.table()
    print(f"   total: {results['total_s']:8.1f} s ({args.n_images} images, "
          f"{study.n_vertices} vertices, {'fMRI' if args.no_meg else 'fMRI + MEG'}, "
          f"{args.model}, device {device}); gradient rows of the verdict table: "
          f"{int((verdict.feature == 'gradient').sum())}")
    results.update(n_images=args.n_images, n_vertices=study.n_vertices, device=device.type)
    print("RESULT " + " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in results.items()))


if __name__ == "__main__":
    main()
