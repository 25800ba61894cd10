"""Benchmark: one-pass per-layer gradients vs forward only, a naive loop, and torchlens.

Measured side by side in one run, on the same batch, model and loss (``ce``):

* ``fwd``       activations only, under ``torch.inference_mode`` (gradbrain, losses=())
* ``ours``      activations + every layer's gradient, one backward pass (gradbrain)
* ``naive``     the common per-layer recipe: for each layer, a forward pass that keeps that
                layer's output (``retain_grad``) and a full ``loss.backward()``
* ``naive_cut`` a stronger loop: per layer, a forward pass and ``torch.autograd.grad`` asked
                for that layer only (backward stops at the layer); reported, not in RESULT
* ``torchlens`` ``torchlens.trace`` saving the same block outputs with their gradients,
                then ``Trace.backward``

Repeats are interleaved and the median is kept (these machines are noisy). Gradients of
``naive`` and ``torchlens`` are checked against ours. The last line is machine-readable
and reports the ViT-S::

    RESULT fwd_ratio=<ours/fwd> naive_speedup=<naive/ours> layers=<L> torchlens_speedup=<tl/ours>

Usage: ``python benchmarks/bench_features.py [--batch-size 16] [--repeats 3] [--device cpu]``
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import gradbrain  # noqa: E402,F401  (torchvision work-around before timm/torchlens)
from gradbrain import features as gf  # noqa: E402
from gradbrain import models  # noqa: E402
from gradbrain.data import load_embedded  # noqa: E402


def _load(name, weights):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return models.load(name, weights=weights)


def _rss_high_water_mark() -> int:
    """Peak resident set of this process (bytes), from /proc (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def _reset_rss_high_water_mark() -> int:
    """Reset the peak resident set to the current one (Linux ≥ 4.0); return it in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _rss_high_water_mark()


def peak_memory(name, weights, method, batch_size, device) -> float:
    """Peak extra memory (bytes) of one run of ``method``, measured in a fresh process.

    CUDA: the allocator's peak above what was allocated before. CPU: the process's peak
    resident set above the resident set just before the run (the kernel's high-water
    mark is reset first) — in a fresh process, since an allocator keeps freed pages.
    """
    code = (
        "import sys, json, torch; sys.path.insert(0, %r);"
        "import bench_features as b;"
        "m = b._load(%r, %r); x = m.preprocess(b.load_embedded(%d)); dev = torch.device(%r);"
        "m.module.to(dev); fn = b.METHODS[%r];"
        "cuda = dev.type == 'cuda';"
        "cuda and torch.cuda.reset_peak_memory_stats();"
        "before = torch.cuda.memory_allocated() if cuda else b._reset_rss_high_water_mark();"
        "fn(m, x, dev);"
        "after = torch.cuda.max_memory_allocated() if cuda else b._rss_high_water_mark();"
        "print(json.dumps(after - before))"
    ) % (os.path.dirname(os.path.abspath(__file__)), name, weights, batch_size, str(device), method)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _ce_loss(model, heads, embedding):
    return heads.loss("ce", embedding, None, None)


def run_fwd(model, x, device):
    return gf.extract(model, x, losses=(), batch_size=len(x), device=device)


def run_ours(model, x, device):
    return gf.extract(model, x, losses=("ce",), batch_size=len(x), device=device)


def _per_layer_loop(model, x, device, truncated: bool):
    heads = gf._LossHeads(model, 0, device)
    xb = x.to(device)
    grads = {}
    for layer in model.layers:
        kept = {}

        def keep(module, inputs, output):
            if not truncated:
                output.retain_grad()
            kept["h"] = output

        handle = model.module.get_submodule(layer).register_forward_hook(keep)
        with torch.enable_grad():
            xr = xb.detach().requires_grad_(True)
            loss = _ce_loss(model, heads, gf._embed(model.module, xr))
            if truncated:
                (g,) = torch.autograd.grad(loss, kept["h"])
            else:
                loss.backward()
                g = kept["h"].grad
        handle.remove()
        grads[layer] = gf._pool(g, "mean", model.num_prefix_tokens).cpu().numpy()
    return grads


def run_naive(model, x, device):
    """Per layer: forward keeping that layer's output (retain_grad), full backward."""
    return _per_layer_loop(model, x, device, truncated=False)


def run_naive_cut(model, x, device):
    """Per layer: forward, then autograd.grad for that layer only."""
    return _per_layer_loop(model, x, device, truncated=True)


def run_torchlens(model, x, device):
    import torchlens
    from torchlens.options import CaptureOptions

    heads = gf._LossHeads(model, 0, device)

    class Embed(torch.nn.Module):  # same graph as ours: features → pre-logits embedding
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, inp):
            return gf._embed(self.net, inp)

    wrapper = Embed(model.module)
    # save (and keep gradients of) the same block outputs as ours, not every operation
    # (save_budget=None: torchlens' default budget is half the memory free at the first
    # save, which a previous trace's pages still held by the allocator can make too small)
    options = CaptureOptions(save_grads=True, layers_to_save=[f"net.{l}" for l in model.layers],
                             save_budget=None)
    trace = torchlens.trace(wrapper, x.to(device), capture=options)
    embedding = trace.reconstruct_output()
    trace.backward(_ce_loss(model, heads, embedding))
    grads = {
        layer: gf._pool(trace.modules[f"net.{layer}"].grad, "mean", model.num_prefix_tokens)
        .cpu().numpy()
        for layer in model.layers
    }
    del trace, embedding
    torchlens.release_model(wrapper)
    return grads


def _max_rel_diff(reference: dict, other: dict) -> float:
    return max(
        float(np.abs(other[l] - reference[l]).max() / (np.abs(reference[l]).max() + 1e-30))
        for l in reference
    )


METHODS = {"fwd": run_fwd, "ours": run_ours, "naive": run_naive, "naive_cut": run_naive_cut,
           "torchlens": run_torchlens}


def _release_memory():
    """Return freed heap pages to the OS (torchlens traces leave many GB cached)."""
    gc.collect()
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


def bench_model(name, weights, batch_size, repeats, device, with_torchlens, memory):
    model = _load(name, weights)
    model.module.to(device)
    x = model.preprocess(load_embedded(batch_size))
    methods = {k: fn for k, fn in METHODS.items() if with_torchlens or k != "torchlens"}
    times = {k: [] for k in methods}
    outputs = {k: fn(model, x, device) for k, fn in methods.items()}  # warm-up + checks
    for _ in range(repeats):
        for k, fn in methods.items():
            gc.collect()  # (no malloc_trim here: it would make torchlens re-fault its pages)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn(model, x, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[k].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    _release_memory()
    ours = outputs["ours"].gradients["ce"]
    diffs = {k: _max_rel_diff(ours, outputs[k]) for k in methods if k not in ("fwd", "ours")}
    return model, med, memory, diffs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-torchlens", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, "
          f"batch {args.batch_size}, loss ce, median of {args.repeats} interleaved repeats")
    results = {}
    runs = (("dinov3_vits16", None), ("efficientnet_lite0.imagenet", "pretrained"))
    methods = [k for k in METHODS if not (args.no_torchlens and k == "torchlens")]
    # peak memory first, each method in a fresh process, while this one is still small
    memories = {name: {k: peak_memory(name, weights, k, args.batch_size, device) for k in methods}
                for name, weights in runs}
    for name, weights in runs:
        model, med, memory, diffs = bench_model(
            name, weights, args.batch_size, args.repeats, device, not args.no_torchlens,
            memories[name])
        n_layers = len(model.layers)
        row = {
            "layers": n_layers,
            "fwd_ratio": med["ours"] / med["fwd"],
            "naive_speedup": med["naive"] / med["ours"],
            "naive_cut_speedup": med["naive_cut"] / med["ours"],
            "torchlens_speedup": med.get("torchlens", float("nan")) / med["ours"],
        }
        results[name] = row
        print(f"\n{model.label}: {n_layers} layers")
        for k in med:
            print(f"  {k:<10} {med[k]:8.3f} s   peak extra memory {memory[k] / 2**20:8.1f} MiB")
        print(f"  (acts + all-layer grads) / (acts only, inference_mode) = {row['fwd_ratio']:.2f}")
        print(f"  speed-up over the naive per-layer loop = {row['naive_speedup']:.2f}"
              f"  (0.8·L = {0.8 * n_layers:.1f}); over the truncated loop "
              f"{row['naive_cut_speedup']:.2f}")
        print(f"  speed-up over torchlens = {row['torchlens_speedup']:.2f}")
        print("  max relative gradient difference vs ours: "
              + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    vit = results["dinov3_vits16"]
    print(f"RESULT fwd_ratio={vit['fwd_ratio']:.3f} naive_speedup={vit['naive_speedup']:.3f} "
          f"layers={vit['layers']} torchlens_speedup={vit['torchlens_speedup']:.3f}")


if __name__ == "__main__":
    main()
