"""Brain and sensor geometry that ships offline: fsaverage5 (nilearn), CTF-275 (MNE)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

__all__ = ["fsaverage5", "posterior_vertices", "v1_seed", "distance_from", "ctf_info",
           "THINGS_MEG_EXCLUDED"]

HEMIS = ("left", "right")


@lru_cache(maxsize=1)
def fsaverage5() -> dict:
    """fsaverage5 meshes and sulcal depth, per hemisphere (10,242 vertices each).

    Returns
    -------
    dict with keys ``"pial"``, ``"inflated"`` (dicts hemi → (coordinates (n, 3) mm,
    faces (m, 3))), ``"sulc"`` (dict hemi → (n,)) and ``"nilearn"`` (the
    ``load_fsaverage`` bunch, for plotting).
    """
    from nilearn import datasets

    mesh = datasets.load_fsaverage("fsaverage5")
    sulc = datasets.load_fsaverage_data("fsaverage5", data_type="sulcal")
    out = {"nilearn": mesh, "sulc": {h: np.asarray(sulc.data.parts[h]) for h in HEMIS}}
    for kind in ("pial", "inflated"):
        out[kind] = {
            h: (np.asarray(mesh[kind].parts[h].coordinates), np.asarray(mesh[kind].parts[h].faces))
            for h in HEMIS
        }
    return out


def v1_seed(hemi: str) -> int:
    """Vertex standing for V1: the deepest medial point near the occipital pole.

    Among pial vertices within 15 mm (in y) of the most posterior point of the
    hemisphere, the one with the largest sulcal depth whose x lies in the medial
    third — the calcarine sulcus at the pole.
    """
    coords = fsaverage5()["pial"][hemi][0]
    sulc = fsaverage5()["sulc"][hemi]
    near_pole = coords[:, 1] < coords[:, 1].min() + 15
    x = np.abs(coords[:, 0])
    medial = x <= np.quantile(x[near_pole], 1 / 3)
    candidates = np.flatnonzero(near_pole & medial)
    return int(candidates[np.argmax(sulc[candidates])])


def distance_from(hemi: str, seed: int, vertices: np.ndarray) -> np.ndarray:
    """Euclidean distance (mm, pial surface) from ``seed`` to each of ``vertices``."""
    coords = fsaverage5()["pial"][hemi][0]
    return np.linalg.norm(coords[vertices] - coords[seed], axis=1)


def posterior_vertices(hemi: str, *, max_y: float = -40.0, max_z: float = 35.0) -> np.ndarray:
    """Occipital and ventral/lateral temporal vertices of fsaverage5 (pial y, z in mm)."""
    coords = fsaverage5()["pial"][hemi][0]
    return np.flatnonzero((coords[:, 1] < max_y) & (coords[:, 2] < max_z))


# The CTF-275 layout lists 275 sensors. THINGS-MEG's system recorded 272 (MLF25, MRF43 and
# MRO13 absent) and the dataset's preprocessed epochs keep 271 (MRO11 dropped as
# malfunctioning). The simulated study uses 272 of its own choosing (three layout sensors
# left out: an arbitrary, documented choice made before the real set was known).
_DROPPED_CTF = ("MLC11", "MRC11", "MZC01")
THINGS_MEG_EXCLUDED = ("MLF25", "MRF43", "MRO13", "MRO11")


def ctf_info(sfreq: float, n_channels: int | None = 272, *, exclude=_DROPPED_CTF):
    """An ``mne.Info`` of CTF axial gradiometers placed from MNE's CTF-275 layout.

    Layout positions (2-D) are lifted onto a sphere (azimuthal equidistant, 9 cm
    radius) so that MNE's topomaps and sensor plots work.

    Parameters
    ----------
    sfreq : float
        Sampling frequency (Hz).
    n_channels : int or None
        Keep the first ``n_channels`` sensors left (None: all).
    exclude : sequence of str
        Layout sensors left out: by default the simulated study's three (272 sensors);
        :data:`THINGS_MEG_EXCLUDED` gives THINGS-MEG's 271.

    Returns
    -------
    mne.Info with the kept channels, of type ``"mag"``.
    """
    import mne

    layout = mne.channels.read_layout("CTF275")
    keep = [i for i, name in enumerate(layout.names) if name not in exclude][:n_channels]
    names = [layout.names[i] for i in keep]
    xy = layout.pos[keep, :2] + layout.pos[keep, 2:4] / 2
    xy = xy - xy.mean(axis=0)
    radius = np.hypot(xy[:, 0], xy[:, 1])
    theta = radius / radius.max() * np.deg2rad(110)  # polar angle from the vertex
    phi = np.arctan2(xy[:, 1], xy[:, 0])
    pos = 0.09 * np.column_stack(
        [np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)]
    )
    info = mne.create_info(names, sfreq, ch_types="mag", verbose="error")
    with info._unlock():
        for ch, p in zip(info["chs"], pos):
            ch["loc"][:3] = p
            ch["loc"][3:12] = np.eye(3).ravel()
    return info
