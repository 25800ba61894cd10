"""Benchmark: streamed preprocessing in ``features.extract`` vs preprocessing the whole set
first (issue 33).

Each variant runs in its own process, on the same embedded images and model, losses
``ce`` (one backward pass per batch):

* ``whole``   the previous extractor: ``model.preprocess(images)`` makes the whole
              (n, 3, H, W) tensor (one Python loop), then ``extract`` runs on it
* ``stream``  ``extract(images)``: batch by batch, in ``--workers`` DataLoader processes
              (0: in this process)
* ``floor``   the model alone: ``extract`` on a tensor preprocessed beforehand and not
              timed — what the forward and backward passes cost on this device

Reported per variant: images/s and the resident memory the extraction added on top of
what the process held before it (sampled every 5 ms). The last line is machine-readable::

    RESULT stream_speedup=<whole s / stream s> floor_share=<floor s / stream s>
           memory_ratio=<whole extra MiB / stream extra MiB> n_images=… workers=… device=…

Usage: ``python benchmarks/bench_extract_stream.py [--n-images 160] [--workers 0]
[--batch-size 16] [--model efficientnet_lite0.imagenet] [--device cpu]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from _memory import PeakRSS

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _one(args) -> dict:
    """Run one variant here and return its seconds and added memory."""
    import warnings

    import gradbrain  # noqa: F401  (torchvision work-around before timm)
    from gradbrain import features as gf
    from gradbrain import models
    from gradbrain.data import load_embedded

    warnings.simplefilter("ignore")
    net = models.load(args.model, weights="pretrained" if args.model.endswith(".imagenet")
                      else None)
    images = load_embedded(args.n_images)
    x = net.preprocess(images) if args.variant == "floor" else None
    gf.extract(net, images[:2], losses=("ce",), device=args.device)   # warm up
    with PeakRSS() as memory:
        start = time.perf_counter()
        if args.variant == "whole":
            gf.extract(net, net.preprocess(images), losses=("ce",), batch_size=args.batch_size,
                       device=args.device)
        elif args.variant == "stream":
            gf.extract(net, images, losses=("ce",), batch_size=args.batch_size,
                       device=args.device, num_workers=args.workers)
        else:
            gf.extract(net, x, losses=("ce",), batch_size=args.batch_size, device=args.device)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "extra_mib": max(memory.peak - memory.before, 0) / 2**20}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-images", type=int, default=160)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--model", default="efficientnet_lite0.imagenet")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variant", choices=("whole", "stream", "floor"), default=None,
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.variant:
        print(json.dumps(_one(args)))
        return
    results = {}
    for variant in ("whole", "stream", "floor"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--variant", variant],
                             capture_output=True, text=True, check=True)
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[variant]
        print(f"{variant:>6}: {args.n_images / r['seconds']:6.1f} images/s "
              f"({r['seconds']:.1f} s), +{r['extra_mib']:.0f} MiB resident")
    whole, stream, floor = results["whole"], results["stream"], results["floor"]
    print(f"RESULT stream_speedup={whole['seconds'] / stream['seconds']:.3f} "
          f"floor_share={floor['seconds'] / stream['seconds']:.3f} "
          f"memory_ratio={whole['extra_mib'] / max(stream['extra_mib'], 1e-9):.3f} "
          f"n_images={args.n_images} workers={args.workers} device={args.device}")


if __name__ == "__main__":
    main()
