"""The predictions a biological backprop makes, the estimates it predicts 0 for, and how
test parts combine into verdicts.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from .scores import MIN_TIMED_LAYERS, backprop_latency_prediction


def _verdicts(tests: pd.DataFrame) -> tuple[dict, bool, bool]:
    """From test rows (``prediction``, ``holds``): whether each prediction holds (all its
    parts), whether the study is consistent with backprop (1 and 2), and whether it shows
    the paper's finding (3)."""
    predictions = {key: bool(group.holds.all()) for key, group in tests.groupby("prediction")}
    return (predictions, predictions.get("1 spatial", False)
            and predictions.get("2 temporal", False), predictions.get("3 where", False))


def _verdict_rows(truth: str, seed: int, consistent: bool, paper: bool) -> list[dict]:
    """The two verdict rows of a simulated study in :func:`simulate_tests`' table."""
    return [{"truth": truth, "seed": seed, "prediction": "verdict", "part": part,
             "value": float(holds), "p_value": np.nan, "holds": bool(holds)}
            for part, holds in ((VERDICT_BACKPROP, consistent), (VERDICT_PAPER, paper))]


#: The estimates of :func:`backprop_tests` (key → name, unit, default equivalence margin or None);
#: a biological backprop predicts 0 for each. The timing gap has no equivalence test:
#: its prediction (:func:`backprop_latency_prediction`) assumes when the backward pass
#: starts and how fast it runs, so a gap measures the distance from that model only.
ESTIMATES = {
    "spatial": ("spatial: gradient − activation score", "Spearman ρ", 0.3),
    "temporal": ("temporal: gradient order − activation order", "Spearman ρ", 0.3),
    "timing": ("timing: gradient − backprop-predicted latency", "ms", None),
}


def _spearman(x, y) -> float:
    """Spearman ρ over the pairs where both are finite; NaN with < 3 pairs or no spread."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < MIN_TIMED_LAYERS or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return np.nan
    return float(stats.spearmanr(x[ok], y[ok]).statistic)


def _timing_gap(grad_latency, act_latency, backward_rank) -> float:
    """Median over timed gradient layers of (latency − backprop-predicted latency), ms."""
    grad_latency = np.asarray(grad_latency, float)
    if not np.isfinite(act_latency).any() or not np.isfinite(grad_latency).any():
        return np.nan
    gap = grad_latency - backprop_latency_prediction(act_latency, backward_rank)
    return float(np.nanmedian(gap))


#: For every test part of :func:`backprop_tests`: the planted truths of
#: :func:`gradbrain.data.simulated.make_study` under which it must not hold (its nulls),
#: and the truth under which it should (its power).
TEST_TRUTHS = {
    "gradient and activation layer maps agree": (("none", "paper"), "backprop"),
    "gradient spatial score > 0": (("none", "paper"), "backprop"),
    "gradients after the forward sweep": (("none", "forward"), "backprop"),
    "gradient latency follows the autograd order": (("none", "forward", "paper"), "backprop"),
    "gradients gain more in high-level than early cortex": (("none", "forward", "backprop"),
                                                            "paper"),
    "gradients peak later than activations": (("none", "forward"), "paper"),
}


#: Rows of :func:`simulate_tests` for the two verdicts of a simulated study.
VERDICT_BACKPROP = "verdict: consistent with backprop"
VERDICT_PAPER = "verdict: the paper's finding"
TEST_TRUTHS[VERDICT_BACKPROP] = (("none", "forward", "paper"), "backprop")
TEST_TRUTHS[VERDICT_PAPER] = (("none", "forward", "backprop"), "paper")
#: The estimates' equivalence decisions (rows ``prediction == "estimate"`` of
#: :func:`simulate_tests`; not decided against model-based nulls): equivalent to
#: backprop only under ``backprop`` (and, in space, under ``forward``, whose gradients
#: sit where activations do).
TEST_TRUTHS[ESTIMATES["spatial"][0]] = (("none", "paper"), "backprop")
TEST_TRUTHS[ESTIMATES["temporal"][0]] = (("none", "forward", "paper"), "backprop")
