"""Benchmark: memory and time of ``fmri_encoding`` at NSD's full-fsaverage size (issue 33).

A synthetic study at NSD's real shape — 10,000 images (1,000 of them test images) ×
163,842 fsaverage vertices, float32 — and synthetic features (768 per layer, 12 layers)
are encoded by :func:`gradbrain.analysis.encoding.fmri_encoding` as chapter 02 calls it
(activations only; a gradient signal costs the same again). Each run is its own process,
which builds its data, then encodes, and reports:

* its **peak resident memory** (``ru_maxrss``: everything, the data included),
* the response matrix's own size and the features', so the encoding's share is peak −
  (process before the encoding),
* wall time, and time per layer.

The responses are stored averaged over repeats (one "repeat" per image): NSD's three
repeats held in memory are 19.7 GiB of betas at this size, more than the 8 GiB goal by
themselves; the encoding reads them per chunk of vertices either way.

Side by side at a reduced size (``--compare-vertices``, default 20,000), the same study
is encoded in chunks and in one piece (``vertices_chunk`` = every vertex, the previous
behaviour: averaged responses, train and test rows and the kernel's copies all at full
size), for the memory each adds and the time chunking costs (the layers' fold
factorisations are repeated per chunk).

Layers are fitted one after another, so peak memory does not grow with their number;
on a 2-core CPU a full run of 12 layers takes hours, so ``--layers 1`` measures peak
memory at the full shape and the time per layer (the printout scales it to 12 layers and
says so). The last line is machine-readable::

    RESULT peak_rss_gib=<full shape, chunked> response_gib=<averaged responses>
           encoding_added_gib=<peak - before> seconds_per_layer=<s> layers_run=<L>
           compare_chunked_added_mib=<m> compare_whole_added_mib=<m>
           compare_memory_ratio=<whole/chunked> chunk_time_ratio=<chunked s / whole s>
           device=<cpu|cuda>

Usage: ``python benchmarks/bench_encoding_memory.py [--images 10000] [--vertices 163842]
[--layers 12] [--features 768] [--compare-vertices 20000] [--device cpu] [--skip-full]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GIB = 2**30


def _build(n_images: int, n_vertices: int, n_layers: int, n_features: int, n_test: int):
    """A synthetic study and features, built in place (no full-size temporaries).

    Responses: a planted linear map of the first layer's leading 16 features plus unit
    noise, float32 (n_images, 1, n_vertices), filled chunk by chunk.
    """
    import numpy as np

    from gradbrain.data import Study
    from gradbrain.features import Features

    rng = np.random.default_rng(0)
    ids = [f"img{i:05d}" for i in range(n_images)]
    activations = {f"layer{k:02d}": rng.standard_normal((n_images, n_features),
                                                        dtype=np.float32)
                   for k in range(n_layers)}
    first = activations["layer00"][:, :16]
    betas = np.empty((n_images, 1, n_vertices), np.float32)
    step = 8192
    for start in range(0, n_vertices, step):
        stop = min(start + step, n_vertices)
        block = rng.standard_normal((n_images, stop - start), dtype=np.float32)
        block += first @ (0.3 * rng.standard_normal((16, stop - start), dtype=np.float32))
        betas[:, 0, start:stop] = block
    split = np.array(["test"] * n_test + ["train"] * (n_images - n_test))
    study = Study(name="synthetic NSD-size", image_ids=ids, split=split, betas=betas,
                  vertices=np.arange(n_vertices), hemi=np.array(["left"] * n_vertices),
                  hierarchy=np.zeros(n_vertices), ncsnr=rng.uniform(0.2, 1.0, n_vertices),
                  mesh="fsaverage")
    layers = list(activations)
    feats = Features(model="synthetic", weights="random", layers=layers,
                     depth=np.linspace(0, 1, n_layers), activations=activations,
                     gradients={}, backward_order={}, image_ids=ids, labels=[""] * n_images,
                     pool="mean")
    return study, feats


def _child(args) -> dict:
    """Build the data, encode it once, report peak RSS and time."""
    import numpy as np

    import gradbrain  # noqa: F401  (before torch-heavy imports, as the notebooks do)
    from gradbrain.analysis.encoding import fmri_encoding

    import psutil

    study, feats = _build(args.images, args.vertices, args.layers, args.features, args.test)
    before = psutil.Process().memory_info().rss
    chunk = args.vertices if args.whole else None
    start = time.perf_counter()
    out = fmri_encoding(study, feats, device=args.device, vertices_chunk=chunk,
                        progress=args.progress)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # KiB on Linux
    r = out["activation"]["r"]
    return {"seconds": seconds, "peak": peak, "before": before,
            "response": study.betas.nbytes,
            "features": sum(a.nbytes for a in feats.activations.values()),
            "median_r_layer0": float(np.nanmedian(r[0])),
            "median_r_others": float(np.nanmedian(r[1:])) if len(r) > 1 else float("nan")}


def _run(args, **override) -> dict:
    """One configuration in a fresh process (its own peak memory)."""
    argv = [sys.executable, __file__, "--child"]
    settings = {**vars(args), **override}
    for key in ("images", "vertices", "layers", "features", "test", "device"):
        argv += [f"--{key}", str(settings[key])]
    if settings["whole"]:
        argv.append("--whole")
    if settings["progress"]:
        argv.append("--progress")
    done = subprocess.run(argv, check=True, stdout=subprocess.PIPE, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--test", type=int, default=1_000, help="test images among them")
    parser.add_argument("--vertices", type=int, default=163_842)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--features", type=int, default=768)
    parser.add_argument("--compare-vertices", type=int, default=20_000)
    parser.add_argument("--compare-layers", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-full", action="store_true",
                        help="only the side-by-side comparison at the reduced size")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--whole", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args)))
        return

    small = {"vertices": args.compare_vertices, "layers": args.compare_layers,
             "progress": False}
    chunked = _run(args, whole=False, **small)
    whole = _run(args, whole=True, **small)
    for name, res in (("chunked", chunked), ("whole", whole)):
        print(f"{args.images} images x {args.compare_vertices} vertices, "
              f"{args.compare_layers} layer(s), {name:>7}: {res['seconds']:7.1f} s, peak RSS "
              f"{res['peak'] / GIB:5.2f} GiB, added by the encoding "
              f"{(res['peak'] - res['before']) / 2**20:7.0f} MiB "
              f"(responses {res['response'] / 2**20:.0f} MiB)")
    ratio = (whole["peak"] - whole["before"]) / max(chunked["peak"] - chunked["before"], 1)
    time_ratio = chunked["seconds"] / whole["seconds"]
    result = {"compare_chunked_added_mib": (chunked["peak"] - chunked["before"]) / 2**20,
              "compare_whole_added_mib": (whole["peak"] - whole["before"]) / 2**20,
              "compare_memory_ratio": ratio, "chunk_time_ratio": time_ratio}
    if not args.skip_full:
        full = _run(args, whole=False)
        per_layer = full["seconds"] / args.layers
        print(f"{args.images} images x {args.vertices} vertices x {args.features} features, "
              f"{args.layers} layer(s), chunked: {full['seconds']:.0f} s "
              f"({per_layer:.0f} s per layer"
              + ("" if args.layers == 12 else f"; 12 layers: ~{12 * per_layer / 60:.0f} min "
                 "scaled, not run") + ")")
        print(f"  peak RSS {full['peak'] / GIB:.2f} GiB: responses "
              f"{full['response'] / GIB:.2f} GiB, features {full['features'] / GIB:.2f} GiB, "
              f"process before encoding {full['before'] / GIB:.2f} GiB, added by the encoding "
              f"{(full['peak'] - full['before']) / GIB:.2f} GiB")
        print(f"  planted signal recovered: median r layer00 {full['median_r_layer0']:.3f}, "
              f"other layers {full['median_r_others']:.3f}")
        result = {"peak_rss_gib": full["peak"] / GIB, "response_gib": full["response"] / GIB,
                  "encoding_added_gib": (full["peak"] - full["before"]) / GIB,
                  "seconds_per_layer": per_layer, "layers_run": args.layers, **result}
    result["device"] = args.device
    print("RESULT " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in result.items()))


if __name__ == "__main__":
    main()
