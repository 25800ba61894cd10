"""Figures of the book (matplotlib + seaborn; every axis labelled, with units)."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

__all__ = [
    "show_images", "plot_layer_norms", "plot_backward_order", "plot_cka", "plot_decoding",
]


def show_images(image_set, n: int = 24, *, columns: int = 8, size: float = 1.4):
    """Grid of the first ``n`` stimuli with their category labels.

    Returns
    -------
    matplotlib.figure.Figure
    """
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


def plot_layer_norms(table: pd.DataFrame, *, ax=None):
    """Mean L2 norm per image of activations and gradients, by layer depth.

    Parameters
    ----------
    table : DataFrame
        Columns ``model``, ``depth``, ``signal`` (e.g. "activation", "gradient (ce)"),
        ``norm``, as returned by :func:`gradbrain.features.norms_table`.
    """
    models = list(dict.fromkeys(table["model"]))
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        sns.lineplot(data=table[table["model"] == model], x="depth", y="norm", hue="signal",
                     marker="o", ax=ax)
        ax.set_yscale("log")
        ax.set_xlabel("relative layer depth (0 = first block, 1 = last)")
        ax.set_ylabel("mean L2 norm per image (log scale, a.u.)")
        ax.set_title(model)
        ax.legend(title="signal", fontsize=8)
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
    models = list(dict.fromkeys(table["model"]))
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 3.8), squeeze=False,
                             sharey=True)
    for ax, model in zip(axes[0], models):
        sns.lineplot(data=table[table["model"] == model], x="depth", y="accuracy", hue="signal",
                     marker="o", ax=ax)
        if chance is not None:
            ax.axhline(chance, color="grey", ls=":", lw=1, label="chance")
        ax.set_xlabel("relative layer depth (0 = first block, 1 = last)")
        ax.set_ylabel("decoding accuracy (cross-validated)")
        ax.set_ylim(0, 1)
        ax.set_title(model)
        ax.legend(title="signal", fontsize=8)
    fig.tight_layout()
    return fig
