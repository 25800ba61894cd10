"""A small Natural Scenes Dataset in the published formats, and an S3 server holding it.

Layout and formats follow the NSD data manual (https://cvnlab.slite.page/p/CT9Fwl4_hc),
the bucket's file list as read by cvnlab/nsdexamples and tknapen/nsd_access, and NSD's
own file formats:

- ``nsddata/experiments/nsd/nsd_expdesign.mat`` (MATLAB, read with scipy): ``masterordering``
  (1 × 30000, 1-based index into a subject's 10,000 images), ``subjectim`` (8 × 10000,
  1-based 73k ids; the first 1,000 columns are the shared images), ``sharedix``
  (1 × 1000), plus ``basiccnt`` and ``stimpattern`` as in the real file.
- ``nsddata/experiments/nsd/nsd_stim_info_merged.csv``: 73,000 rows, an unnamed index and
  the columns cocoId, cocoSplit, cropBox, loss, nsdId, flagged, BOLD5000, shared1000,
  subject1…8, subjectN_rep0…2.
- ``nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5``: ``imgBrick`` (73000, 425, 425, 3)
  uint8; here stored in gzip-compressed one-image chunks with only the needed images
  written (the real file is 39.6 GB), so the loader's h5py path reads it.
- ``nsddata_betas/ppdata/subjAA/fsaverage/betas_fithrf_GLMdenoise_RR/{lh,rh}.betas_
  sessionNN.mgh``: MGH (nibabel), n_vertices × 1 × 1 × 750 float32 percent signal change,
  some vertices NaN on every trial; ``{lh,rh}.ncsnr.mgh`` n_vertices × 1 × 1.
- ``nsddata/freesurfer/fsaverage/label/{lh,rh}.{nsdgeneral,Kastner2015}.mgz`` and
  ``{atlas}.mgz.ctab`` (lines ``index name``); ``nsddata/freesurfer/fsaverage/surf/
  {lh,rh}.pial`` (FreeSurfer geometry).

Betas are released for ``sessions`` only (the others are "held out", as NSD's last
sessions are). With ``n_vertices`` ≥ 10,242 the first 10,242 pial vertices are nilearn's
fsaverage5 ones, so ``resolution="fsaverage5"`` works; an odd, small ``n_vertices``
serves ``resolution="fsaverage"``.
"""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
from scipy.io import savemat

from gradbrain.data import nsd

KASTNER_NAMES = ["Unknown", "V1v", "V1d", "V2v", "V2d", "V3v", "V3d", "hV4", "VO1", "VO2",
                 "PHC1", "PHC2", "TO2", "TO1", "LO2", "LO1", "V3B", "V3A", "IPS0", "IPS1",
                 "IPS2", "IPS3", "IPS4", "IPS5", "SPL1", "FEF"]


def _mgh(path: Path, data: np.ndarray) -> None:
    """``data`` (n_vertices,) or (n_vertices, n_frames) as an MGH n × 1 × 1 [× frames]."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (data.shape[0], 1, 1) + data.shape[1:]
    nib.save(nib.MGHImage(data.reshape(shape), np.eye(4)), str(path))


def _coordinates(n_vertices: int, hemi: str, rng) -> tuple[np.ndarray, np.ndarray]:
    from gradbrain.data.geometry import fsaverage5

    coords, faces = fsaverage5()["pial"][{"lh": "left", "rh": "right"}[hemi]]
    if n_vertices >= len(coords):
        extra = coords[rng.integers(0, len(coords), n_vertices - len(coords))] + 0.5
        return np.concatenate([coords, extra]).astype(np.float32), faces.astype(np.int32)
    return coords[:n_vertices].astype(np.float32), np.array([[0, 1, 2]], np.int32)


def _image(nsd_id: int) -> np.ndarray:
    """A 425 × 425 RGB picture of 5 × 5 coloured tiles, different per image (compresses
    well, so the fake stimulus file stays small)."""
    tiles = np.random.default_rng(nsd_id).integers(0, 256, (5, 5, 3), dtype=np.uint8)
    return np.repeat(np.repeat(tiles, 85, axis=0), 85, axis=1)


def write_nsd(root: Path, *, subject: int = 1, sessions=(1, 2), n_vertices: int = 643,
              n_images_per_session: int = 50, seed: int = 0) -> dict:
    """Write a fake NSD under ``root``; return what a test needs to know.

    In the first len(sessions) × 750 trials, ``n_images_per_session`` × len(sessions)
    images are shown three times (a third of them shared images) and the remaining trials
    show other images once.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    n_sessions = nsd.N_SESSIONS[subject]
    # ---- design: real shapes, 1-based
    sharedix = np.sort(rng.choice(np.arange(1, 73_001), 1000, replace=False))
    subjectim = np.zeros((8, 10_000), np.int64)
    others = np.setdiff1d(np.arange(1, 73_001), sharedix)
    for s in range(8):
        subjectim[s] = np.concatenate([sharedix, rng.choice(others, 9000, replace=False)])
    n_early = len(sessions) * nsd.TRIALS_PER_SESSION
    n_triple = n_images_per_session * len(sessions)
    triple = np.concatenate([np.arange(1, n_triple // 3 + 1),                    # shared
                             np.arange(1001, 1001 + n_triple - n_triple // 3)])  # own
    once = np.arange(2001, 2001 + n_early - 3 * n_triple)
    early = rng.permutation(np.concatenate([np.repeat(triple, 3), once]))
    rest = np.setdiff1d(np.arange(1, 10_001), np.concatenate([triple, once]))
    late = rng.permutation(np.concatenate([np.repeat(once, 2), np.repeat(rest, 3)]))
    masterordering = np.concatenate([early, late])[None, :]
    assert masterordering.shape == (1, 30_000)
    (root / nsd.EXPDESIGN_KEY).parent.mkdir(parents=True, exist_ok=True)
    savemat(root / nsd.EXPDESIGN_KEY, {
        "masterordering": masterordering.astype(float), "subjectim": subjectim.astype(float),
        "sharedix": sharedix[None, :].astype(float),
        "basiccnt": np.zeros((3, 40)), "stimpattern": np.zeros((40, 12, 75)),
    })
    # ---- stimulus info: all 73,000 rows, the real columns
    info = {"cocoId": np.arange(73_000) * 7 + 9, "cocoSplit": "train2017",
            "cropBox": "(0, 0, 0.1, 0.1)", "loss": 0.0, "nsdId": np.arange(73_000),
            "flagged": False, "BOLD5000": False,
            "shared1000": np.isin(np.arange(73_000), sharedix - 1)}
    for s in range(1, 9):
        info[f"subject{s}"] = np.isin(np.arange(73_000), subjectim[s - 1] - 1)
    for s in range(1, 9):
        for r in range(3):
            info[f"subject{s}_rep{r}"] = 0
    path = root / nsd.STIM_INFO_KEY
    pd.DataFrame(info).to_csv(path)
    # ---- stimuli: imgBrick in its real shape, only the images shown in `sessions`
    trial_ids = subjectim[subject - 1, masterordering[0, :n_early] - 1] - 1
    path = root / nsd.STIMULI_KEY
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        brick = f.create_dataset("imgBrick", shape=(73_000, 425, 425, 3), dtype=np.uint8,
                                 chunks=(1, 425, 425, 3), compression="gzip")
        for nsd_id in np.unique(trial_ids):
            brick[nsd_id] = _image(int(nsd_id))
    # ---- betas, NC, atlases, surfaces
    betas = {}
    labels = root / "nsddata/freesurfer/fsaverage/label"
    labels.mkdir(parents=True, exist_ok=True)
    (labels / "Kastner2015.mgz.ctab").write_text(
        "".join(f"{i} {name}\n" for i, name in enumerate(KASTNER_NAMES)))
    (labels / "nsdgeneral.mgz.ctab").write_text("0 Unknown\n1 nsdgeneral\n")
    nan_vertices = {}
    for hemi in ("lh", "rh"):
        coords, faces = _coordinates(n_vertices, hemi, rng)
        surf = root / nsd.surface_key(hemi)
        surf.parent.mkdir(parents=True, exist_ok=True)
        nib.freesurfer.write_geometry(str(surf), coords, faces)
        # V1 = the 3 % most posterior vertices; nsdgeneral = the posterior 60 %
        order = np.argsort(coords[:, 1])
        kastner = np.zeros(n_vertices, np.int32)
        kastner[order[: max(3, n_vertices // 33)]] = 1
        kastner[order[max(3, n_vertices // 33): n_vertices // 6]] = 3
        general = np.zeros(n_vertices, np.int32)
        general[order[: int(0.6 * n_vertices)]] = 1
        general[order[int(0.9 * n_vertices):]] = -1
        _mgh(labels / f"{hemi}.Kastner2015.mgz", kastner)
        _mgh(labels / f"{hemi}.nsdgeneral.mgz", general)
        ncsnr = rng.uniform(0.05, 0.8, n_vertices).astype(np.float32)
        nan_vertices[hemi] = rng.choice(n_vertices, 3, replace=False)
        ncsnr[nan_vertices[hemi][:1]] = np.nan
        _mgh(root / nsd.ncsnr_key(subject, hemi), ncsnr)
        for session in sessions:
            data = rng.normal(0.8, 2.0, (n_vertices, nsd.TRIALS_PER_SESSION)).astype(np.float32)
            data[nan_vertices[hemi][1:]] = np.nan
            _mgh(root / nsd.betas_key(subject, session, hemi), data)
            betas[(session, hemi)] = data
    return {"root": root, "subject": subject, "sessions": tuple(sessions),
            "n_vertices": n_vertices, "betas": betas, "trial_ids": trial_ids,
            "sharedix": sharedix - 1, "nan_vertices": nan_vertices,
            "masterordering": masterordering[0], "subjectim": subjectim}


# ---------------------------------------------------------------------- S3


def start_moto():
    """A moto S3 server on a free local port; returns (server, endpoint URL)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def upload(root: Path, endpoint: str, bucket: str = nsd.BUCKET, *,
           private: tuple[str, ...] = ()) -> None:
    """Put every file under ``root`` into ``bucket`` (public-read, as NSD's bucket).

    Keys in ``private`` are put without the public ACL: listed, but an anonymous read
    gets HTTP 403 — how NSD serves the sessions it holds out of the public release
    ("listable but not downloadable", NSD data manual, "Raw data" and "Overview of the
    data")."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name=nsd.REGION,
                          aws_access_key_id="test", aws_secret_access_key="test")
    try:
        client.create_bucket(Bucket=bucket, CreateBucketConfiguration={
            "LocationConstraint": nsd.REGION})
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    for path in sorted(Path(root).rglob("*")):
        if path.is_file():
            key = path.relative_to(root).as_posix()
            acl = {} if key in private else {"ACL": "public-read"}
            client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes(), **acl)


def _passed_on(header: str, *dropped: str) -> bool:
    """Headers the proxy forwards: not hop-by-hop ones, and no checksums — NSD's objects
    were uploaded before S3 stored checksums, so a client cannot catch a short body by
    its checksum there (only by its length, which is what the loader checks)."""
    name = header.lower()
    return (name not in ("transfer-encoding", "connection", *dropped)
            and not name.startswith("x-amz-checksum"))


class FaultProxy:
    """An HTTP proxy in front of an S3 endpoint that breaks chosen requests.

    ``faults`` maps a substring of the request path to a list of faults, used up one per
    matching GET: ``"500"`` (an S3 InternalError answer), ``"drop"`` (the connection is
    closed without an answer), ``"short"`` (a 206 whose body, and Content-Length, are
    cut to half), ``"truncate"`` (the promised Content-Length, half the body, then the
    connection closes). Checksum headers are not forwarded (see :func:`_passed_on`).
    Every request is logged in ``requests`` (method, path, range).
    """

    def __init__(self, upstream: str):
        import urllib.parse

        self.upstream = urllib.parse.urlparse(upstream)
        self.faults: dict[str, list[str]] = {}
        self.min_bytes = 0   # only GETs of ranges at least this long get faults
        self.requests: list[tuple[str, str, str | None]] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                import http.client

                with proxy.lock:
                    proxy.requests.append((self.command, self.path, self.headers.get("Range")))
                    fault = None
                    span = self.headers.get("Range", "")
                    span = (int(span[6:].split("-")[1]) - int(span[6:].split("-")[0]) + 1
                            if span.startswith("bytes=") else None)
                    if self.command == "GET" and (span or 0) >= proxy.min_bytes:
                        for pattern, queue in proxy.faults.items():
                            if pattern in self.path and queue:
                                fault = queue.pop(0)
                                break
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault == "500":
                    body = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>InternalError"
                            b"</Code><Message>injected</Message></Error>")
                    self.send_response(500)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                length = int(self.headers.get("Content-Length") or 0)
                payload = self.rfile.read(length) if length else None
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = proxy.upstream.netloc
                conn.request(self.command, self.path, body=payload, headers=headers)
                answer = conn.getresponse()
                body = answer.read()
                conn.close()
                if fault in ("short", "truncate"):
                    cut = body[: len(body) // 2]
                    self.send_response(answer.status)
                    for k, v in answer.getheaders():
                        if _passed_on(k, "content-length"):
                            self.send_header(k, v)
                    self.send_header("Content-Length",
                                     str(len(cut) if fault == "short" else len(body)))
                    self.end_headers()
                    self.wfile.write(cut)
                    if fault == "truncate":
                        self.wfile.flush()
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.send_response(answer.status)
                for k, v in answer.getheaders():
                    if _passed_on(k, "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", answer.getheader("Content-Length")
                                 if self.command == "HEAD" else str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = do_PUT = do_POST = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()
