"""Benchmark: does bfloat16 extraction change the book's numbers and verdicts?

For each model, the same images are extracted twice on one device, in float32 and in
bfloat16 autocast (repeats interleaved, median time kept). Reported per model:

* ``speedup``      float32 time / bfloat16 time (activations + ``ce``/``dino``/``proj``
                   gradients, one backward pass each)
* ``grad_rel``     largest relative difference of a layer's gradient (Frobenius norm of
                   the difference over that of the float32 gradient), over layers and losses
* ``act_rel``      the same for activations
* ``fmri_r``       Pearson r, over vertices, between the two fMRI encoding maps of the
                   gradient signal (peak score over layers) on a simulated study
* ``best_agree``   share of reliable vertices whose best gradient layer is the same
* ``verdicts``     for each planted truth (``paper``, ``backprop``): whether the
                   hierarchy verdict (consistent with backprop; the paper's finding) and
                   every test part's ``holds`` are the same with either precision

The study is simulated from the float32 features (so float32 is the truth the tests
should see) with the efficientnet/ce generator; both feature sets are then tested
against it. The last line is machine-readable::

    RESULT bf16_speedup=<efficientnet> max_grad_rel=<max over models>
           fmri_r_min=<min> best_layer_agreement=<min> verdicts_equal=<0|1>

Usage: ``python benchmarks/bench_precision.py [--device cuda] [--n-images 160]``
(on the CPU, bfloat16 autocast is emulated and slow: the speed-up is a GPU number).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import gradbrain  # noqa: E402,F401  (torchvision work-around before timm)
from gradbrain import features as gf  # noqa: E402
from gradbrain import models  # noqa: E402
from gradbrain.analysis import backprop  # noqa: E402
from gradbrain.data import load_embedded  # noqa: E402
from gradbrain.data.simulated import make_study  # noqa: E402

LOSSES = ("ce", "dino", "proj")


def _extract(model, images, dtype, device, batch_size):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    feats = gf.extract(model, images, losses=LOSSES, dtype=dtype, device=device,
                       batch_size=batch_size, cache=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return feats, time.perf_counter() - start


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))


def compare_model(name, weights, images, device, repeats, batch_size):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = models.load(name, weights=weights)
    times = {torch.float32: [], torch.bfloat16: []}
    out = {}
    _extract(model, images[:batch_size], torch.float32, device, batch_size)  # warm-up
    _extract(model, images[:batch_size], torch.bfloat16, device, batch_size)
    for _ in range(repeats):
        for dtype in (torch.float32, torch.bfloat16):
            out[dtype], seconds = _extract(model, images, dtype, device, batch_size)
            times[dtype].append(seconds)
    f32, b16 = out[torch.float32], out[torch.bfloat16]
    act_rel = max(_rel(f32.activations[l], b16.activations[l]) for l in f32.layers)
    grad_rel = max(_rel(f32.gradients[k][l], b16.gradients[k][l])
                   for k in LOSSES for l in f32.layers)
    return {
        "model": name, "weights": weights or "random init",
        "f32_s": statistics.median(times[torch.float32]),
        "bf16_s": statistics.median(times[torch.bfloat16]),
        "act_rel": act_rel, "grad_rel": grad_rel, "f32": f32, "bf16": b16,
    }


def compare_verdicts(f32, b16, n_images, truth, seed, device, n_perm, n_boot):
    study = make_study(seed, n_images=n_images, gradient_truth=truth, features=f32,
                       cache=False)
    kw = dict(loss="ce", n_perm=n_perm, n_boot=n_boot, seed=seed, device=device)
    r32 = backprop.backprop_tests(study, f32, **kw)
    r16 = backprop.backprop_tests(study, b16, **kw)
    signal = r32.signal
    peak = {tag: r.best[signal]["peak"] for tag, r in (("f32", r32), ("bf16", r16))}
    finite = np.isfinite(peak["f32"]) & np.isfinite(peak["bf16"])
    fmri_r = float(np.corrcoef(peak["f32"][finite], peak["bf16"][finite])[0, 1])
    reliable = r32.reliable if r32.reliable is not None else finite
    agree = float(np.mean(r32.best[signal]["index"][reliable]
                          == r16.best[signal]["index"][reliable]))
    same_parts = bool((r32.tests["holds"].to_numpy() == r16.tests["holds"].to_numpy()).all())
    same = (r32.consistent_with_backprop == r16.consistent_with_backprop
            and r32.paper_finding == r16.paper_finding and same_parts)
    return {"truth": truth, "fmri_r": fmri_r, "best_agree": agree,
            "consistent": (r32.consistent_with_backprop, r16.consistent_with_backprop),
            "paper": (r32.paper_finding, r16.paper_finding),
            "parts_equal": same_parts, "equal": same}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n-images", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--n-perm", type=int, default=1000)
    parser.add_argument("--n-boot", type=int, default=200)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    images = load_embedded(args.n_images)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"{args.n_images} images, losses {LOSSES}, {args.repeats} interleaved repeats")

    rows = [compare_model(*spec, images, device, args.repeats, args.batch_size)
            for spec in (("efficientnet_lite0.imagenet", "pretrained"),
                         ("dinov3_vits16", None))]
    for r in rows:
        print(f"{r['model']:30s} {r['weights']:12s} float32 {r['f32_s']:7.2f} s  "
              f"bf16 {r['bf16_s']:7.2f} s  speed-up {r['f32_s'] / r['bf16_s']:5.2f}  "
              f"act rel diff {r['act_rel']:.2e}  grad rel diff {r['grad_rel']:.2e}")

    trained = rows[0]
    verdicts = [compare_verdicts(trained["f32"], trained["bf16"], args.n_images, truth,
                                 seed, device, args.n_perm, args.n_boot)
                for truth in ("paper", "backprop") for seed in (0, 1)]
    for v in verdicts:
        print(f"truth {v['truth']:9s} fMRI peak-score r {v['fmri_r']:.4f}  best-layer "
              f"agreement {v['best_agree']:.3f}  consistent f32/bf16 {v['consistent']}  "
              f"paper finding f32/bf16 {v['paper']}  all parts equal {v['parts_equal']}")
    print(
        f"RESULT bf16_speedup={trained['f32_s'] / trained['bf16_s']:.3f} "
        f"max_grad_rel={max(r['grad_rel'] for r in rows):.3e} "
        f"fmri_r_min={min(v['fmri_r'] for v in verdicts):.4f} "
        f"best_layer_agreement={min(v['best_agree'] for v in verdicts):.3f} "
        f"verdicts_equal={int(all(v['equal'] for v in verdicts))}"
    )


if __name__ == "__main__":
    main()
