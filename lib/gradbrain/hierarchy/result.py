"""What the backprop tests of one study computed: :class:`HierarchyResult`."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .._utils import atomic_path
from .calibration import divergence_p, divergence_rates, error_rates, model_null_p
from .verdicts import TEST_TRUTHS, VERDICT_BACKPROP, VERDICT_PAPER, _verdicts
from ..stats import _pct


@dataclass
class HierarchyResult:
    """What :func:`backprop_tests` computed.

    Attributes
    ----------
    scores : DataFrame
        One row per (modality, signal): spatial or temporal score (Spearman and
        Pearson), its p-value against shuffled layers, the number of targets, and the
        Spearman's bootstrap interval over test images (``spearman_ci_low``,
        ``spearman_ci_high``; NaN when ``n_boot`` is 0 or predictions were not kept).
    tests : DataFrame
        One row per prediction part: ``prediction`` (``"1 spatial"``, ``"2 temporal"``,
        ``"3 where"``), ``part``, ``statistic``, ``value``, ``p_value`` or bootstrap
        ``ci_low``/``ci_high``, ``min_p`` (the smallest p-value the test could give on
        these data, NaN where not computed) and ``can_reach_alpha`` (False where
        ``min_p`` ≥ α: a non-significant result is then no evidence either way),
        ``null`` (in words) and ``holds``.
    predictions : dict of str to bool
        Whether each prediction holds (all its parts).
    consistent_with_backprop : bool
        Predictions 1 (spatial) and 2 (temporal) both hold at ``alpha``.
    paper_finding : bool
        Prediction 3 holds: gradients predict high-level more than early cortex and
        late more than early latencies.
    alpha : float
    signal : str
        The gradient signal tested (e.g. ``"gradient (ce)"``).
    fmri, meg : dict or None
        The encoding results (:func:`gradbrain.analysis.encoding.fmri_encoding`,
        :func:`gradbrain.analysis.encoding.meg_encoding`).
    best : dict
        Best-layer maps per signal (:func:`chosen_layers`: chosen as ``select_on`` says,
        ``peak`` the test score there).
    reliable : ndarray of bool or None
        Vertices with NC ≥ ``min_noise_ceiling``.
    masks : dict of str to ndarray of bool
        Per signal, the vertices its spatial tests used (reliable and predicted, on the
        scores ``select_on`` names).
    units : ndarray of int, shape (n_vertices,), or None
        Unit of every vertex in the spatial tests (-1: not reliable).
    unit_best : dict of str to dict
        Per signal, :func:`unit_best_layer` on those units.
    gradient_part : {"whole", "unique"}
        Whether the gradients were tested as extracted or beyond activations.
    spatial_statistic : {"centre", "best"}
        A unit's layer in the spatial tests: its profile centre or its best layer.
    above_chance : DataFrame or None
        Does each signal predict the brain at all? One row per (modality, signal,
        level): ``level`` ("reliable vertices", "units", "time points"), ``n_tested``,
        ``n_significant`` (Benjamini–Hochberg q < α; :func:`above_chance` for fMRI, the
        per-time test of :func:`gradbrain.analysis.encoding.meg_encoding` for MEG), ``share``,
        ``best_r`` (the largest best-layer r), ``min_p`` (smallest attainable p) and,
        for time points, the first and last significant time (``first_ms``,
        ``last_ms``). None when ``n_perm_chance`` was 0.
    estimates : DataFrame
        How far the gradients are from what a biological backprop predicts, as
        estimates (backprop predicts 0 for each; :data:`ESTIMATES`): ``estimate``,
        ``unit``, ``value``, its ``ci`` bootstrap interval over test images
        (``ci_low``/``ci_high``), the ``1 − 2α`` interval (``tost_low``/``tost_high``),
        ``margin``, ``p_tost``, ``diverges`` (interval excludes 0) and ``equivalent``
        (TOST within ±margin) — :func:`~gradbrain.stats.equivalence`. Empty without bootstrap.
    chance_maps : dict
        Per signal, :func:`above_chance` on the reliable vertices (``"vertices"``, arrays
        of length n_vertices, NaN outside them) and on the units (``"units"``).
    verdict_rates : dict
        After :meth:`calibrate`: per verdict (:data:`VERDICT_BACKPROP`,
        :data:`VERDICT_PAPER`) its row of :func:`error_rates`.
    loss : str
        The loss whose gradients were tested.
    ci : float
        Level of the bootstrap confidence intervals.
    settings : dict
        What the encodings were fitted with (``cv``, ``n_boot``, ``ci``, ``seed``,
        ``predictions``: test predictions kept), for reusing them
        (``activations_from`` of :func:`~gradbrain.analysis.backprop.backprop_tests`).
    """

    scores: pd.DataFrame
    tests: pd.DataFrame
    predictions: dict
    consistent_with_backprop: bool
    paper_finding: bool
    alpha: float
    signal: str
    fmri: dict | None = None
    meg: dict | None = None
    best: dict = field(default_factory=dict)
    reliable: np.ndarray | None = None
    masks: dict = field(default_factory=dict)
    loss: str = ""
    ci: float = 0.95
    units: np.ndarray | None = None
    unit_best: dict = field(default_factory=dict)
    gradient_part: str = "whole"
    spatial_statistic: str = "centre"
    verdict_rates: dict = field(default_factory=dict)
    above_chance: pd.DataFrame | None = None
    chance_maps: dict = field(default_factory=dict)
    estimates: pd.DataFrame = field(default_factory=pd.DataFrame)
    settings: dict = field(default_factory=dict)

    @property
    def signal_name(self) -> str:
        """The tested gradient signal, in words."""
        return (f"unique part of the {self.signal} signal (beyond activations)"
                if self.gradient_part == "unique" else f"{self.signal} signal")

    def calibrate(self, simulated: pd.DataFrame) -> "HierarchyResult":
        """Judge every test against its model-based null, and attach its error rates.

        Parameters
        ----------
        simulated : DataFrame
            :func:`simulate_tests` run on the features and settings of this result.

        Returns
        -------
        HierarchyResult
            A copy whose ``tests`` gain ``p_model`` and ``model_min_p``
            (:func:`model_null_p` and its floor ``1 / (1 + n)``), ``holds_nominal`` (the
            previous ``holds``), ``null_used`` and the error rates of the test as decided
            (``fpr``/``power`` with Wilson bounds, :func:`error_rates`: model-based,
            leaving each simulated study out, or nominal). A test whose model-based null
            can reach α (``model_min_p < alpha``: at least ``1 / alpha`` simulated
            studies per null truth) now holds iff ``p_model < alpha``; the others keep
            their nominal decision. Predictions and verdicts are recomputed from
            ``holds``; the summary quotes every test's rates. The ``estimates`` gain the
            error rates of their equivalence decisions (``fpr``: "equivalent" declared
            where backprop's prediction is false; ``power``: declared under
            ``backprop``), where the simulated table has them, and a model-based test
            of divergence: ``p_backprop`` (:func:`divergence_p`), its floor
            ``backprop_min_p``, ``diverges_model`` and that decision's error rates
            (``div_fpr`` under ``backprop``, ``div_power`` under the other truths;
            :func:`divergence_rates`), and ``backprop_mean``, the contrast's mean over
            the simulated backprop studies (what a planted backprop gives on these
            features, against the 0 of an ideal one).
        """
        nominal = error_rates(simulated).set_index("part")
        tests = self.tests.copy()
        p_model, floor = [], []
        for row in tests.itertuples():
            if row.part in TEST_TRUTHS:
                p, n = model_null_p(row.part, row.value, simulated)
            else:  # a modality missing from the study
                p, n = np.nan, 0
            p_model.append(p)
            floor.append(1 / (1 + n) if n else np.nan)
        tests["holds_nominal"] = tests.holds
        tests["p_model"], tests["model_min_p"] = p_model, floor
        usable = (tests.model_min_p < self.alpha).to_numpy()
        model = (error_rates(simulated, null="model", alpha=self.alpha).set_index("part")
                 if usable.any() else nominal)
        for column in ("fpr", "fpr_low", "fpr_high", "power", "power_low", "power_high",
                       "n_null", "n_power"):
            tests[column] = [(model if use else nominal).at[part, column]
                             if part in nominal.index else np.nan
                             for part, use in zip(tests.part, usable)]
        tests["null_used"] = np.where(usable, "model-based", "nominal")
        tests["holds"] = np.where(usable, tests.p_model < self.alpha, tests.holds_nominal)
        tests["holds"] = tests.holds.astype(bool)
        tests["can_reach_alpha"] = np.where(usable, True, tests.can_reach_alpha)
        out = copy.copy(self)
        out.tests = tests
        out.predictions, out.consistent_with_backprop, out.paper_finding = _verdicts(tests)
        verdict_tests = {VERDICT_BACKPROP: ("1 spatial", "2 temporal"),
                         VERDICT_PAPER: ("3 where",)}
        out.verdict_rates = {}
        for name, predictions in verdict_tests.items():
            mine = usable[tests.prediction.isin(predictions).to_numpy()]
            rates = model if mine.size and mine.all() else nominal
            out.verdict_rates[name] = rates.loc[name].to_dict() if name in rates.index else {}
        if len(self.estimates):   # how often "equivalent" is declared, wrongly and rightly
            estimates = self.estimates.copy()
            for column in ("fpr", "fpr_low", "fpr_high", "power", "power_low", "power_high",
                           "n_null", "n_power"):
                estimates[column] = [nominal.at[name, column] if name in nominal.index
                                     else np.nan for name in estimates.estimate]
            # divergence against simulated backprop studies (and its own error rates)
            rows = [divergence_p(e.estimate, e.value, simulated)
                    for e in estimates.itertuples()]
            estimates["p_backprop"] = [p for p, _ in rows]
            estimates["backprop_min_p"] = [1 / (1 + n) if n else np.nan for _, n in rows]
            estimates["diverges_model"] = (estimates.p_backprop < self.alpha) & (
                estimates.backprop_min_p < self.alpha)
            planted = simulated[simulated.truth == "backprop"]
            estimates["backprop_mean"] = [
                float(planted.value[planted.part == name].mean())
                if (planted.part == name).any() else np.nan for name in estimates.estimate]
            rates = divergence_rates(simulated, alpha=self.alpha).set_index("estimate")
            for column in ("div_fpr", "div_fpr_low", "div_fpr_high", "n_div_null",
                           "div_power", "div_power_low", "div_power_high", "n_div_power"):
                estimates[column] = [rates.at[name, column] if name in rates.index
                                     else np.nan for name in estimates.estimate]
            out.estimates = estimates
        return out

    def table(self) -> pd.DataFrame:
        """One tidy row per signal (activation, then gradient): scores and verdicts.

        Returns
        -------
        DataFrame with columns ``feature`` (``"activation"`` or ``"gradient"``), ``loss``
        (empty for activations), and where fMRI was tested ``fmri_score`` (median over
        reliable vertices of the test r/√NC at each vertex's best layer, chosen as
        ``select_on`` said), ``spatial``, ``spatial_p`` (Spearman; shuffled
        layers), ``spatial_ci_low`` and ``spatial_ci_high`` (bootstrap over test images);
        where MEG was tested ``meg_score`` (best r(t) over layers),
        ``temporal``, ``temporal_p``, ``temporal_ci_low`` and ``temporal_ci_high``
        (Spearman; bootstrap over test images); ``ci`` the intervals' level; and
        ``consistent_with_backprop`` and
        ``paper_finding`` (gradient row only; missing for the activation row).
        """
        by = self.scores.set_index(["score", "signal"]) if len(self.scores) else None

        def score_columns(kind: str, signal: str) -> dict:
            found = by.loc[(kind, signal)]
            return {kind: float(found["spearman"]), f"{kind}_p": float(found["p_spearman"]),
                    f"{kind}_ci_low": float(found["spearman_ci_low"]),
                    f"{kind}_ci_high": float(found["spearman_ci_high"])}

        rows = []
        for feature, signal in (("activation", "activation"), ("gradient", self.signal)):
            row: dict = {"feature": feature, "loss": self.loss if feature == "gradient" else ""}
            if self.fmri is not None and signal in self.best:
                peak = self.best[signal]["peak"]
                keep = self.reliable if self.reliable is not None else slice(None)
                row["fmri_score"] = float(np.nanmedian(peak[keep])) if np.size(peak[keep]) \
                    else np.nan
                row.update(score_columns("spatial", signal))
            if self.meg is not None and signal in self.meg:
                row["meg_score"] = float(np.max(self.meg[signal]["peak"]))
                row.update(score_columns("temporal", signal))
            row["ci"] = self.ci
            if feature == "gradient":
                row["consistent_with_backprop"] = self.consistent_with_backprop
                row["paper_finding"] = self.paper_finding
            rows.append(row)
        return pd.DataFrame(rows)

    def save(self, path, **labels) -> Path:
        """Write :meth:`table` to a CSV file, atomically (what a sweep collects).

        Parameters
        ----------
        path : path-like
            The ``.csv`` file to write; its folder is created.
        **labels
            Constant columns put first, e.g. ``model="resnet50", subject=1``.

        Returns
        -------
        Path of the written file.
        """
        path = Path(path).expanduser()
        if path.suffix != ".csv":
            raise ValueError(f"Result tables are written as CSV; got {str(path)!r}, give a "
                             "path ending in '.csv'.")
        table = self.table()
        for i, (key, value) in enumerate(labels.items()):
            table.insert(i, key, value)
        with atomic_path(path, suffix=".csv") as tmp:
            table.to_csv(tmp, index=False)
        return path

    def _chance_lines(self) -> list[str]:
        """The above-chance results of both signals, in words."""
        if self.above_chance is None or self.above_chance.empty:
            return []
        parts = []
        for row in self.above_chance.itertuples():
            what = f"{row.n_significant} of {row.n_tested} {row.level}"
            if row.level == "time points" and row.n_significant:
                what += f" (first at {row.first_ms:.0f} ms, last at {row.last_ms:.0f} ms)"
            parts.append((row.signal, what))
        by_signal = {}
        for signal, what in parts:
            by_signal.setdefault(signal, []).append(what)
        said = "; ".join(f"{signal} {', '.join(whats)}" for signal, whats in by_signal.items())
        return [f"- Above chance at all (best layer vs shuffled test images, "
                f"Benjamini–Hochberg FDR q < {self.alpha}): {said}."]

    def _estimate_lines(self) -> list[str]:
        """The estimates against backprop's predictions, in words."""
        if self.estimates is None or self.estimates.empty:
            return []
        lines = [f"- Estimates (a biological backprop predicts 0 for each; "
                 f"{100 * self.ci:.0f} % bootstrap intervals over test images; equivalence "
                 f"by two one-sided tests at α = {self.alpha} within ±margin):"]
        for row in self.estimates.itertuples():
            if not np.isfinite(row.value):
                lines.append(f"  - {row.estimate}: not estimable here.")
                continue
            number = (f"{row.value:+.0f} {row.unit} [{row.ci_low:+.0f}, {row.ci_high:+.0f}]"
                      if row.unit == "ms" else
                      f"{row.value:+.2f} [{row.ci_low:+.2f}, {row.ci_high:+.2f}] {row.unit}")
            margin = f"±{row.margin:g}{' ms' if row.unit == 'ms' else ''}"
            if not np.isfinite(row.margin):   # no equivalence test: the interval only
                word = ("**differs** from that prediction" if row.diverges else
                        "consistent with that prediction (its interval holds 0)")
                lines.append(f"  - {row.estimate}: {number}; {word} — which assumes the "
                             "backward pass starts when the forward sweep ends and runs at "
                             "its pace.")
                continue
            if row.diverges and not row.equivalent:
                word = f"**differs** from backprop's prediction (and is not within {margin})"
            elif row.equivalent and not row.diverges:
                word = f"**equivalent** to backprop's prediction within {margin}"
            elif row.equivalent:
                word = f"differs from 0 but lies within {margin} (equivalent at that margin)"
            else:
                word = (f"**inconclusive**: the interval holds 0 and reaches beyond {margin}")
            rates = ""
            if np.isfinite(getattr(row, "power", np.nan)):
                power = _pct(row.power, row.power_low, row.power_high)
                rates = (f" (\"equivalent\" was declared in {power} of {int(row.n_power)} "
                         f"simulated backprop studies and, wrongly, in "
                         f"{_pct(row.fpr, row.fpr_low, row.fpr_high)} of {int(row.n_null)} "
                         "others)")
            model = ""
            if np.isfinite(getattr(row, "p_backprop", np.nan)):
                verdict = ("**diverges from backprop**" if row.diverges_model else
                           "not shown to diverge from backprop")
                if row.backprop_min_p >= self.alpha:
                    verdict = "cannot be judged against simulated backprop (too few studies)"
                centred = (f"whose contrast averages {row.backprop_mean:+.2f} on these "
                           "features, where an ideal backprop gives 0"
                           if np.isfinite(getattr(row, "backprop_mean", np.nan)) else
                           "whose contrasts need not be centred on 0 on real features")
                model = (f" Against {int(row.n_div_null)} studies simulated with a planted "
                         f"backprop ({centred}): "
                         f"{verdict}, p = {row.p_backprop:.3g} (this decision: false "
                         f"divergence {_pct(row.div_fpr, row.div_fpr_low, row.div_fpr_high)}, "
                         f"power {_pct(row.div_power, row.div_power_low, row.div_power_high)}"
                         f" of {int(row.n_div_power)}).")
            lines.append(f"  - {row.estimate}: {number}; {word}{rates}.{model}")
        return lines

    def summary(self) -> str:
        """The conclusion, in words, from the computed tests (Markdown)."""
        names = {"1 spatial": "Spatial prediction (gradient of layer l where activation l is, "
                              "ordered along the hierarchy)",
                 "2 temporal": "Temporal prediction (gradients after the forward sweep, top "
                               "layer first)",
                 "3 where": "The paper's positive finding (gradients predict high-level "
                            "cortex and late latencies)"}
        lines, untested, failing = self._chance_lines(), [], []
        for key, holds in self.predictions.items():
            parts = self.tests[self.tests.prediction == key]
            missing = parts[parts.statistic == "available"]
            parts = parts[parts.statistic != "available"]
            failed = [p for p, ok in zip(parts.part, parts.holds) if not ok]
            absent = " and ".join(m.replace(" data", "") for m in missing.part)
            if parts.empty:
                verdict = f"**not tested** (no {absent} data in this study)"
                untested.append(key)
            else:
                verdict = "**holds**" if not failed else (
                    "**does not hold** (fails: " + "; ".join(failed) + ")")
                if failed:
                    failing.append(key)
                if len(missing):
                    verdict += f"; its {absent} part was not tested (no {absent} data)"
                    untested.append(key)
            lines.append(f"- {names[key]}: {verdict}.")
        blind = self.tests[~self.tests["can_reach_alpha"]] if "can_reach_alpha" in self.tests \
            else self.tests.iloc[:0]
        for _, row in blind.iterrows():
            lines.append(f"- Caution: \"{row.part}\" could not reach α = {self.alpha} on these "
                         f"data (smallest attainable p = {row.min_p:.3g}): its failure is no "
                         "evidence against the prediction.")
        backprop = {"1 spatial", "2 temporal"}
        if backprop & set(failing) or not backprop & set(untested):
            if self.consistent_with_backprop:
                verdict = ("is consistent with a biological backpropagation (predictions 1 "
                           "and 2 hold)")
            else:
                failed = sorted(p.split()[0] for p in backprop & set(failing))
                which = (f"predictions {' and '.join(failed)} do" if len(failed) > 1
                         else f"prediction {failed[0]} does")
                verdict = (f"**fails the tests** of a biological backpropagation ({which} not "
                           "hold; a failed test alone is no evidence that the gradients "
                           "diverge from backprop: what was shown, and what was not, is in "
                           "the estimates above)")
        else:
            verdict = ("**cannot be judged** against a biological backpropagation: prediction "
                       + " and ".join(sorted(p.split()[0] for p in backprop & set(untested)))
                       + " was not tested (give the chapter a study with both fMRI and MEG, "
                       "or a MEG study next to the fMRI one)")
        finding = ("is found in this study" if self.paper_finding else
                   "is not fully tested" if "3 where" in untested and "3 where" not in failing
                   else "is not found in this study")
        if "fpr" in self.tests:  # calibrated: quote each test's measured error rates
            lines.append("- Error rates measured on studies simulated from these features, "
                         "sizes and noise (false positives under the truths where a test "
                         "must fail; power under the one where it must hold; Wilson 95 %):")
            for row in self.tests.itertuples():
                if not np.isfinite(row.fpr):
                    continue
                null = ("its model-based null (p = {:.3g})".format(row.p_model)
                        if row.null_used == "model-based" else
                        "its nominal null (too few simulated studies for a model-based one)")
                fpr = _pct(row.fpr, row.fpr_low, row.fpr_high)
                power = _pct(row.power, row.power_low, row.power_high)
                lines.append(f"  - \"{row.part}\": false positives {fpr} of {row.n_null}, "
                             f"power {power} of {row.n_power}; judged against {null}.")
            rates = self.verdict_rates.get(VERDICT_BACKPROP, {})
            if rates and np.isfinite(rates.get("power", np.nan)) and not untested:
                power = _pct(rates["power"], rates["power_low"], rates["power_high"])
                fpr = _pct(rates["fpr"], rates["fpr_low"], rates["fpr_high"])
                verdict += (f" (as a test, this verdict found a planted backprop in {power} "
                            f"of {rates['n_power']} simulated studies and claimed one where "
                            f"there was none in {fpr} of {rates['n_null']})")
        lines += self._estimate_lines()
        lines.append(f"- Conclusion at α = {self.alpha}: the {self.signal_name} {verdict}; "
                     f"the paper's positive finding {finding}.")
        return "\n".join(lines)
