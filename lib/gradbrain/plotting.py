"""Figures of the book (matplotlib + seaborn; every axis labelled, with units)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from ._utils import signal_name
from .data.geometry import HEMIS, fsaverage5
from .hierarchy import ESTIMATES, VERDICT_BACKPROP

__all__ = [
    "show_images", "plot_layer_norms", "plot_backward_order", "plot_cka", "plot_decoding",
]


#: Views of the cortical surface that :func:`plot_surface` draws (nilearn's).
SURFACE_VIEWS = ("lateral", "medial", "dorsal", "ventral", "anterior", "posterior")


def _check_table(name: str, table, columns, source: str) -> None:
    """A non-empty DataFrame with ``columns``, or one error naming what is missing."""
    if not isinstance(table, pd.DataFrame) or table.empty:
        got = "an empty table" if isinstance(table, pd.DataFrame) else type(table).__name__
        raise ValueError(f"'{name}' must be a non-empty table from {source}; got {got}.")
    missing = [c for c in columns if c not in table]
    if missing:
        raise ValueError(f"'{name}' lacks the column(s) {missing}: give the table of {source}.")


def show_images(image_set, n: int = 24, *, columns: int = 8, size: float = 1.4):
    """Grid of the first ``n`` stimuli with their category labels.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"'n' must be a positive integer (images to show); got {n!r}. e.g. n=24")
    n = min(n, len(image_set))
    rows = int(np.ceil(n / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * size, rows * (size + 0.25)))
    for ax in np.atleast_1d(axes).ravel():
        ax.axis("off")
    for i, ax in zip(range(n), np.atleast_1d(axes).ravel()):
        ax.imshow(image_set.images[i])
        ax.set_title(image_set.labels[i] or image_set.ids[i], fontsize=8)
    fig.tight_layout()
    return fig


def _depth_panels(table: pd.DataFrame, *, panel: str, y: str, hue: str, ylabel: str,
                  legend_title: str, xlabel: str = "relative layer depth (0 = first block, 1 = last)",
                  sharey: bool = False, palette=None, width: float = 5.2):
    """One panel per value of ``panel``: ``y`` against layer depth, a line per ``hue``."""
    names = list(dict.fromkeys(table[panel]))
    fig, axes = plt.subplots(1, len(names), figsize=(width * len(names), 3.8), squeeze=False,
                             sharey=sharey)
    for ax, name in zip(axes[0], names):
        sns.lineplot(data=table[table[panel] == name], x="depth", y=y, hue=hue, marker="o",
                     palette=palette, ax=ax)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(name)
        ax.legend(title=legend_title, fontsize=8)
    return fig, axes[0]


def plot_layer_norms(table: pd.DataFrame):
    """Mean L2 norm per image of activations and gradients, by layer depth.

    Parameters
    ----------
    table : DataFrame
        Columns ``model``, ``depth``, ``signal`` (e.g. "activation", "gradient (ce)"),
        ``norm``, as returned by :func:`gradbrain.features.norms_table`.
    """
    _check_table("table", table, ("model", "depth", "signal", "norm"),
                 "gradbrain.features.norms_table")
    fig, axes = _depth_panels(table, panel="model", y="norm", hue="signal", legend_title="signal",
                              ylabel="mean L2 norm per image (log scale, a.u.)")
    for ax in axes:
        ax.set_yscale("log")
    fig.tight_layout()
    return fig


def plot_backward_order(orders: dict[str, Sequence[int]]):
    """Measured backward rank of each layer against its forward position.

    Parameters
    ----------
    orders : dict of str to sequence of int
        Label (e.g. "model — loss") → backward rank per layer in forward order
        (0 = gradient produced first), as :meth:`Features.backward_rank` returns.
        Both axes are normalised to [0, 1] so models of any depth share the plot.
    """
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    markers = "osD^v<>"
    for i, (label, ranks) in enumerate(orders.items()):
        ranks = np.asarray(ranks)
        forward = np.arange(len(ranks))
        ax.plot(forward / max(len(ranks) - 1, 1), ranks / max(len(ranks) - 1, 1),
                markers[i % len(markers)], label=label, alpha=0.8, ms=6 - i)
    ax.plot([0, 1], [1, 0], "k--", lw=1, label="exact reverse order")
    ax.set_xlabel("forward position (relative depth)")
    ax.set_ylabel("backward rank (0 = gradient produced first)")
    ax.set_title("Order in which autograd produced each layer's gradient")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_cka(matrices: dict[str, np.ndarray], *, xlabel: str, ylabel: str):
    """Heat maps of layer × layer similarity (e.g. linear CKA), one panel per entry.

    Parameters
    ----------
    matrices : dict of str to ndarray of shape (n_layers_rows, n_layers_cols)
        Panel title → matrix; rows are drawn bottom-up from the first layer.
    """
    fig, axes = plt.subplots(1, len(matrices), figsize=(5.6 * len(matrices), 4.8), squeeze=False)
    for ax, (title, matrix) in zip(axes[0], matrices.items()):
        sns.heatmap(matrix, ax=ax, vmin=0, vmax=1, cmap="viridis", square=True,
                    cbar_kws={"label": "linear CKA"})
        ax.invert_yaxis()
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_decoding(table: pd.DataFrame, *, chance: float | None = None):
    """Decoding accuracy by layer depth, per model and signal.

    Parameters
    ----------
    table : DataFrame
        Columns ``model``, ``depth``, ``signal``, ``accuracy``.
    chance : float or None
        Chance accuracy drawn as a dotted line.
    """
    fig, axes = _depth_panels(table, panel="model", y="accuracy", hue="signal",
                              legend_title="signal", sharey=True,
                              ylabel="decoding accuracy (cross-validated)")
    for ax in axes:
        if chance is not None:
            ax.axhline(chance, color="grey", ls=":", lw=1, label="chance")
            ax.legend(title="signal", fontsize=8)
        ax.set_ylim(0, 1)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- brain data


def _full_hemisphere(study, values: np.ndarray, hemi: str, n_vertices: int) -> np.ndarray:
    """One hemisphere's values on fsaverage5. A study on full fsaverage shows its first
    10,242 vertices, which are fsaverage5's (the NSD loader checks it)."""
    if study.mesh not in ("fsaverage5", "fsaverage"):
        raise ValueError(f"Surface plots need a study on fsaverage5 or fsaverage; this one "
                         f"is on {study.mesh!r}.")
    out = np.full(n_vertices, np.nan)
    where = (study.hemi == hemi) & (study.vertices < n_vertices)
    out[study.vertices[where]] = values[where]
    return out


def plot_surface(study, values: np.ndarray, *, label: str, title: str | None = None,
                 cmap: str = "viridis", vmin: float | None = None, vmax: float | None = None,
                 views: Sequence[str] = ("posterior", "lateral", "ventral")):
    """Per-vertex values on the inflated fsaverage5 surface, both hemispheres (nilearn).

    A study on full fsaverage (NSD at ``resolution="fsaverage"``) is drawn at its
    fsaverage5 vertices (nilearn ships fsaverage5 only).

    Parameters
    ----------
    study : Study
        Gives the vertices and hemispheres of ``values``.
    values : ndarray of shape (n_vertices,)
        One value per study vertex; other vertices are left blank (sulcal depth shows).
    label : str
        Colour-bar label, with units.
    views : sequence of str
        nilearn views, one column of panels each (rows: the hemispheres), so that the
        figure is wide and short and fits a page's width.
    """
    from nilearn import plotting as nplot

    values = np.asarray(values, dtype=float)
    if values.shape != (study.n_vertices,):
        raise ValueError(f"'values' must hold one value per study vertex, shape "
                         f"({study.n_vertices},); got {values.shape}.")
    views = [views] if isinstance(views, str) else list(views)
    unknown = sorted(set(views) - set(SURFACE_VIEWS))
    if not views or unknown:
        raise ValueError(f"'views' must be a non-empty list of {list(SURFACE_VIEWS)}; got "
                         f"{views!r}. e.g. views=['posterior', 'lateral']")
    mesh = fsaverage5()["nilearn"]
    sulc = fsaverage5()["sulc"]
    vmin = np.nanmin(values) if vmin is None else vmin
    vmax = np.nanmax(values) if vmax is None else vmax
    fig, axes = plt.subplots(len(HEMIS), len(views), figsize=(3.0 * len(views) + 1.2, 5.0),
                             subplot_kw={"projection": "3d"}, squeeze=False)
    fig.subplots_adjust(left=0, right=0.86, bottom=0, top=0.88, wspace=0, hspace=0.08)
    for col, view in enumerate(views):
        for row, hemi in enumerate(HEMIS):
            coords = mesh["inflated"].parts[hemi]
            data = _full_hemisphere(study, values, hemi, coords.n_vertices)
            nplot.plot_surf_stat_map(
                surf_mesh=(coords.coordinates, coords.faces), stat_map=data, bg_map=sulc[hemi],
                hemi=hemi, view=view, cmap=cmap, colorbar=False, vmin=vmin, vmax=vmax,
                symmetric_cbar=False, axes=axes[row, col], figure=fig, bg_on_data=True,
            )
            axes[row, col].set_title(f"{hemi}, {view}", fontsize=9)
    mappable = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(vmin, vmax))
    fig.colorbar(mappable, cax=fig.add_axes([0.89, 0.2, 0.02, 0.6]), label=label)
    if title:
        fig.suptitle(title)
    return fig


def plot_noise_ceiling(study, n_repeats: int | None = None):
    """Histogram of the noise ceiling (percent variance) across vertices, by hemisphere."""
    nc = study.noise_ceiling(n_repeats)
    table = pd.DataFrame({"noise ceiling (% variance)": nc, "hemisphere": study.hemi})
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    sns.histplot(data=table, x="noise ceiling (% variance)", hue="hemisphere", bins=30,
                 element="step", ax=ax)
    ax.set_ylabel("number of vertices")
    n = n_repeats or study.betas.shape[1]
    ax.set_title(f"Noise ceiling of the mean of {n} repeats")
    fig.tight_layout()
    return fig


def plot_planted_latencies(truth: dict):
    """Planted MEG peak latencies of activations and gradients against layer depth."""
    depth = np.asarray(truth["depth"])
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    ax.plot(depth, truth["activation_latency"], "o-", label="activation")
    if np.isfinite(truth["gradient_latency"]).any():
        ax.plot(depth, truth["gradient_latency"], "s--", label=signal_name(truth["gradient_loss"]))
    ax.set_xlabel("relative layer depth (0 = first block, 1 = last)")
    ax.set_ylabel("planted peak latency (ms after image onset)")
    ax.set_title(f"Planted MEG latencies — gradient truth '{truth['gradient_truth']}'")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_layer_profiles(table: pd.DataFrame, *, ylabel: str = "encoding score (r / √NC)"):
    """Score by layer depth, one line per hierarchy region, one panel per signal.

    Parameters
    ----------
    table : DataFrame
        Columns signal, region, depth, score (see :func:`gradbrain.hierarchy.layer_profiles`).
    """
    fig, _ = _depth_panels(table, panel="signal", y="score", hue="region", ylabel=ylabel,
                           legend_title="hierarchy region", sharey=True, palette="viridis",
                           xlabel="relative layer depth (0 = first, 1 = last)", width=4.4)
    fig.tight_layout()
    return fig


def plot_score_by_hierarchy(hierarchy: np.ndarray, peaks: dict[str, np.ndarray], *,
                            n_bins: int = 8, ylabel: str = "peak encoding score (r / √NC)",
                            title: str = "Where each signal predicts the brain"):
    """Per-vertex values of each signal against the hierarchy coordinate (binned means ±
    sem); ``peaks`` maps a legend label to values of shape (n_vertices,)."""
    rows = []
    edges = np.quantile(hierarchy, np.linspace(0, 1, n_bins + 1))
    centres = np.digitize(hierarchy, edges[1:-1])
    mids = np.array([np.median(hierarchy[centres == b]) for b in range(n_bins)])
    for signal, values in peaks.items():
        for b in range(n_bins):
            for value in values[centres == b]:
                rows.append({"signal": signal, "distance from V1 (mm)": mids[b], "score": value})
    table = pd.DataFrame(rows)
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    sns.lineplot(data=table, x="distance from V1 (mm)", y="score", hue="signal", marker="o",
                 errorbar="se", ax=ax)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def _lines_with_intervals(tables: dict, *, x: str, y: str, source: str, xlabel: str,
                          ylabel: str, title: str, marker: str, reference, figsize):
    """One line per table (``y`` against ``x``) with its ``low``–``high`` band."""
    if not tables:
        raise ValueError("'tables' is empty: give at least one contrast table.")
    fig, ax = plt.subplots(figsize=figsize)
    for i, (label, table) in enumerate(tables.items()):
        _check_table("tables", table, (x, y, "low", "high"), source)
        colour = sns.color_palette()[i % 10]
        ax.plot(table[x], table[y], marker, color=colour, label=label)
        ax.fill_between(table[x], table["low"], table["high"], color=colour, alpha=0.2,
                        linewidth=0)
    reference(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small", frameon=False)
    fig.tight_layout()
    return fig


def plot_contrast_by_hierarchy(tables: dict[str, pd.DataFrame], *, ylabel: str,
                               title: str):
    """Binned contrasts along the hierarchy with their intervals, one line per source.

    ``tables`` maps a legend label (e.g. "activation encoder", "planted") to the output
    of :func:`gradbrain.insilico.contrast_by_hierarchy`.
    """
    return _lines_with_intervals(
        tables, x="distance_mm", y="difference",
        source="gradbrain.insilico.contrast_by_hierarchy",
        xlabel="distance from V1 (mm, median of each bin)", ylabel=ylabel, title=title,
        marker="o-", reference=lambda ax: ax.axhline(0, color="0.5", lw=0.8),
        figsize=(6.2, 3.9))


def plot_contrast_over_time(tables: dict[str, pd.DataFrame], *, ylabel: str, title: str):
    """MEG contrast sizes over time with their intervals, one line per source (outputs
    of :func:`gradbrain.insilico.contrast_over_time`)."""
    return _lines_with_intervals(
        tables, x="time_ms", y="rms", source="gradbrain.insilico.contrast_over_time",
        xlabel="time from image onset (ms)", ylabel=ylabel, title=title, marker="-",
        reference=lambda ax: ax.axvline(0, color="0.5", lw=0.8), figsize=(6.2, 3.6))


def plot_preferred_response(natural: dict[str, np.ndarray], synthesized: dict[str, float], *,
                            xlabel: str, title: str):
    """Distribution of a response over natural images (histograms), with the response
    to a synthesized image marked, per panel label."""
    if not natural:
        raise ValueError("'natural' is empty: give at least one panel.")
    fig, axes = plt.subplots(1, len(natural), figsize=(3.3 * len(natural), 2.9), squeeze=False)
    for ax, (label, values) in zip(axes[0], natural.items()):
        sns.histplot(np.asarray(values, float), ax=ax, color="0.6", bins=15)
        if label in synthesized:
            ax.axvline(synthesized[label], color="crimson", lw=2, label="synthesized")
        ax.axvline(np.median(values), color="0.2", ls="--", lw=1, label="natural median")
        ax.set_title(label, fontsize="small")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("natural images")
    axes[0][0].legend(fontsize="x-small", frameon=False)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- MEG


def _depth_colours(depth: np.ndarray):
    cmap = plt.get_cmap("viridis")
    return cmap, [cmap(float(d)) for d in depth]


def plot_time_courses(results: dict, *, ylabel: str = "encoding r (mean over sensors)"):
    """Score time course of every layer, coloured by depth, one panel per signal.

    Parameters
    ----------
    results : dict
        Output of :func:`gradbrain.analysis.encoding.meg_encoding` (``times`` in ms, ``curve``
        (n_layers, n_times), ``depth``); a signal with a ``prestimulus`` bound (float)
        gets that range, ± the bound, shaded grey.
    """
    signals = list(results)
    if not signals:
        raise ValueError("'results' is empty: give meg_encoding's output (signal → its "
                         "time courses).")
    fig, axes = plt.subplots(1, len(signals), figsize=(4.6 * len(signals), 3.6), sharey=True,
                             squeeze=False)
    for ax, signal in zip(axes[0], signals):
        res = results[signal]
        cmap, colours = _depth_colours(res["depth"])
        for curve, colour in zip(res["curve"], colours):
            ax.plot(res["times"], curve, color=colour, lw=1.2)
        bound = res.get("prestimulus", np.nan)
        if np.isfinite(bound):
            ax.axhspan(-bound, bound, color="0.85", zorder=0, label="pre-stimulus range")
            ax.legend(frameon=False, fontsize=8, loc="upper right")
        ax.axvline(0, color="0.6", lw=0.8, ls=":")
        ax.axhline(0, color="0.6", lw=0.8)
        ax.set_xlabel("time after image onset (ms)")
        ax.set_title(signal)
    axes[0, 0].set_ylabel(ylabel)
    mappable = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, 1))
    fig.colorbar(mappable, ax=axes[0].tolist(), label="relative layer depth", fraction=0.03)
    return fig


def plot_best_courses(results: dict, *, ylabel: str = "best layer's r (mean over sensors)"):
    """Each signal's best-layer score over time, with the times it is above chance.

    Parameters
    ----------
    results : dict
        Output of :func:`gradbrain.analysis.encoding.meg_encoding` (``times`` ms, ``best_curve`` and
        ``significant_time`` (n_times,)).
    """
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    palette = sns.color_palette("colorblind", len(results))
    low = min(float(np.min(res["best_curve"])) for res in results.values())
    high = max(float(np.max(res["best_curve"])) for res in results.values())
    step = 0.04 * (high - low or 1.0)
    for i, (signal, res) in enumerate(results.items()):
        ax.plot(res["times"], res["best_curve"], color=palette[i], lw=1.5, label=signal)
        times = np.asarray(res["times"], float)
        half = np.median(np.diff(times)) / 2 if len(times) > 1 else 1.0
        found = times[np.asarray(res["significant_time"], bool)]
        ax.hlines(np.full(len(found), low - (i + 1) * step), found - half, found + half,
                  color=palette[i], lw=4)   # one segment per significant time point
    ax.axvline(0, color="0.6", lw=0.8, ls=":")
    ax.axhline(0, color="0.6", lw=0.8)
    ax.set_xlabel("time after image onset (ms)")
    ax.set_ylabel(ylabel)
    ax.set_title("bars: above chance (max over layers vs shuffled images, FDR over time)")
    ax.legend(frameon=False, fontsize=8)
    return fig


def plot_latencies(results: dict, *, prediction: np.ndarray | None = None,
                   truth: dict | None = None):
    """Peak latency against layer depth, with bootstrap intervals, for every signal.

    Parameters
    ----------
    results : dict
        Output of :func:`gradbrain.analysis.encoding.meg_encoding`.
    prediction : ndarray of shape (n_layers,), optional
        Latencies a biological backprop predicts for gradients (ms), drawn dashed
        (see :func:`gradbrain.hierarchy.backprop_latency_prediction`).
    truth : dict, optional
        A simulated study's truth: planted latencies drawn as crosses.
    """
    fig, ax = plt.subplots(figsize=(8.4, 4.2))
    palette = sns.color_palette("deep", len(results))
    for colour, (signal, res) in zip(palette, results.items()):
        latency, ci = res["latency"], res["latency_ci"]
        # percentile intervals need not contain the estimate (discrete peak times), so
        # they are drawn as segments rather than as error bars around the point
        ax.vlines(res["depth"], ci[:, 0], ci[:, 1], color=colour, lw=1.2, alpha=0.8)
        ax.plot(res["depth"], latency, "o-", color=colour, lw=1.2, ms=4,
                label=f"{signal} (95 % bootstrap CI)")
    depth = next(iter(results.values()))["depth"]
    if prediction is not None:
        ax.plot(depth, prediction, "k--", lw=1.2, label="backprop prediction for gradients")
    if truth:
        ax.plot(depth, truth["activation_latency"], "x", color=palette[0], ms=7,
                label="planted (activation)")
        if np.isfinite(truth.get("gradient_latency", [np.nan])).any():
            ax.plot(depth, truth["gradient_latency"], "x", color="0.3", ms=7,
                    label="planted (gradient)")
    ax.set_xlabel("relative layer depth (0 = first, 1 = last)")
    ax.set_ylabel("peak latency (ms after image onset)")
    ax.set_title("When each layer best predicts the MEG")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False)
    fig.tight_layout()
    return fig


def plot_topomaps(r: np.ndarray, info, times: np.ndarray, layers: Sequence[int],
                  latencies: np.ndarray, *, names: Sequence[str], title: str):
    """Sensor maps of the encoding r of some layers, each at its own peak latency.

    Parameters
    ----------
    r : ndarray of shape (n_layers, n_channels, n_times)
    info : mne.Info
        Sensor positions (CTF-275 layout).
    times : ndarray of shape (n_times,)
        ms.
    layers : sequence of int
        Which layers to draw.
    latencies : ndarray of shape (n_layers,)
        ms; each map is drawn at the sample nearest its layer's latency. Layers without
        one (NaN: no significant peak) are skipped; with none left, None is returned.
    names : sequence of str
        Layer names (length n_layers).
    """
    import mne

    layers = [l for l in layers if np.isfinite(latencies[l])]
    if not layers:  # no layer peaks above chance: there is no latency to draw at
        return None
    fig, axes = plt.subplots(1, len(layers), figsize=(2.6 * len(layers) + 0.8, 2.9),
                             squeeze=False)
    maps = [r[l][:, int(np.argmin(np.abs(times - latencies[l])))] for l in layers]
    vmax = max(float(np.max(np.abs(m))) for m in maps) or 1.0
    image = None
    for ax, l, values in zip(axes[0], layers, maps):
        image, _ = mne.viz.plot_topomap(values, info, axes=ax, show=False, cmap="RdBu_r",
                                        vlim=(-vmax, vmax), contours=0)
        ax.set_title(f"{names[l]}\n{latencies[l]:.0f} ms", fontsize=9)
    fig.colorbar(image, ax=axes[0].tolist(), label="encoding r", fraction=0.03)
    fig.suptitle(title, fontsize=10)
    return fig


def plot_category_decoding(times: np.ndarray, accuracy: np.ndarray, chance: float, *,
                           n_categories: int):
    """Category decoding accuracy over time, with chance level."""
    fig, ax = plt.subplots(figsize=(5.8, 3.4))
    ax.plot(times, 100 * np.asarray(accuracy), color="C3", lw=1.5, label="test images")
    ax.axhline(100 * chance, color="0.4", ls="--", lw=1, label=f"chance (1/{n_categories})")
    ax.axvline(0, color="0.6", lw=0.8, ls=":")
    ax.set_xlabel("time after image onset (ms)")
    ax.set_ylabel("decoding accuracy (%)")
    ax.set_title("Decoding the image category from the sensors")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- hierarchy tests


def plot_hierarchy_scores(scores: pd.DataFrame):
    """Spatial and temporal scores (Spearman) of every signal, with their p-values.

    Parameters
    ----------
    scores : DataFrame
        :attr:`gradbrain.hierarchy.HierarchyResult.scores` (columns modality, signal,
        score, spearman, p_spearman; bootstrap intervals drawn when ``spearman_ci_low``
        and ``spearman_ci_high`` are there).
    """
    panels = list(scores.groupby("score", sort=False))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    titles = {"spatial": "Spatial score (fMRI)\nbest-layer depth vs distance from V1",
              "temporal": "Temporal score (MEG)\npeak latency vs layer depth"}
    for ax, (kind, table) in zip(axes[0], panels):
        colours = sns.color_palette("deep", len(table))
        ax.bar(table["signal"], table["spearman"], color=colours)
        if {"spearman_ci_low", "spearman_ci_high"} <= set(table):
            # percentile intervals need not contain the estimate: drawn as segments
            ax.vlines(np.arange(len(table)), table["spearman_ci_low"],
                      table["spearman_ci_high"], color="0.15", lw=1.2)
        for i, (value, p) in enumerate(zip(table["spearman"], table["p_spearman"])):
            ax.text(i + 0.08, value + (0.03 if value >= 0 else -0.03), f"p = {p:.2g}",
                    ha="left", va="bottom" if value >= 0 else "top", fontsize=8)
        ax.axhline(0, color="0.3", lw=0.8)
        ax.set_ylim(-1.1, 1.1)
        ax.set_ylabel("Spearman ρ")
        ax.set_title(titles.get(kind, kind), fontsize=10)
    fig.tight_layout()
    return fig


def plot_best_depth_by_hierarchy(hierarchy: np.ndarray, best: dict, masks: dict, *,
                                 n_bins: int = 8):
    """Best-layer depth of each signal against distance from V1 (binned means ± sem)."""
    edges = np.quantile(hierarchy, np.linspace(0, 1, n_bins + 1))
    bins = np.digitize(hierarchy, edges[1:-1])
    mids = np.array([np.median(hierarchy[bins == b]) for b in range(n_bins)])
    rows = [{"signal": signal, "distance from V1 (mm)": mids[b], "depth": d}
            for signal, b_ in best.items()
            for b, d in zip(bins[masks[signal]], b_["depth"][masks[signal]])]
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    sns.lineplot(data=pd.DataFrame(rows), x="distance from V1 (mm)", y="depth", hue="signal",
                 marker="o", errorbar="se", ax=ax)
    ax.set_ylabel("best layer depth (0 = first, 1 = last)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Does the best layer deepen along the hierarchy?")
    fig.tight_layout()
    return fig


def plot_model_comparison(table: pd.DataFrame):
    """Spatial and temporal scores of every model, activations vs gradients.

    Parameters
    ----------
    table : DataFrame
        Output of :func:`gradbrain.compare.run`.
    """
    _check_table("table", table, ("model", "feature", "loss", "trained"),
                 "gradbrain.compare.run")
    table = table.assign(
        signal=[signal_name(None if feature == "activation" else str(loss))
                for feature, loss in zip(table["feature"], table["loss"])],
        label=table["model"] + np.where(table["trained"], "", "\n(random init)"),
    )
    panels = [c for c in ("spatial", "temporal") if c in table]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.8), squeeze=False)
    titles = {"spatial": "Spatial score (fMRI)", "temporal": "Temporal score (MEG)"}
    for ax, column in zip(axes[0], panels):
        sns.barplot(data=table, x="label", y=column, hue="signal", ax=ax, palette="deep")
        if f"{column}_ci_low" in table:  # bootstrap intervals, matched to bars by label
            labels = [t.get_text() for t in ax.get_xticklabels()]
            ci = table.set_index(["label", "signal"])[[f"{column}_ci_low",
                                                       f"{column}_ci_high"]]
            for patch_group, signal in zip(ax.containers, table["signal"].unique()):
                for patch, label in zip(patch_group, labels):
                    if (label, signal) in ci.index:
                        x = patch.get_x() + patch.get_width() / 2
                        ax.plot([x, x], ci.loc[(label, signal)].to_numpy(float), color="0.2",
                                lw=1)
        ax.axhline(0, color="0.3", lw=0.8)
        ax.set_ylim(-1.1, 1.1)
        ax.set_xlabel("")
        ax.set_ylabel("Spearman ρ")
        ax.set_title(titles[column])
        ax.legend(fontsize=8, title=None)
    fig.tight_layout()
    return fig


def plot_error_rates(rates: pd.DataFrame, *, alpha: float | None = None, label: str = ""):
    """How often each hierarchy test held under each planted truth (a heat map).

    Parameters
    ----------
    rates : DataFrame
        :func:`gradbrain.hierarchy.error_rates` (its ``held_<truth>`` columns, and per
        test its ``null_truths`` and ``power_truth``).
    alpha : float or None
        The tests' level, quoted in the title.
    label : str
        Which decisions these are (e.g. ``"nominal nulls"``), put first in the title.

    Returns
    -------
    Figure. Cells where the test should fail (its null truths) are outlined in red, the
    cell where it should hold (its power truth) in black.
    """
    estimates = {name for name, _, _ in ESTIMATES.values()}
    truths = [c.removeprefix("held_") for c in rates.columns if c.startswith("held_")]
    matrix = rates[[f"held_{t}" for t in truths]].to_numpy(float)
    # an estimate's row is its equivalence decision ("equivalent to backprop")
    names = [f"equivalent — {part}" if part in estimates else part for part in rates.part]
    fig, ax = plt.subplots(figsize=(3.0 + 1.5 * len(truths), 0.55 * len(rates) + 1.6))
    sns.heatmap(matrix, ax=ax, vmin=0, vmax=1, cmap="magma", annot=True, fmt=".2f",
                xticklabels=truths, yticklabels=names,
                cbar_kws={"label": "fraction of simulated studies in which it held"})
    for i, row in enumerate(rates.itertuples()):
        for j, truth in enumerate(truths):
            if truth in row.null_truths.split(", "):
                colour = "tab:red"
            elif truth == row.power_truth:
                colour = "black"
            else:
                continue
            ax.add_patch(plt.Rectangle((j + 0.04, i + 0.04), 0.92, 0.92, fill=False, lw=2,
                                       edgecolor=colour))
    ax.set_xlabel("planted gradient truth of the simulated studies")
    ax.set_ylabel("test")
    level = f" at α = {alpha}" if alpha is not None else ""
    ax.set_title(f"{label + ': ' if label else ''}tests that held{level}\n(red: should fail, "
                 "false positives; black: should hold, power)", fontsize=9)
    fig.tight_layout()
    return fig


def plot_rates_forest(rates: dict, *, alpha: float | None = None, target_power: float = 0.8):
    """Each test's false-positive rate and power with their intervals, side by side for
    several decision rules (a forest plot).

    Parameters
    ----------
    rates : dict of str to DataFrame
        Rule label (e.g. ``"nominal nulls"``) → :func:`gradbrain.hierarchy.error_rates`
        under that rule (``part``, ``fpr``, ``fpr_low``, ``fpr_high``, ``power``,
        ``power_low``, ``power_high``); the tests of the first table are drawn, in its order.
    alpha : float or None
        The tests' level: a dashed line on every panel (what a false-positive rate
        should stay below).
    target_power : float
        A dotted line: the power a study should reach.

    Returns
    -------
    Figure: one panel per rule; per test a red dot (false-positive rate, pooled over its
    null truths) and a black dot (power under its power truth), each with its 95 %
    Wilson interval.
    """
    if not rates:
        raise ValueError("'rates' is empty: give at least one rule label → error_rates table.")
    for label, table in rates.items():
        _check_table(f"rates[{label!r}]", table, ("part", "fpr", "fpr_low", "fpr_high", "power",
                                                "power_low", "power_high"),
                     "gradbrain.hierarchy.error_rates")
    estimates = {name for name, _, _ in ESTIMATES.values()}
    parts = list(next(iter(rates.values())).part)
    names = [f"equivalent — {part}" if part in estimates else part for part in parts]
    y = np.arange(len(parts))
    fig, axes = plt.subplots(1, len(rates), figsize=(3.4 * len(rates) + 3.2,
                                                    0.42 * len(parts) + 1.5),
                             sharey=True, squeeze=False)
    for ax, (label, table) in zip(axes[0], rates.items()):
        table = table.set_index("part").reindex(parts)
        for column, colour, offset, what in (("fpr", "tab:red", -0.14, "false-positive rate"),
                                             ("power", "black", 0.14, "power")):
            value = table[column].to_numpy(float)
            low = value - table[f"{column}_low"].to_numpy(float)
            high = table[f"{column}_high"].to_numpy(float) - value
            ax.errorbar(value, y + offset, xerr=[low, high], fmt="o", color=colour, ms=4,
                        capsize=2, label=what)
        if alpha is not None:
            ax.axvline(alpha, color="tab:red", ls="--", lw=1, label=f"α = {alpha:g}")
        ax.axvline(target_power, color="grey", ls=":", lw=1,
                   label=f"power {target_power:.0%}")
        ax.set_xlim(-0.03, 1.03)
        ax.set_xlabel("share of simulated studies")
        ax.set_title(label, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0, 0].set_yticks(y, names)
    axes[0, 0].invert_yaxis()
    axes[0, -1].legend(fontsize=7, loc="lower right", framealpha=0.9)
    fig.suptitle("How often each test held where it should not (red) and where it should "
                 "(black)", fontsize=10)
    fig.tight_layout()
    return fig


#: The planted truths of the four worlds, in the order the figure draws them.
WORLDS = ("none", "forward", "backprop", "paper")


def plot_four_worlds(simulated: pd.DataFrame, study_tests: pd.DataFrame | None = None, *,
                     columns: int = 3):
    """Each test's statistic in studies simulated under each planted truth — the four
    worlds — with this study's value beside them.

    Parameters
    ----------
    simulated : DataFrame
        :func:`gradbrain.analysis.simulation.simulate_tests`'s rows (``truth``,
        ``prediction``, ``part``, ``value``); its estimate and verdict rows are left out.
    study_tests : DataFrame or None
        The study's own tests (``HierarchyResult.tests``: ``part``, ``value`` and
        ``statistic``, which labels each panel's axis); None: the worlds alone.
    columns : int
        Panels per row.

    Returns
    -------
    Figure: one panel per test; per world (planted truth: ``none``, ``forward``,
    ``backprop``, ``paper``, as simulated) its studies' values (dots) and their spread
    (box: quartiles, whiskers to 1.5 IQR); this study's value as a vertical line. Which
    world's cloud holds the line in every panel is which world the study looks like.
    """
    _check_table("simulated", simulated, ("truth", "prediction", "part", "value"),
                 "gradbrain.analysis.simulation.simulate_tests")
    if isinstance(columns, bool) or not isinstance(columns, (int, np.integer)) or columns < 1:
        raise ValueError(f"'columns' must be a positive integer; got {columns!r}.")
    tests = simulated[~simulated.prediction.isin(("estimate", "verdict"))]
    if tests.empty:
        raise ValueError("'simulated' holds no test rows (only estimates or verdicts).")
    parts = list(dict.fromkeys(tests.part))
    labels, values = {}, {}
    if study_tests is not None:
        _check_table("study_tests", study_tests, ("part", "value"),
                     "HierarchyResult.tests")
        mine = study_tests[study_tests.part.isin(parts)]
        parts = list(mine.part) + [p for p in parts if p not in set(mine.part)]
        values = dict(zip(mine.part, mine.value.astype(float)))
        if "statistic" in mine:
            labels = dict(zip(mine.part, mine.statistic.astype(str)))
    worlds = [w for w in WORLDS if w in set(tests.truth)] + sorted(
        set(tests.truth) - set(WORLDS))
    rows = int(np.ceil(len(parts) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 0.45 * len(worlds) * rows
                                                     + 1.2 * rows + 0.6), squeeze=False)
    palette = dict(zip(worlds, sns.color_palette("colorblind", len(worlds))))
    for ax, part in zip(axes.ravel(), parts):
        data = tests[tests.part == part].dropna(subset=["value"])
        if data.empty:
            ax.text(0.5, 0.5, "no finite values", ha="center", va="center",
                    transform=ax.transAxes)
        else:
            sns.boxplot(data=data, x="value", y="truth", order=worlds, ax=ax, fill=False,
                        showfliers=False, width=0.55, color="0.35", linewidth=0.9)
            sns.stripplot(data=data, x="value", y="truth", order=worlds, ax=ax, hue="truth",
                          palette=palette, legend=False, size=3, alpha=0.65, jitter=0.2)
        if np.isfinite(values.get(part, np.nan)):
            ax.axvline(values[part], color="black", lw=1.6, ls="--", label="this study")
        ax.set_title(textwrap.fill(part, 44), fontsize=9, loc="left")
        ax.set_xlabel(labels.get(part, "statistic"), fontsize=8)
        ax.set_ylabel("planted truth" if ax in axes[:, 0] else "")
        ax.tick_params(labelsize=8)
        ax.grid(axis="x", alpha=0.3)
    for ax in axes.ravel()[len(parts):]:
        ax.set_visible(False)
    n = tests.groupby("truth").seed.nunique() if "seed" in tests else None
    said = (", ".join(f"{w} {int(n[w])}" for w in worlds) if n is not None else "")
    fig.suptitle("Each test in the four worlds (studies simulated under each planted truth"
                 + (f": {said}" if said else "") + ")", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97 if values else 1))
    if values:
        fig.legend(handles=[plt.Line2D([], [], color="black", lw=1.6, ls="--")],
                   labels=["this study"], loc="upper right", fontsize=8, frameon=False)
    return fig


def plot_power_curve(table: pd.DataFrame, *, part: str | None = None,
                     alpha: float | None = None):
    """Power and false-positive rate of a test against the number of images, per noise level.

    Parameters
    ----------
    table : DataFrame
        :func:`gradbrain.hierarchy.power_curve` (or its shipped copy,
        :func:`gradbrain.hierarchy.read_power_curve`).
    part : str or None
        The test or verdict drawn; default the verdict "consistent with backprop".
    alpha : float or None
        The tests' level: drawn as a dashed line on the false-positive panels.

    Returns
    -------
    Figure: columns = the models' weights; top row power (under a planted backprop),
    bottom row false-positive rate (under the truths where the prediction is false);
    one line per noise level, Wilson 95 % intervals as error bars.
    """
    part = VERDICT_BACKPROP if part is None else part
    rows = table[table.part == part]
    if rows.empty:
        raise ValueError(f"The table has no rows for {part!r}; it has "
                         f"{sorted(set(table.part))}.")
    weights = list(dict.fromkeys(rows.weights))
    noises = sorted(set(rows.noise))
    palette = sns.color_palette("viridis", len(noises))
    fig, axes = plt.subplots(2, len(weights), figsize=(3.6 * len(weights) + 0.8, 5.6),
                             sharex=True, sharey=True, squeeze=False)
    for j, name in enumerate(weights):
        for i, (rate, label) in enumerate((("power", "power (held where it should)"),
                                           ("fpr", "false-positive rate"))):
            ax = axes[i, j]
            for colour, noise in zip(palette, noises):
                line = rows[(rows.weights == name) & (rows.noise == noise)].sort_values(
                    "n_images")
                err = np.vstack([line[rate] - line[f"{rate}_low"],
                                 line[f"{rate}_high"] - line[rate]])
                ax.errorbar(line.n_images, line[rate], yerr=err, marker="o", capsize=3,
                            color=colour, label=f"{noise:g}")
            if rate == "fpr" and alpha is not None:
                ax.axhline(alpha, color="grey", ls="--", lw=1)
            ax.set_ylim(-0.03, 1.03)
            if j == 0:
                ax.set_ylabel(label)
            if i == 1:
                ax.set_xlabel("images in the simulated study")
            if i == 0:
                ax.set_title(f"{name} weights", fontsize=10)
    axes[0, -1].legend(title="noise (sd)", fontsize=8, title_fontsize=8, loc="best")
    fig.suptitle(f"{part}: power and false positives against sample size", fontsize=10)
    fig.tight_layout()
    return fig
