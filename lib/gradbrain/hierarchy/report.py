"""What the encoding chapters found, in words (generated Markdown)."""

from __future__ import annotations

import numpy as np

from .._utils import signal_name
from .scores import MIN_TIMED_LAYERS, _n_timed, recovery, temporal_score


def summarize_fmri(study, best: dict, reliable: np.ndarray, regions: np.ndarray) -> str:
    """What an fMRI encoding run found, in words (Markdown bullet list).

    Parameters
    ----------
    study : Study
    best : dict of str to dict
        Signal → :func:`best_layer` output; must hold ``"activation"``.
    reliable : ndarray of bool, shape (n_vertices,)
    regions : ndarray of str, shape (n_vertices,)
        From :func:`hierarchy_regions` (first and last names = early and high-level).
    """
    names = sorted(set(regions))  # "1 (early)" … "n (high-level)"
    early, late = regions == names[0], regions == names[-1]
    act = recovery(best["activation"]["depth"][reliable], study.hierarchy[reliable])
    lines = [f"- Activations: the best layer's depth correlates with distance from V1 "
             f"(Spearman ρ = {act['rho']:.2f}, {int(reliable.sum())} reliable vertices)."]
    for signal, b in best.items():
        if signal == "activation":
            continue
        lines.append(
            f"- {signal}: median peak score {np.nanmedian(b['peak'][reliable & early]):.2f} in "
            f"the earliest quarter of the hierarchy vs "
            f"{np.nanmedian(b['peak'][reliable & late]):.2f} in the highest quarter."
        )
    if study.truth and "preferred_depth" in study.truth:
        rec = recovery(best["activation"]["depth"][reliable],
                       study.truth["preferred_depth"][reliable])
        lines.append(f"- Simulated study: the recovered layer map matches the planted one "
                     f"(r = {rec['r']:.2f}, Spearman ρ = {rec['rho']:.2f}).")
    return "\n".join(lines)


def summarize_meg(results: dict, study=None) -> str:
    """What an MEG encoding run found, in words (Markdown bullet list).

    Parameters
    ----------
    results : dict
        Output of :func:`gradbrain.analysis.encoding.meg_encoding`.
    study : Study, optional
        A simulated study's planted latencies are compared with the recovered ones.
    """
    lines = []
    for signal, res in results.items():
        timed = _n_timed(res["latency"])
        if timed < MIN_TIMED_LAYERS:
            lines.append(f"- {signal}: {timed} of {len(res['latency'])} layers peak above "
                         "chance — too few for a temporal score; best r(t) = "
                         f"{np.max(res['peak']):.3f}.")
            continue
        score = temporal_score(res["latency"], res["depth"], boot_latency=res["boot_latency"])
        lo, hi = score["pearson_ci"]
        if lo > 0 or hi < 0:
            finding = f"deeper layers peak {'later' if score['pearson'] > 0 else 'earlier'}"
        else:
            finding = "no reliable relation between depth and latency"
        lines.append(
            f"- {signal}: peak latencies {np.nanmin(res['latency']):.0f}–"
            f"{np.nanmax(res['latency']):.0f} ms; {finding} (temporal score r = "
            f"{score['pearson']:.2f}, 95 % bootstrap CI [{lo:.2f}, {hi:.2f}], p = "
            f"{score['p_pearson']:.2g} across {score['n_layers']} layers); best r(t) = "
            f"{np.max(res['peak']):.3f}."
        )
    truth = getattr(study, "truth", None) or {}
    planted = {"activation": truth.get("activation_latency")}
    if truth.get("gradient_truth") not in (None, "none"):
        planted[signal_name(truth["gradient_loss"])] = truth.get("gradient_latency")
    for signal, values in planted.items():
        if values is None or signal not in results:
            continue
        found = results[signal]["latency"]
        timed = np.isfinite(found)
        if timed.sum() < MIN_TIMED_LAYERS:
            continue
        rec = recovery(found[timed], np.asarray(values)[timed])
        lines.append(f"- Simulated study, {signal}: recovered vs planted latencies r = "
                     f"{rec['r']:.2f} (Spearman ρ = {rec['rho']:.2f}), median |error| "
                     f"{np.nanmedian(np.abs(found - values)):.0f} ms.")
    return "\n".join(lines)
