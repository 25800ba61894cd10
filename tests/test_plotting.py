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
