"""The divergence test against a family of planted backprops (gradbrain.divergence).

References are independent of the code: planted contrast distributions whose answer is
known, hand-computed Holm adjustments and p-values, and the simulator's own planted
quantities."""

import numpy as np
import pandas as pd
import pytest

from gradbrain import divergence, hierarchy
from gradbrain.data import simulated

SPATIAL = hierarchy.ESTIMATES["spatial"][0]
TEMPORAL = hierarchy.ESTIMATES["temporal"][0]


def _table(rng, cells, n=60, divergent=None):
    """A simulate_family-shaped table: per cell, contrasts drawn N(mean, sd)."""
    rows = []
    for (weight, mean, sd) in cells:
        for seed, v in enumerate(rng.normal(mean, sd, n)):
            for key, name in (("spatial", SPATIAL), ("temporal", TEMPORAL)):
                rows.append({"contrast": key, "truth": "backprop", "seed": seed,
                             "gradient_weight": weight, "latency_jitter": 0.0,
                             "estimate": name, "value": v})
    for truth, (mean, sd) in (divergent or {}).items():
        for seed, v in enumerate(rng.normal(mean, sd, n)):
            for key, name in (("spatial", SPATIAL), ("temporal", TEMPORAL)):
                rows.append({"contrast": key, "truth": truth, "seed": seed,
                             "gradient_weight": 0.5, "latency_jitter": 0.0,
                             "estimate": name, "value": v})
    return pd.DataFrame(rows)


def test_a_weaker_backprop_is_not_divergent_but_a_single_point_null_says_it_is(rng):
    # issue 28's case: a weight-0.5 cell centred on 0 (sd 0.008) and a weaker backprop
    # whose contrast is lower (-0.09): against 0.5 alone it "diverges", against the
    # family (which holds the weaker cell) it must not
    table = _table(rng, [(0.25, -0.09, 0.03), (0.5, 0.0, 0.008)])
    out = divergence.divergence_test({"spatial": -0.09, "temporal": -0.09}, table)
    assert not out.diverges.any()
    assert (out.worst_cell == "gradient weight 0.25, latency jitter 0 ms").all()
    point = table[(table.gradient_weight == 0.5) & (table.estimate == SPATIAL)].value
    p_point = (1 + np.sum(point <= -0.09)) / (1 + len(point))
    assert p_point < 0.05   # what the single-point null decided


def test_worst_cell_p_and_holm_by_hand():
    table = _table(np.random.default_rng(0), [(0.1, 0.0, 1.0), (0.5, 1.0, 1.0)], n=99)
    values = {"spatial": -0.5, "temporal": 0.2}
    out = divergence.divergence_test(values, table).set_index("contrast")
    for key, value in values.items():
        name = SPATIAL if key == "spatial" else TEMPORAL
        ps = []
        for w in (0.1, 0.5):
            sims = table[(table.gradient_weight == w) & (table.estimate == name)].value
            ps.append((1 + np.sum(sims <= value)) / (1 + len(sims)))
        assert out.at[key, "p_worst"] == pytest.approx(max(ps))
    p = out.p_worst
    lo, hi = sorted(p)
    assert out.p_holm.min() == pytest.approx(min(1, 2 * lo))
    assert out.p_holm.max() == pytest.approx(max(min(1, 2 * lo), hi))
    assert out.min_p.iloc[0] == pytest.approx(1 / 100)


def test_family_rates_false_divergence_bounded_and_power_against_wrong_orders(rng):
    table = _table(rng, [(0.1, -0.3, 0.1), (0.5, 0.0, 0.05), (0.9, 0.05, 0.05)], n=80,
                   divergent={"reversed": (-2.0, 0.1), "shuffled": (-1.0, 0.2)})
    rates = divergence.family_rates(table).set_index(["contrast", "what"])
    for key in ("spatial", "temporal"):
        # worst case per cell: each cell's false-divergence rate is at most ~alpha
        assert rates.loc[(key, "false divergence, worst cell"), "rate"] <= 0.1
        assert rates.loc[(key, "power vs reversed"), "rate"] == 1.0
        assert rates.loc[(key, "power vs shuffled"), "rate"] >= 0.9


def test_nan_contrast_is_not_judged_and_bad_inputs_are_named():
    table = _table(np.random.default_rng(1), [(0.5, 0.0, 0.1)], n=30)
    out = divergence.divergence_test({"spatial": np.nan, "temporal": -5.0}, table)
    assert not out.set_index("contrast").at["spatial", "diverges"]
    assert out.set_index("contrast").at["temporal", "diverges"]
    with pytest.raises(ValueError, match="alpha"):
        divergence.divergence_test({}, table, alpha=2)
    with pytest.raises(ValueError, match="simulate_family"):
        divergence.divergence_test({}, table.drop(columns="gradient_weight"))
    with pytest.raises(ValueError, match="Unknown nuisance"):
        divergence._check_cells([{"noise": 2}])


def test_a_contrast_without_simulated_studies_is_not_judged_and_costs_holm_nothing(rng):
    """A family simulated for the spatial contrast only (fMRI studies): the temporal one
    is reported as not judged, and Holm corrects over the one contrast judged."""
    table = _table(rng, [(0.5, 0.0, 0.1)], n=99)
    table = table[table.contrast == "spatial"]
    out = divergence.divergence_test({"spatial": -0.25, "temporal": -5.0}, table)
    out = out.set_index("contrast")
    assert out.at["temporal", "n_cells"] == 0 and np.isnan(out.at["temporal", "p_worst"])
    assert not out.at["temporal", "diverges"]
    sims = table.value.to_numpy()
    assert out.at["spatial", "p_holm"] == pytest.approx((1 + np.sum(sims <= -0.25)) / 100)
    said = divergence.summarize(out.reset_index(), divergence.family_rates(table, n_contrasts=1))
    assert "temporal: gradient order − activation order = -5.00: **not judged**" in said
    assert "cannot be judged" not in said


def test_calibration_seeds_are_disjoint_from_selection_and_the_study():
    seeds = divergence.calibration_seeds(5, exclude=[divergence.FIRST_CALIBRATION_SEED + 1])
    assert divergence.FIRST_CALIBRATION_SEED + 1 not in seeds and len(set(seeds)) == 5
    assert not set(seeds) & set(divergence.SELECTION_SEEDS)
    other = divergence.calibration_seeds(5, cell=1)
    assert not set(seeds) & set(other)
    with pytest.raises(ValueError, match="'n'"):
        divergence.calibration_seeds(0)


@pytest.fixture(scope="module")
def planted_features():
    """Tiny layer-specific features on 40 embedded-image ids (no network needed)."""
    from types import SimpleNamespace

    rng = np.random.default_rng(3)
    layers = [f"l{i}" for i in range(6)]
    images = simulated.load_embedded(40, size=32)
    acts = {l: rng.standard_normal((40, 8)).astype(np.float32) for l in layers}
    grads = {l: rng.standard_normal((40, 8)).astype(np.float32) for l in layers}
    return images, SimpleNamespace(
        layers=layers, depth=np.linspace(0, 1, 6), activations=acts,
        gradients={"ce": grads}, image_ids=list(images.ids), n_images=40,
        model="planted", weights="none", pool="mean", losses=["ce"],
        backward_rank=lambda loss: np.arange(6)[::-1].copy())


@pytest.mark.parametrize("truth", ["reversed", "shuffled", "partial"])
def test_divergent_truths_put_gradients_at_backprops_slots_in_a_wrong_order(
        planted_features, truth):
    images, feats = planted_features
    study = simulated.make_study(2, images=images, features=feats, gradient_truth=truth,
                                 n_images=40)
    t = study.truth
    # written out by hand for 6 layers: partial keeps layers 0-2, reverses 3-5
    order = {"reversed": [5, 4, 3, 2, 1, 0], "partial": [0, 1, 2, 5, 4, 3]}.get(
        truth, t.get("gradient_order"))
    # fMRI: a vertex of activation layer k carries the gradient of layer order[k]
    assert np.array_equal(t["gradient_layer"], np.asarray(order)[t["preferred_layer"]])
    # MEG: the gradient of layer order[k] arrives at backprop's latency of layer k
    backprop = 300 + 200 * np.arange(6)[::-1] / 5     # backward rank: top layer first
    assert np.allclose(t["gradient_latency"][np.asarray(order)], backprop)
    if truth == "reversed":   # bottom layer first, after the sweep
        assert np.all(np.diff(t["gradient_latency"]) > 0)


def test_latency_jitter_offsets_latencies_and_defaults_draw_nothing(planted_features):
    images, feats = planted_features
    kw = dict(images=images, features=feats, gradient_truth="backprop", n_images=40)
    plain = simulated.make_study(4, **kw)
    again = simulated.make_study(4, latency_jitter=0.0, **kw)
    assert np.array_equal(plain.betas, again.betas)
    jittered = simulated.make_study(4, latency_jitter=40.0, **kw)
    offset = jittered.truth["gradient_latency"] - plain.truth["gradient_latency"]
    assert np.all(offset != 0) and np.abs(offset).max() < 200
    assert np.array_equal(plain.betas, jittered.betas)   # fMRI untouched
    with pytest.raises(ValueError, match="latency_jitter"):
        simulated.make_study(4, latency_jitter=-1.0, **kw)


def _residual(y, *blocks):
    """Share of y's variance left by least squares on a constant and the blocks' columns."""
    design = np.column_stack([np.ones(len(y)), *blocks])
    fit = np.linalg.lstsq(design, y, rcond=None)[0]
    return float(np.var(y - design @ fit) / np.var(y))


def test_activation_leakage_reads_out_the_same_layers_activations_at_the_gradients_slot(
        planted_features):
    """A leaky gradient signal is a mixture of the leak-free one (same seed: every other
    draw is shared) and a read-out of its own layer's activations: it lies in the span of
    the two and in neither alone (least squares, independent of the simulator's code).
    In MEG the leak changes only the late, backprop-timed part of the response."""
    images, feats = planted_features
    kw = dict(images=images, features=feats, gradient_truth="backprop", n_images=40,
              noise=0.0)
    plain = simulated.make_study(4, **kw)
    leaky = simulated.make_study(4, activation_leakage=0.5, **kw)
    assert np.array_equal(plain.split, leaky.split)
    np.testing.assert_array_equal(plain.truth["signal_activation"],
                                  leaky.truth["signal_activation"])
    layer_of = leaky.truth["gradient_layer"]
    checked = 0
    for l, name in enumerate(feats.layers):
        where = np.flatnonzero(layer_of == l)
        if not where.size:
            continue
        x = feats.activations[name].astype(np.float64)
        acts = (x - x.mean(0)) / x.std(0)
        v = where[0]
        mixed = leaky.truth["signal_gradient"][:, v].astype(np.float64)
        gradient = plain.truth["signal_gradient"][:, v].astype(np.float64)
        assert _residual(mixed, gradient, acts) < 1e-8
        assert _residual(mixed, gradient) > 0.1      # not the gradient alone
        assert _residual(mixed, acts) > 0.1          # not the activations alone
        checked += 1
    assert checked >= 3
    late = plain.epochs.times > 0.15
    diff = leaky.epochs.get_data() - plain.epochs.get_data()
    assert np.abs(diff).max() > 0
    assert np.abs(diff[..., ~late]).max() < 1e-4 * np.abs(diff).max()
    assert "leakage" in simulated.describe_truth(leaky)
    with pytest.raises(ValueError, match="activation_leakage"):
        simulated.make_study(4, activation_leakage=1.0, **kw)


def _leaky_table(rng, n=60):
    """_strength_table plus a leaky backprop at weight 0.9: leakage lowers its strength to
    the weak cell's (0.55-0.70) and its contrast to -0.3."""
    table = _strength_table(rng, n).assign(activation_leakage=0.0)
    leaky = pd.DataFrame({"contrast": "spatial", "truth": "backprop", "seed": np.arange(n),
                          "gradient_weight": 0.9, "latency_jitter": 0.0,
                          "activation_leakage": 0.5, "estimate": SPATIAL,
                          "value": rng.normal(-0.3, 0.05, n),
                          "strength": rng.uniform(0.55, 0.70, n)})
    return pd.concat([table, leaky], ignore_index=True)


def test_leaky_cells_are_judged_where_their_strengths_reach_and_leave_the_weights_levels(rng):
    table = _leaky_table(rng)

    def cell(w, leak):
        return table[(table.truth == "backprop") & (table.gradient_weight == w)
                     & (table.activation_leakage == leak)].value

    # a study as weak as the weak cells: the leaky cell's strengths span it, so it is
    # judged too, and its p is the largest of the three (by hand)
    weak = divergence.divergence_test({"spatial": -0.35}, table,
                                      strengths={"spatial": 0.6}).set_index("contrast")
    assert weak.at["spatial", "cells_judged"] == \
        "weight 0.1; weight 0.5; weight 0.9, leakage 0.5"
    p = [(1 + np.sum(cell(w, leak) <= -0.35)) / (1 + len(cell(w, leak)))
         for w, leak in ((0.1, 0), (0.5, 0), (0.9, 0.5))]
    assert weak.at["spatial", "p_worst"] == pytest.approx(max(p))
    # a strong study: the leaky cell does not pull weight 0.9's level down (it would put
    # 0.9 at 1.5, and the study above every level, judged against 0.9 alone)
    strong = divergence.divergence_test({"spatial": 0.0}, table,
                                        strengths={"spatial": 2.0}).set_index("contrast")
    assert strong.at["spatial", "cells_judged"] == \
        "weight 0.5; weight 0.9; weight 0.9, leakage 0.5"
    rates = divergence.family_rates(table, n_contrasts=1)
    assert "false divergence, weight 0.9, jitter 0 ms, leakage 0.5" in set(rates.what)
    worst = rates.set_index("what").at["false divergence, worst cell", "rate"]
    assert worst <= 0.1
    # a table made before leakage existed reads as leakage 0
    old = divergence.divergence_test({"spatial": -0.35}, _strength_table(
        np.random.default_rng(0)), strengths={"spatial": 0.6})
    assert old.cells_judged.iloc[0] == "weight 0.1; weight 0.5"
    with pytest.raises(ValueError, match="activation_leakage"):
        divergence.simulate_family(None, family=[{"activation_leakage": 1.5}])


@pytest.mark.parametrize("noise", [0.5, 1.0, 2.0])
def test_estimate_noise_recovers_the_planted_noise(planted_features, noise):
    images, feats = planted_features
    study = simulated.make_study(5, images=images, features=feats, noise=noise,
                                 n_images=40, meg=False)
    assert simulated.estimate_noise(study) == pytest.approx(noise, rel=0.05)


def test_shipped_rows_of_a_contrast_simulated_since_by_other_code_are_simulated_again(
        planted_features, monkeypatch, tmp_path):
    """A table shipped when the spatial contrast was at version 2 and the temporal one at
    1 (before MEG latencies were gated by the max statistic) serves the spatial contrast
    and not the temporal one (now 3), whose studies are made again; a table with no
    contrast_version column (all version 1) serves neither."""
    assert divergence.CONTRAST_VERSION == {"spatial": 2, "temporal": 3}
    _, feats = planted_features
    cell = {"gradient_weight": 0.5, "latency_jitter": 0.0}
    seeds = divergence.calibration_seeds(2)
    shipped = pd.DataFrame([{"contrast": c, "truth": "backprop", "seed": s, **cell,
                             "estimate": name, "value": 0.5}
                            for c, name in (("spatial", SPATIAL), ("temporal", TEMPORAL))
                            for s in seeds])
    made = []

    def one_study(features, contrast, truth, seed, cell, *rest):
        made.append((contrast, seed))
        return [{"contrast": contrast, "truth": truth, "seed": seed, **cell,
                 "estimate": SPATIAL if contrast == "spatial" else TEMPORAL, "value": -1.0,
                 "strength": 1.0}]
    monkeypatch.setattr(divergence, "_one_study", one_study)
    older = shipped.assign(contrast_version=shipped.contrast.map({"spatial": 2,
                                                                 "temporal": 1}))
    for table, remade in ((older, ["temporal"]), (shipped, ["spatial", "temporal"])):
        monkeypatch.setattr(divergence.calibration, "_shipped_simulations",
                            lambda *a, table=table, **k: table.copy())
        made.clear()
        out = divergence.simulate_family(feats, family=[cell], n_seeds=2,
                                         n_seeds_divergent=0, cache=tmp_path, progress=False)
        assert sorted(made) == [(c, s) for c in remade for s in seeds]
        for contrast in ("spatial", "temporal"):
            values = out[out.contrast == contrast].value
            assert (values == (-1.0 if contrast in remade else 0.5)).all()
    # a table written now records the versions, and all its rows are believed
    written = shipped.assign(contrast_version=shipped.contrast.map(divergence.CONTRAST_VERSION))
    monkeypatch.setattr(divergence.calibration, "_shipped_simulations",
                        lambda *a, **k: written.copy())
    made.clear()
    divergence.simulate_family(feats, family=[cell], n_seeds=2, n_seeds_divergent=0,
                               cache=tmp_path, progress=False)
    assert made == []


def _strength_table(rng, n=60):
    """Cells shaped like the demo's (Methods): a weak backprop whose contrast reaches far
    below 0 and whose gradient strength is low, a middle one centred on 0, a strong one;
    and a partly wrong order at the middle weight's strength with a contrast of -0.42."""
    spec = {0.1: ((-0.4, 0.3), (0.50, 0.65)), 0.5: ((0.0, 0.01), (0.85, 0.95)),
            0.9: ((0.06, 0.03), (2.2, 2.5))}
    rows = []
    for weight, ((mean, sd), (lo, hi)) in spec.items():
        for seed, (v, st) in enumerate(zip(rng.normal(mean, sd, n), rng.uniform(lo, hi, n))):
            rows.append({"contrast": "spatial", "truth": "backprop", "seed": seed,
                         "gradient_weight": weight, "latency_jitter": 0.0,
                         "estimate": SPATIAL, "value": v, "strength": st})
    for seed, (v, st) in enumerate(zip(rng.normal(-0.42, 0.03, 20), rng.uniform(0.9, 1.0, 20))):
        rows.append({"contrast": "spatial", "truth": "partial", "seed": seed,
                     "gradient_weight": 0.5, "latency_jitter": 0.0, "estimate": SPATIAL,
                     "value": v, "strength": st})
    return pd.DataFrame(rows)


def test_the_studys_gradient_strength_chooses_the_cells_it_is_judged_against(rng):
    table = _strength_table(rng)

    def cell(w):
        return table[(table.truth == "backprop") & (table.gradient_weight == w)]

    def p_by_hand(value, weights):
        return max((1 + np.sum(cell(w).value <= value)) / (1 + len(cell(w))) for w in weights)

    # a partly wrong order at the middle strength: against every cell the weak backprop
    # hides it; judged against the weights whose median strengths bracket its own (0.5:
    # median 0.90 <= 0.93; 0.9: median 2.35) it diverges
    blind = divergence.divergence_test({"spatial": -0.42}, table).set_index("contrast")
    assert not blind.at["spatial", "diverges"]
    assert blind.at["spatial", "p_worst"] == pytest.approx(p_by_hand(-0.42, (0.1, 0.5, 0.9)))
    told = divergence.divergence_test({"spatial": -0.42}, table,
                                      strengths={"spatial": 0.93}).set_index("contrast")
    assert told.at["spatial", "diverges"]
    assert told.at["spatial", "p_worst"] == pytest.approx(p_by_hand(-0.42, (0.5, 0.9)))
    assert told.at["spatial", "cells_judged"] == "weight 0.5; weight 0.9"
    said = divergence.summarize(told.reset_index(), divergence.family_rates(table,
                                                                           n_contrasts=1))
    assert ("judged against 2 of the 3 cells, those whose gradient strength brackets the "
            "study's 0.93 (weight 0.5; weight 0.9)") in said
    # a weak backprop (strength 0.6: between the medians of 0.1, 0.575, and 0.5) with the
    # same contrast is not divergent
    weak = divergence.divergence_test({"spatial": -0.42}, table,
                                      strengths={"spatial": 0.6}).set_index("contrast")
    assert not weak.at["spatial", "diverges"]
    assert weak.at["spatial", "cells_judged"] == "weight 0.1; weight 0.5"
    # beyond every cell: the nearest one alone
    far = divergence.divergence_test({"spatial": 0.0}, table,
                                     strengths={"spatial": 9.0}).set_index("contrast")
    assert far.at["spatial", "cells_judged"] == "weight 0.9"
    # strengths that do not rise with the weight locate nothing: every cell is judged
    swapped = table.copy()
    weak, strong = swapped.gradient_weight == 0.1, swapped.gradient_weight == 0.9
    swapped.loc[weak, "strength"], swapped.loc[strong, "strength"] = 2.3, 0.6
    flat = divergence.divergence_test({"spatial": -0.42}, swapped,
                                      strengths={"spatial": 0.93}).set_index("contrast")
    assert flat.at["spatial", "cells_judged"] == "weight 0.1; weight 0.5; weight 0.9"
    # the rates are those of the same rule: each backprop study judged with its own
    # strength stays near alpha; the partial order is found
    rates = divergence.family_rates(table, n_contrasts=1).set_index("what")
    assert rates.at["false divergence, worst cell", "rate"] <= 0.1
    assert rates.at["power vs partial", "rate"] == 1.0
    blind_rates = divergence.family_rates(table.drop(columns="strength"), n_contrasts=1)
    assert blind_rates.set_index("what").at["power vs partial", "rate"] < 0.5


def test_weights_whose_strengths_tie_are_pooled_not_a_reason_to_judge_every_cell(rng):
    """The demo's temporal strengths (Methods): weights 0.1 and 0.25 give strengths alike
    (medians 0.56 and 0.56), and noise put the second's median below the first's. Read
    as "strength does not rise with the weight", every cell was judged, and the weak
    backprop hid every wrong order. Isotonic regression pools the two weights instead:
    a study at the middle strength is judged against the middle and strong cells, one
    at the weak strength against both weak ones."""
    spec = {0.1: ((-0.4, 0.3), (0.50, 0.62)), 0.25: ((-0.05, 0.2), (0.49, 0.61)),
            0.5: ((0.0, 0.01), (0.85, 0.95)), 0.9: ((0.06, 0.03), (2.2, 2.5))}
    rows = [{"contrast": "temporal", "truth": "backprop", "seed": seed, "gradient_weight": w,
             "latency_jitter": 0.0, "estimate": TEMPORAL, "value": v, "strength": st}
            for w, ((mean, sd), (lo, hi)) in spec.items()
            for seed, (v, st) in enumerate(zip(rng.normal(mean, sd, 40),
                                               np.linspace(lo, hi, 40)))]
    table = pd.DataFrame(rows)
    medians = table.groupby("gradient_weight").strength.median()
    assert medians[0.25] < medians[0.1] < medians[0.5] < medians[0.9]   # out of order

    def cell(w):
        return table[table.gradient_weight == w].value

    middle = divergence.divergence_test({"temporal": -0.42}, table,
                                        strengths={"temporal": 0.93}).set_index("contrast")
    assert middle.at["temporal", "cells_judged"] == "weight 0.5; weight 0.9"
    p_by_hand = max((1 + np.sum(cell(w) <= -0.42)) / 41 for w in (0.5, 0.9))
    assert middle.at["temporal", "p_worst"] == pytest.approx(p_by_hand)
    assert middle.at["temporal", "diverges"]
    weak = divergence.divergence_test({"temporal": -0.42}, table,
                                      strengths={"temporal": 0.52}).set_index("contrast")
    assert weak.at["temporal", "cells_judged"] == "weight 0.1; weight 0.25"
    assert not weak.at["temporal", "diverges"]
    # a contrast the table has no studies of (the demo simulates the spatial one only)
    # is not judged, strength or not, and the other still is
    both = divergence.divergence_test({"spatial": -0.42, "temporal": -0.42}, table.assign(
        contrast="spatial", estimate=SPATIAL), strengths={"spatial": 0.93, "temporal": 0.93})
    both = both.set_index("contrast")
    assert np.isnan(both.at["temporal", "p_worst"]) and not both.at["temporal", "diverges"]
    assert both.at["spatial", "diverges"]


def test_gradient_strength_is_the_ratio_of_median_peak_scores_over_reliable_vertices():
    from types import SimpleNamespace

    reliable = np.array([True, True, True, False])
    result = SimpleNamespace(
        signal="gradient (ce)", reliable=reliable,
        best={"activation": {"peak": np.array([0.8, 0.6, np.nan, 5.0])},
              "gradient (ce)": {"peak": np.array([0.2, 0.4, 0.3, 5.0])}})
    # medians over the reliable vertices: gradient 0.3, activation 0.7 (NaN skipped)
    out = divergence.gradient_strength(result)
    assert out["spatial"] == pytest.approx(0.3 / 0.7)
    assert np.isnan(out["temporal"])   # no MEG
    # MEG: the best layer's peak of each signal's course (maximum over layers, NaN
    # layers skipped): 0.12 / 0.3; a study without fMRI still has it
    meg = {"activation": {"peak": np.array([0.1, 0.3, np.nan])},
           "gradient (ce)": {"peak": np.array([0.12, 0.05, 0.02])}}
    out = divergence.gradient_strength(SimpleNamespace(**vars(result), meg=meg))
    assert (out["spatial"], out["temporal"]) == pytest.approx((0.3 / 0.7, 0.12 / 0.3))
    out = divergence.gradient_strength(SimpleNamespace(signal="gradient (ce)", best=None,
                                                       reliable=None, meg=meg))
    assert np.isnan(out["spatial"]) and out["temporal"] == pytest.approx(0.4)
    # an activation course that never rises above 0 locates nothing
    flat = {**meg, "activation": {"peak": np.array([-0.1, 0.0, np.nan])}}
    assert np.isnan(divergence.gradient_strength(SimpleNamespace(
        signal="gradient (ce)", best=None, reliable=None, meg=flat))["temporal"])
    assert np.isnan(divergence.gradient_strength(SimpleNamespace(best=None, reliable=None,
                                                                 signal="g"))["spatial"])
