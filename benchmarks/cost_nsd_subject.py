"""What one NSD subject costs to compute: feature extraction and fMRI encoding at NSD's
sizes, on random data of the real shapes (random-init weights cost what pretrained ones
do). The numbers feed the book's "Getting the data" page.

    python benchmarks/cost_nsd_subject.py --device cuda

Not a comparison, so no ratio: it prints the time per image (DINOv3 ViT-B/16, dino and
ce gradients) and per encoded signal (12 layers × ``--vertices`` vertices, 9,000
training and 1,000 test images), then one ``RESULT`` line.
"""

import argparse
import time
import warnings

import numpy as np
import torch

import gradbrain  # noqa: F401
from gradbrain import features as gf
from gradbrain import models
from gradbrain.data import load_embedded
from gradbrain.ridge import layerwise_scores


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="dinov3_vitb16")
    parser.add_argument("--n-images", type=int, default=252, help="images timed (≤ 252)")
    parser.add_argument("--vertices", type=int, default=15_000)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    images = load_embedded(args.n_images)
    net = models.load(args.model, weights=None)
    kw = dict(losses=("dino", "ce"), device=args.device, cache=False, batch_size=args.batch_size)
    gf.extract(net, images[:args.batch_size], **kw)  # warm-up (and the DINO centre)
    _sync(args.device)
    start = time.perf_counter()
    feats = gf.extract(net, images, **kw)
    _sync(args.device)
    per_image = (time.perf_counter() - start) / len(images)
    print(f"extract {args.model} (dino + ce): {per_image * 1e3:.1f} ms/image -> 10,000 images "
          f"{per_image * 1e4 / 60:.1f} min ({len(feats.layers)} layers)")

    rng = np.random.default_rng(0)
    n_train, n_test, p = 9000, 1000, 768
    layers = {f"l{i}": rng.standard_normal((n_train + n_test, p), dtype=np.float32)
              for i in range(12)}
    Y = rng.standard_normal((n_train + n_test, args.vertices), dtype=np.float32)
    train, test = np.arange(n_train), np.arange(n_train, n_train + n_test)
    layerwise_scores({"l0": layers["l0"]}, Y[train], Y[test], train, test, device=args.device)
    _sync(args.device)
    start = time.perf_counter()
    layerwise_scores(layers, Y[train], Y[test], train, test, device=args.device)
    _sync(args.device)
    per_signal = time.perf_counter() - start
    print(f"encoding 12 layers x {args.vertices} vertices ({n_train} train / {n_test} test): "
          f"{per_signal:.1f} s per signal")
    print(f"RESULT extract_ms_per_image={per_image * 1e3:.1f} encode_s_per_signal={per_signal:.2f} "
          f"device={args.device}")


if __name__ == "__main__":
    main()
