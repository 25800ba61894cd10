"""Figures: what a reader needs on them (labels, units, colour bars) and a size that fits
a page (issue 31: surface maps were ~1,300 px tall)."""

import matplotlib
import numpy as np
import pytest

from gradbrain import plotting
from gradbrain.data.simulated import make_study

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def fmri_study():
    return make_study(0, n_images=12, meg=False)


def test_surface_map_is_wide_and_short_with_every_view_and_a_labelled_colour_bar(fmri_study):
    fig = plotting.plot_surface(fmri_study, fmri_study.hierarchy, title="Hierarchy",
                                label="distance from V1 seed (mm)", views=["posterior", "lateral"])
    width, height = fig.get_size_inches()
    assert height <= 5.0 and width >= height          # ~600 px tall at 120 dpi, not 1,300
    panels = [ax for ax in fig.axes if ax.name == "3d"]
    assert sorted(ax.get_title() for ax in panels) == [
        "left, lateral", "left, posterior", "right, lateral", "right, posterior"]
    bars = [ax for ax in fig.axes if ax.name != "3d"]
    assert len(bars) == 1 and bars[0].get_ylabel() == "distance from V1 seed (mm)"
    lo, hi = bars[0].get_ylim()
    assert lo == pytest.approx(np.nanmin(fmri_study.hierarchy)) and hi == pytest.approx(
        np.nanmax(fmri_study.hierarchy))


def test_four_worlds_draws_every_study_of_every_world_and_the_studys_line():
    """Issue 31: each test's statistic in the four worlds, with the reader's study beside
    them. Checked against the table drawn: one panel per test, one dot per simulated
    study per world, the study's value as the dashed line, its statistic as the label."""
    import matplotlib.pyplot as plt
    import pandas as pd

    rng = np.random.default_rng(0)
    parts = ["gradient spatial score > 0", "gradients after the forward sweep"]
    worlds = {"none": 5, "forward": 4, "backprop": 6, "paper": 3}
    rows = [{"truth": w, "seed": s, "prediction": "1 spatial", "part": p,
             "value": rng.normal()} for w, n in worlds.items() for s in range(n) for p in parts]
    rows += [{"truth": "none", "seed": 0, "prediction": "verdict", "part": "verdict: x",
              "value": 1.0}]
    simulated = pd.DataFrame(rows)
    mine = pd.DataFrame({"part": parts[::-1], "value": [0.7, -0.2],
                         "statistic": ["ms", "Spearman ρ"]})
    fig = plotting.plot_four_worlds(simulated, mine, columns=3)
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title(loc="left") for ax in shown] == parts[::-1]   # the study's order
    for ax, (part, value, label) in zip(shown, mine.itertuples(index=False)):
        assert ax.get_xlabel() == label
        assert [t.get_text() for t in ax.get_yticklabels()] == list(worlds)
        dots = [len(c.get_offsets()) for c in ax.collections if len(c.get_offsets())]
        assert dots == list(worlds.values())
        lines = [ln for ln in ax.lines if ln.get_linestyle() == "--"]
        assert len(lines) == 1 and lines[0].get_xdata()[0] == pytest.approx(value)
    assert "this study" in [t.get_text() for t in fig.legends[0].get_texts()]
    plt.close(fig)
    with pytest.raises(ValueError, match="simulate_tests"):
        plotting.plot_four_worlds(simulated.drop(columns="part"))
    with pytest.raises(ValueError, match="no test rows"):
        plotting.plot_four_worlds(simulated[simulated.prediction == "verdict"])
    with pytest.raises(ValueError, match="columns"):
        plotting.plot_four_worlds(simulated, columns=0)
