"""The hierarchy tests: do gradients follow the brain's hierarchies like backprop?

Arrays and tables in, arrays and tables out — no study, no features, no model:

* :mod:`~gradbrain.hierarchy.scores` — best layers, hierarchy units and regions, layer
  profiles and their centres, the spatial and temporal scores of Raugel et al. (2025);
* :mod:`~gradbrain.hierarchy.inference` — permutation tests over layer depths and
  profiles, the spatial bootstrap, above-chance tests;
* :mod:`~gradbrain.hierarchy.verdicts` — what a biological backprop predicts, the
  estimates it predicts 0 for, and how tests combine into verdicts;
* :mod:`~gradbrain.hierarchy.calibration` — error rates, model-based nulls and power
  curves from simulated studies' tables, and the tables shipped with the library;
* :mod:`~gradbrain.hierarchy.result` — :class:`HierarchyResult`;
* :mod:`~gradbrain.hierarchy.report` — what the encoding chapters found, in words.

A study's tests are run by :func:`gradbrain.analysis.backprop.backprop_tests`, and
simulated studies by :mod:`gradbrain.analysis.simulation`; the generic statistics
(group tests, equivalence) live in :mod:`gradbrain.stats`. Their old names here
(``hierarchy.run``, ``hierarchy.simulate_tests``, ``hierarchy.group_test``, …) still
work for one release, with a DeprecationWarning.
"""

from __future__ import annotations

from .._utils import moved_names
from .calibration import (POWER_CURVE, SIMULATION_VERSION, TRUTH_VERSION, divergence_p,
                          divergence_rates, error_rates, model_null_p, power_curve,
                          power_curve_summary, read_power_curve)
from .inference import (above_chance, bootstrap_spatial_score, layer_permutation_test,
                        min_p_value, profile_permutation_test, spatial_score)
from .report import summarize_fmri, summarize_meg
from .result import HierarchyResult
from .scores import (GRADIENT_PARTS, MIN_TIMED_LAYERS, SELECTIONS, SPATIAL_STATISTICS,
                     backprop_latency_prediction, best_layer, chosen_layers, cv_correlation,
                     hierarchy_regions, hierarchy_units, layer_profiles, peak_scores,
                     profile_centre, recovery, reliable_targets, temporal_score,
                     temporal_table, unit_best_layer, unit_coordinates)
from .verdicts import ESTIMATES, TEST_TRUTHS, VERDICT_BACKPROP, VERDICT_PAPER

__all__ = ["best_layer", "chosen_layers", "cv_correlation", "SELECTIONS", "hierarchy_regions",
           "layer_profiles", "peak_scores", "reliable_targets", "recovery", "summarize_fmri",
           "temporal_score", "backprop_latency_prediction", "summarize_meg", "temporal_table",
           "layer_permutation_test", "spatial_score", "bootstrap_spatial_score",
           "hierarchy_units", "unit_coordinates", "unit_best_layer", "profile_centre",
           "profile_permutation_test", "min_p_value", "SPATIAL_STATISTICS", "above_chance",
           "HierarchyResult", "GRADIENT_PARTS", "MIN_TIMED_LAYERS", "error_rates",
           "model_null_p", "TEST_TRUTHS", "VERDICT_BACKPROP", "VERDICT_PAPER", "ESTIMATES",
           "divergence_p", "divergence_rates", "power_curve", "read_power_curve",
           "power_curve_summary", "POWER_CURVE", "SIMULATION_VERSION", "TRUTH_VERSION"]

#: Names that moved out of the hierarchy tests in the redesign (one release of grace).
__getattr__ = moved_names(__name__, {
    "run": "gradbrain.analysis.backprop:backprop_tests",
    **{name: "gradbrain.analysis.simulation" for name in (
        "simulate_tests", "study_sizes", "write_reference")},
    **{name: "gradbrain.stats" for name in ("group_test", "group_estimate", "equivalence")},
})
