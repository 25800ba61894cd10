"""The Natural Scenes Dataset (NSD; Allen et al. 2022) as a :class:`~gradbrain.data.Study`.

NSD lives in the public S3 bucket ``natural-scenes-dataset`` (anonymous reads; using it
means accepting the NSD terms, https://naturalscenesdataset.org). The files read here,
with the layout of the NSD data manual (cvnlab/nsdexamples, tknapen/nsd_access)::

    nsddata/experiments/nsd/nsd_expdesign.mat          # masterordering, subjectim, sharedix
    nsddata/experiments/nsd/nsd_stim_info_merged.csv   # nsdId → cocoId
    nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5       # imgBrick (73000, 425, 425, 3) uint8
    nsddata_betas/ppdata/subjAA/fsaverage/betas_fithrf_GLMdenoise_RR/
        {lh,rh}.betas_sessionNN.mgh                    # 163,842 vertices × 750 trials
        {lh,rh}.ncsnr.mgh                              # noise-ceiling SNR per vertex
    nsddata/freesurfer/fsaverage/label/{lh,rh}.<atlas>.mgz (+ <atlas>.mgz.ctab)
    nsddata/freesurfer/fsaverage/surf/{lh,rh}.pial     # vertex coordinates (mm)

Only what a study needs is read, by HTTP range requests: the header of each betas
file, then each trial's block — an MGH file stores its frames one after another, so a
trial is one contiguous run of 163,842 big-endian float32 after the 284-byte header,
and on fsaverage5 only its first 10,242 values (fsaverage's first 10,242 vertices *are*
fsaverage5's; :func:`load_subject` checks it on the surfaces before relying on it). One
image is one contiguous run of 425·425·3 bytes of the stimulus file. Every read is
checked for length and retried with backoff on timeouts, 5xx answers, dropped
connections and short bodies; finished blocks are cached on disk (written atomically),
so an interrupted download resumes where it stopped.

Betas on fsaverage are percent signal change (float32; the ×300 int16 scaling of the
volume files does not apply). Following NSD's convention each vertex is z-scored within
each session over all its 750 trials — which is why whole sessions are read even when
few of their images are kept: on fsaverage5 that is 30.7 MB per session and hemisphere.
"""

from __future__ import annotations

import io
import os
import random
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .._utils import atomic_path, discard_unreadable, get_data_home
from .geometry import fsaverage5
from .images import ImageFiles, ImageSet
from .study import Study, stratified_subset

__all__ = ["BUCKET", "SOURCE", "SUBJECTS", "N_SESSIONS", "TRIALS_PER_SESSION", "ROIS",
           "open_source", "read_design", "available_sessions", "read_trials", "read_images",
           "load_subject"]

BUCKET = "natural-scenes-dataset"
SOURCE = f"s3://{BUCKET}"
REGION = "us-east-2"
SUBJECTS = tuple(range(1, 9))
N_SESSIONS = {1: 40, 2: 40, 3: 32, 4: 30, 5: 40, 6: 32, 7: 40, 8: 30}  # scanned, not released
TRIALS_PER_SESSION = 750
N_FSAVERAGE = 163_842
N_FSAVERAGE5 = 10_242
N_NSD_IMAGES = 73_000
MGH_HEADER_BYTES = 284
RESOLUTIONS = {"fsaverage5": N_FSAVERAGE5, "fsaverage": N_FSAVERAGE}
ROIS = ("nsdgeneral", "streams", "Kastner2015", "HCP_MMP1", None)
HEMIS = {"left": "lh", "right": "rh"}
BETAS_VERSION = "betas_fithrf_GLMdenoise_RR"
EXPDESIGN_KEY = "nsddata/experiments/nsd/nsd_expdesign.mat"
STIM_INFO_KEY = "nsddata/experiments/nsd/nsd_stim_info_merged.csv"
STIMULI_KEY = "nsddata_stimuli/stimuli/nsd/nsd_stimuli.hdf5"
_CHUNK_TRIALS = 50          # trials per cache file (15 per session)
_MAX_GAP = 64 * 1024        # byte ranges closer than this are fetched in one request
_ACCESS_HELP = (
    "NSD is read from the public S3 bucket 'natural-scenes-dataset' (us-east-2) without "
    "credentials; using it means accepting the NSD terms (https://naturalscenesdataset.org, "
    "'Get the data'). Check the network, or copy the files (aws s3 sync "
    "s3://natural-scenes-dataset/<folder> <dir>/<folder> --no-sign-request) and pass "
    "source=<dir>."
)


def betas_key(subject: int, session: int, hemi: str) -> str:
    """Bucket key of one session's betas (``hemi`` "lh"/"rh"; fsaverage files serve both
    resolutions)."""
    return (f"nsddata_betas/ppdata/subj{subject:02d}/fsaverage/{BETAS_VERSION}/"
            f"{hemi}.betas_session{session:02d}.mgh")


def ncsnr_key(subject: int, hemi: str) -> str:
    return f"nsddata_betas/ppdata/subj{subject:02d}/fsaverage/{BETAS_VERSION}/{hemi}.ncsnr.mgh"


def label_key(atlas: str, hemi: str) -> str:
    return f"nsddata/freesurfer/fsaverage/label/{hemi}.{atlas}.mgz"


def ctab_key(atlas: str) -> str:
    return f"nsddata/freesurfer/fsaverage/label/{atlas}.mgz.ctab"


def surface_key(hemi: str, surface: str = "pial") -> str:
    return f"nsddata/freesurfer/fsaverage/surf/{hemi}.{surface}"


# ---------------------------------------------------------------------- sources


class _Transient(Exception):
    """A failure worth retrying (timeout, 5xx, dropped connection, short body)."""


class Source:
    """Where NSD's files are read from: the S3 bucket (or an S3-compatible endpoint), or
    a local folder with the bucket's layout. Reads are checked and retried.

    Use :func:`open_source` to make one.
    """

    description = ""
    retries = 5
    backoff = 0.5   # seconds; doubled after every failed try, with jitter

    def size(self, key: str) -> int:
        raise NotImplementedError

    def list(self, prefix: str) -> list[str]:
        raise NotImplementedError

    def _read(self, key: str, start: int, stop: int) -> bytes:
        raise NotImplementedError

    def read(self, key: str, start: int, stop: int) -> bytes:
        """Bytes ``start`` ≤ b < ``stop`` of ``key``, exactly ``stop - start`` of them.

        Transient failures (timeouts, 5xx, dropped connections, short bodies) are retried
        ``retries`` times with exponential backoff; then a ``ConnectionError`` names the
        file. A missing file raises ``FileNotFoundError`` at once.
        """
        if stop <= start:
            return b""

        def once():
            data = self._read(key, start, stop)
            if len(data) != stop - start:
                raise _Transient(f"short body: {len(data)} of {stop - start} bytes")
            return data

        return self._retrying(f"Reading bytes {start}–{stop - 1} of {key!r}", once)

    def _retrying(self, what: str, once):
        """``once()``, tried again with backoff while it fails transiently."""
        for attempt in range(self.retries + 1):
            try:
                return once()
            except _Transient as err:
                if attempt == self.retries:
                    raise ConnectionError(
                        f"{what} from {self.description} failed {self.retries + 1} times "
                        f"(last: {err}). " + _ACCESS_HELP) from None
                time.sleep(self.backoff * 2**attempt * (1 + random.random()))
        raise AssertionError("unreachable")

    def read_all(self, key: str) -> bytes:
        return self.read(key, 0, self.size(key))


class _LocalSource(Source):
    def __init__(self, root: Path):
        self.root = root
        self.description = f"the local folder {str(root)!r}"

    def path(self, key: str) -> Path:
        return self.root / key

    def size(self, key: str) -> int:
        path = self.path(key)
        if not path.is_file():
            raise FileNotFoundError(f"{key!r} is not under {str(self.root)!r}; the folder "
                                    "must keep the bucket's layout. " + _ACCESS_HELP)
        return path.stat().st_size

    def list(self, prefix: str) -> list[str]:
        folder = self.path(prefix)
        if not folder.is_dir():
            return []
        return sorted(f"{prefix.rstrip('/')}/{p.name}" for p in folder.iterdir() if p.is_file())

    def _read(self, key: str, start: int, stop: int) -> bytes:
        self.size(key)
        with open(self.path(key), "rb") as f:
            f.seek(start)
            return f.read(stop - start)


class _S3Source(Source):
    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None,
                 max_workers: int = 16, timeout: float = 30.0):
        import boto3
        from botocore import UNSIGNED
        from botocore.config import Config

        self.bucket, self.prefix = bucket, prefix.strip("/")
        where = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.description = where + (f" at {endpoint_url}" if endpoint_url else "")
        config = Config(
            signature_version=UNSIGNED, connect_timeout=timeout, read_timeout=timeout,
            retries={"total_max_attempts": 1}, max_pool_connections=max(10, max_workers),
            s3={"addressing_style": "path"} if endpoint_url else None,
        )
        self.client = boto3.session.Session().client(
            "s3", region_name=REGION, endpoint_url=endpoint_url, config=config)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, key: str, fn):
        """Run one request; sort its failures into transient, missing, forbidden."""
        from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from urllib3.exceptions import HTTPError as Urllib3Error

        try:
            return fn()
        except ClientError as err:
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            code = err.response.get("Error", {}).get("Code", "")
            if status >= 500 or status == 429 or code in ("SlowDown", "RequestTimeout"):
                raise _Transient(f"HTTP {status} {code}") from None
            if status == 404 or code in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(f"{key!r} is not in {self.description}.") from None
            if status == 403 or code == "AccessDenied":
                raise PermissionError(f"Access to {key!r} in {self.description} was denied "
                                      f"(HTTP 403). " + _ACCESS_HELP) from None
            raise
        except (BotoConnectionError, HTTPClientError, Urllib3Error, ConnectionError,
                TimeoutError) as err:
            raise _Transient(f"{type(err).__name__}: {err}") from None
        except BotoCoreError as err:  # e.g. IncompleteReadError, ResponseStreamingError
            raise _Transient(f"{type(err).__name__}: {err}") from None

    def size(self, key: str) -> int:
        head = self._retrying(f"Reading the size of {key!r}", lambda: self._call(
            key, lambda: self.client.head_object(Bucket=self.bucket, Key=self._key(key))))
        return int(head["ContentLength"])

    def list(self, prefix: str) -> list[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        full = self._key(prefix.rstrip("/") + "/")

        def listing():
            return [item["Key"] for page in paginator.paginate(Bucket=self.bucket, Prefix=full)
                    for item in page.get("Contents", [])]

        keys = self._retrying(f"Listing {prefix!r}", lambda: self._call(prefix, listing))
        cut = len(self.prefix) + 1 if self.prefix else 0
        return sorted(k[cut:] for k in keys)

    def _read(self, key: str, start: int, stop: int) -> bytes:
        def get():
            answer = self.client.get_object(Bucket=self.bucket, Key=self._key(key),
                                            Range=f"bytes={start}-{stop - 1}")
            return answer["Body"].read()

        return self._call(key, get)


def open_source(source: str | os.PathLike | Source | None = None, *, max_workers: int = 16
                ) -> Source:
    """A :class:`Source` for NSD's files.

    Parameters
    ----------
    source : str, path-like, Source or None
        ``None`` or ``"s3://natural-scenes-dataset"``: the public bucket (anonymous);
        ``"s3://bucket/prefix"``: a copy in another bucket; ``"http(s)://host:port/bucket[/
        prefix]"``: an S3-compatible endpoint (path-style); an existing folder: a local
        copy keeping the bucket's layout (``aws s3 sync … --no-sign-request``).
    max_workers : int
        Parallel requests (sizes the connection pool).
    """
    if isinstance(source, Source):
        return source
    if source is None:
        source = SOURCE
    text = str(source)
    if text.startswith("s3://"):
        bucket, _, prefix = text[5:].partition("/")
        if not bucket:
            raise ValueError(f"'source' {text!r} names no bucket; e.g. source={SOURCE!r}.")
        return _S3Source(bucket, prefix, max_workers=max_workers)
    match = re.match(r"^(https?://[^/]+)/([^/]+)/?(.*)$", text)
    if match:
        endpoint, bucket, prefix = match.groups()
        return _S3Source(bucket, prefix, endpoint_url=endpoint, max_workers=max_workers)
    if re.match(r"^[a-z]+://", text):
        raise ValueError(f"'source' {text!r} is neither s3://bucket[/prefix] nor "
                         "http(s)://host/bucket (an S3-compatible endpoint) nor a folder.")
    root = Path(text).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"NSD folder {str(root)!r} does not exist. Give a folder "
                                "with the bucket's layout, or source=None for the bucket. "
                                + _ACCESS_HELP)
    return _LocalSource(root)


# ---------------------------------------------------------------------- small files


def _cached_file(src: Source, key: str, cache: Path) -> Path:
    """The local path of a small file: the local source's own, or a cached copy."""
    if isinstance(src, _LocalSource):
        src.size(key)
        return src.path(key)
    path = cache / "files" / key
    if path.is_file() and path.stat().st_size > 0:
        return path
    data = src.read_all(key)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def _read_small(src: Source, cache: Path, key: str, reader):
    """``reader(path)`` on a small file; a cached copy it cannot read is fetched again."""
    path = _cached_file(src, key, cache)
    try:
        return reader(path)
    except Exception as err:
        if isinstance(src, _LocalSource):
            raise ValueError(f"{str(path)!r} could not be read ({err}).") from None
        discard_unreadable(path, err, what="Cached NSD file", then="fetched again",
                           stacklevel=3)
        path = _cached_file(src, key, cache)
        try:
            return reader(path)
        except Exception as err:
            raise ValueError(f"{key!r} from {src.description} could not be read ({err}).") \
                from None


def _check_subject(subject) -> int:
    if isinstance(subject, str) and subject.lower().startswith("subj"):
        subject = subject[4:]
    try:
        number = int(subject)
    except (TypeError, ValueError):
        number = None
    if number not in SUBJECTS:
        raise ValueError(f"'subject' must be one of NSD's subjects {list(SUBJECTS)} (or "
                         f"'subj01'…'subj08'); got {subject!r}.")
    return number


def read_design(subject, source=None, *, cache_dir=None) -> pd.DataFrame:
    """Every trial the design gives ``subject``, in presentation order.

    From ``nsd_expdesign.mat``: trial ``t`` (0-based) shows the 73k image
    ``subjectim[s-1, masterordering[t]-1] - 1`` (both tables are 1-based), in session
    ``t // 750 + 1``.

    Returns
    -------
    DataFrame with one row per trial (``N_SESSIONS[subject] × 750``) and columns
    ``trial`` (0-based over the subject's trials), ``session`` (1-based),
    ``trial_in_session`` (0-based), ``nsd_id`` (0-based 73k index), ``shared`` (one of
    the 1,000 images every subject saw) and ``repeat`` (0, 1, 2: which showing).
    """
    from scipy.io import loadmat

    subject = _check_subject(subject)
    src = open_source(source)
    cache = _cache_dir(cache_dir)

    def read(path):
        design = loadmat(path, variable_names=("masterordering", "subjectim", "sharedix"))
        missing = {"masterordering", "subjectim", "sharedix"} - set(design)
        if missing:
            raise KeyError(f"no {sorted(missing)}")
        return design

    design = _read_small(src, cache, EXPDESIGN_KEY, read)
    order = np.asarray(design["masterordering"]).ravel().astype(np.int64)
    subjectim = np.asarray(design["subjectim"]).astype(np.int64)
    shared = np.asarray(design["sharedix"]).ravel().astype(np.int64) - 1
    n_trials = N_SESSIONS[subject] * TRIALS_PER_SESSION
    if subjectim.shape[0] < subject or order.size < n_trials:
        raise ValueError(f"{EXPDESIGN_KEY} has subjectim {subjectim.shape} and "
                         f"masterordering {order.shape}: too small for subject {subject}.")
    nsd_id = subjectim[subject - 1, order[:n_trials] - 1] - 1
    trial = np.arange(n_trials)
    table = pd.DataFrame({"trial": trial, "session": trial // TRIALS_PER_SESSION + 1,
                          "trial_in_session": trial % TRIALS_PER_SESSION, "nsd_id": nsd_id,
                          "shared": np.isin(nsd_id, shared)})
    table["repeat"] = table.groupby("nsd_id").cumcount()
    return table


def available_sessions(subject, source=None) -> list[int]:
    """Sessions of ``subject`` whose betas (both hemispheres) are in ``source``.

    NSD scanned 40/40/32/30/40/32/40/30 sessions; the last sessions of every subject
    were held out of the public release, so this lists the files rather than assuming.
    """
    subject = _check_subject(subject)
    src = open_source(source)
    folder = f"nsddata_betas/ppdata/subj{subject:02d}/fsaverage/{BETAS_VERSION}"
    names = {key.rsplit("/", 1)[-1] for key in src.list(folder)}
    sessions = [k for k in range(1, N_SESSIONS[subject] + 1)
                if {f"lh.betas_session{k:02d}.mgh", f"rh.betas_session{k:02d}.mgh"} <= names]
    if not sessions:
        raise FileNotFoundError(f"No betas of subj{subject:02d} under {folder!r} in "
                                f"{src.description}. " + _ACCESS_HELP)
    return sessions


# ---------------------------------------------------------------------- betas


def _mgh_shape(src: Source, key: str, cache: Path | None = None) -> tuple[int, int]:
    """(n_vertices, n_frames) from an MGH header, checking it holds float32 data.

    With ``cache``, a remote file's header is kept there, so a load from a full cache
    reads no betas file again.
    """
    path = None if cache is None or isinstance(src, _LocalSource) else \
        cache / "headers" / key
    if path is not None and path.is_file() and path.stat().st_size == MGH_HEADER_BYTES:
        header = path.read_bytes()
    else:
        header = src.read(key, 0, MGH_HEADER_BYTES)
        if path is not None:
            with atomic_path(path) as tmp:
                tmp.write_bytes(header)
    version, width, height, depth, frames, kind = np.frombuffer(header[:24], ">i4")
    if version != 1 or kind != 3:
        raise ValueError(f"{key!r} is not an MGH file of float32 data (version {version}, "
                         f"type {kind}); the loader reads NSD's fsaverage .mgh betas.")
    return int(width) * int(height) * int(depth), int(frames)


def _ranges(starts: np.ndarray, length: int) -> list[tuple[int, int, list[int]]]:
    """Coalesce equal-length byte runs into requests: (start, stop, run indices)."""
    requests = []
    for i, start in enumerate(starts):
        if requests and start - requests[-1][1] <= _MAX_GAP:
            requests[-1][1] = start + length
            requests[-1][2].append(i)
        else:
            requests.append([int(start), int(start) + length, [i]])
    return [tuple(r) for r in requests]


def read_trials(subject, session: int, hemi: str, trials, *, resolution: str = "fsaverage5",
                source=None, max_workers: int = 16, progress=None) -> np.ndarray:
    """Raw betas of some trials of one session and hemisphere, by range requests.

    Parameters
    ----------
    subject, session : int
        NSD subject (1…8) and session (1-based).
    hemi : {"left", "right", "lh", "rh"}
    trials : sequence of int
        Trials within the session (0…749).
    resolution : {"fsaverage5", "fsaverage"}
        fsaverage5 keeps the first 10,242 vertices of each trial (fsaverage5's).
    progress : tqdm or None
        Advanced by the bytes read.

    Returns
    -------
    ndarray of shape (len(trials), n_vertices), float32: percent signal change, NaN
    where NSD has no data.
    """
    subject = _check_subject(subject)
    hemi = HEMIS.get(hemi, hemi)
    if hemi not in ("lh", "rh"):
        raise ValueError(f"'hemi' must be 'left' or 'right'; got {hemi!r}.")
    src = open_source(source, max_workers=max_workers)
    key = betas_key(subject, session, hemi)
    n_vertices, n_frames = _mgh_shape(src, key)
    trials = np.asarray(trials, dtype=np.int64)
    if trials.size and (trials.min() < 0 or trials.max() >= n_frames):
        raise ValueError(f"'trials' must lie in 0…{n_frames - 1} (the frames of {key!r}); got "
                         f"{trials.min()}…{trials.max()}.")
    return _fetch_trials(src, key, n_vertices, _n_keep(resolution, n_vertices, key), trials,
                         max_workers, progress)


def _fetch_trials(src: Source, key: str, n_vertices: int, n_keep: int, trials: np.ndarray,
                  max_workers: int, progress) -> np.ndarray:
    """The first ``n_keep`` values of each of ``trials`` (frames of ``n_vertices``), by
    coalesced range requests in parallel: (len(trials), n_keep) float32."""
    starts = MGH_HEADER_BYTES + trials * (n_vertices * 4)
    out = np.empty((trials.size, n_keep), dtype=np.float32)

    def fetch(request):
        start, stop, members = request
        data = src.read(key, start, stop)
        for i in members:
            offset = int(starts[i]) - start
            out[i] = np.frombuffer(data, ">f4", count=n_keep, offset=offset)
        if progress is not None:
            progress.update(len(data))

    requests = _ranges(starts, n_keep * 4)
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        list(pool.map(fetch, requests))
    return out


def _session_request_bytes(n_vertices: int, n_keep: int) -> int:
    """Bytes the range requests of one whole session read (as :func:`_session_betas`
    fetches it, block by block): the kept values of every trial, plus the gaps that
    coalesced requests read through (none on NSD's real files, whose gaps at
    fsaverage5 are larger than ``_MAX_GAP`` and at fsaverage are empty)."""
    return sum(_block_request_bytes(n_vertices, n_keep, start,
                                    min(start + _CHUNK_TRIALS, TRIALS_PER_SESSION))
               for start in range(0, TRIALS_PER_SESSION, _CHUNK_TRIALS))


def _block_request_bytes(n_vertices: int, n_keep: int, start: int, stop: int) -> int:
    """Bytes the coalesced range requests of trials ``start…stop-1`` read."""
    starts = MGH_HEADER_BYTES + np.arange(start, stop) * (n_vertices * 4)
    return int(sum(end - begin for begin, end, _ in _ranges(starts, n_keep * 4)))


def _n_keep(resolution: str, n_vertices: int, key: str) -> int:
    if resolution not in RESOLUTIONS:
        raise ValueError(f"'resolution' must be one of {list(RESOLUTIONS)}; got "
                         f"{resolution!r}.")
    if resolution == "fsaverage":
        return n_vertices
    if n_vertices < N_FSAVERAGE5:
        raise ValueError(f"{key!r} has {n_vertices} vertices, fewer than fsaverage5's "
                         f"{N_FSAVERAGE5}; use resolution='fsaverage'.")
    return N_FSAVERAGE5


def _session_betas(src, cache: Path, subject: int, session: int, hemi: str, resolution: str,
                   shape: tuple[int, int], max_workers: int, progress) -> np.ndarray:
    """All trials of one session and hemisphere, (750, n_vertices), via the block cache.

    ``shape`` is the file's (n_vertices, n_frames) (:func:`_mgh_shape`). Blocks of 50
    trials are cached as ``.npy``; a block that does not load with the expected shape is
    reported, deleted and fetched again.
    """
    key = betas_key(subject, session, hemi)
    n_vertices, n_frames = shape
    if n_frames != TRIALS_PER_SESSION:
        raise ValueError(f"{key!r} has {n_frames} trials; NSD sessions have "
                         f"{TRIALS_PER_SESSION}.")
    n_keep = _n_keep(resolution, n_vertices, key)
    folder = cache / f"subj{subject:02d}" / resolution / f"{hemi}.session{session:02d}"
    blocks = []
    for start in range(0, n_frames, _CHUNK_TRIALS):
        stop = min(start + _CHUNK_TRIALS, n_frames)
        path = folder / f"trials{start:03d}-{stop - 1:03d}.npy"
        block = _load_block(path, (stop - start, n_keep))
        if block is None:
            block = _fetch_trials(src, key, n_vertices, n_keep, np.arange(start, stop),
                                  max_workers, progress)
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, block)
        elif progress is not None:   # counted as the requests would have read it
            progress.update(_block_request_bytes(n_vertices, n_keep, start, stop))
        blocks.append(block)
    return np.concatenate(blocks)


def _load_block(path: Path, shape: tuple) -> np.ndarray | None:
    if not path.exists():
        return None
    try:
        block = np.load(path, allow_pickle=False)
        if block.shape != shape or block.dtype != np.float32:
            raise ValueError(f"shape {block.shape} {block.dtype}, expected {shape} float32")
        return block
    except Exception as err:  # truncated, garbage, wrong shape: fetch again
        discard_unreadable(path, err, what="Cached NSD block", then="fetched again",
                           stacklevel=3)
        return None


def _zscore(betas: np.ndarray) -> np.ndarray:
    """z-score each vertex over the session's trials (ddof 0); constant vertices → NaN."""
    mean = betas.mean(axis=0, dtype=np.float64)
    sd = betas.std(axis=0, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (betas - mean) / np.where(sd > 0, sd, np.nan)
    return z.astype(np.float32)


# ---------------------------------------------------------------------- atlases


def read_ctab(path) -> dict[int, str]:
    """NSD colour table (``<atlas>.mgz.ctab``): index → name, from lines ``index name …``."""
    names = {}
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].lstrip("-").isdigit():
            names[int(parts[0])] = parts[1]
    return names


def _label(src, cache, atlas: str, hemi: str) -> np.ndarray:
    import nibabel as nib

    return _read_small(src, cache, label_key(atlas, hemi),
                       lambda path: np.asarray(nib.load(path).get_fdata()).ravel())


def _surface(src, cache, hemi: str) -> np.ndarray:
    import nibabel as nib

    return _read_small(src, cache, surface_key(hemi), lambda path: np.asarray(
        nib.freesurfer.read_geometry(str(path))[0], dtype=float))


def _check_fsaverage5(coords: np.ndarray, hemi: str, tolerance: float = 0.01) -> None:
    """The first 10,242 fsaverage vertices must sit where fsaverage5's do (nilearn's)."""
    side = {"lh": "left", "rh": "right"}[hemi]
    reference = fsaverage5()["pial"][side][0]
    if coords.shape[0] < N_FSAVERAGE5:
        raise ValueError(f"The fsaverage surface {surface_key(hemi)!r} has {coords.shape[0]} "
                         "vertices; fsaverage5 needs its first 10,242. Use "
                         "resolution='fsaverage'.")
    gap = float(np.abs(coords[:N_FSAVERAGE5] - reference).max())
    if gap > tolerance:
        raise ValueError(
            f"The first {N_FSAVERAGE5} vertices of {surface_key(hemi)!r} are not fsaverage5's "
            f"(they differ from nilearn's fsaverage5 pial surface by up to {gap:.3g} mm), so "
            "betas cannot be cut down to fsaverage5 by keeping them. Use "
            "resolution='fsaverage'."
        )


def _v1_distance(coords: np.ndarray, areas: np.ndarray, names: dict[int, str],
                 atlas: str) -> np.ndarray:
    """Euclidean distance (mm, pial) of every vertex from the V1 vertex nearest V1's centre."""
    v1 = [index for index, name in names.items() if re.fullmatch(r"V1[vd]?", name)]
    in_v1 = np.isin(np.rint(areas).astype(int), v1)
    if not in_v1.any():
        raise ValueError(f"No vertex of this hemisphere is labelled V1 in {atlas!r} "
                         f"({sorted(names.values())}); set hierarchy_atlas='Kastner2015'.")
    centre = coords[in_v1].mean(axis=0)
    candidates = np.flatnonzero(in_v1)
    seed = candidates[np.argmin(np.linalg.norm(coords[candidates] - centre, axis=1))]
    return np.linalg.norm(coords - coords[seed], axis=1)


# ---------------------------------------------------------------------- images


class _RangedFile(io.RawIOBase):
    """A read-only, seekable file over a :class:`Source` key (for h5py)."""

    def __init__(self, src: Source, key: str):
        self.src, self.key, self.pos = src, key, 0
        self.length = src.size(key)

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, offset, whence=io.SEEK_SET):
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence] + offset
        return self.pos

    def readinto(self, buffer):
        stop = min(self.pos + len(buffer), self.length)
        data = self.src.read(self.key, self.pos, stop)
        buffer[:len(data)] = data
        self.pos = stop
        return len(data)


@dataclass
class _BrickLayout:
    shape: tuple
    offset: int | None   # byte offset of a contiguous, unfiltered dataset, else None


def _brick_layout(src: Source) -> tuple[_BrickLayout, object]:
    import h5py

    raw = io.BufferedReader(_RangedFile(src, STIMULI_KEY), buffer_size=1 << 16)
    handle = h5py.File(raw, "r")
    if "imgBrick" not in handle:
        raise ValueError(f"{STIMULI_KEY!r} has no 'imgBrick' dataset (found "
                         f"{list(handle)}).")
    brick = handle["imgBrick"]
    if brick.dtype != np.uint8 or brick.ndim != 4 or brick.shape[-1] != 3:
        raise ValueError(f"'imgBrick' must be (n, height, width, 3) uint8; got {brick.shape} "
                         f"{brick.dtype}.")
    offset = brick.id.get_offset() if brick.chunks is None and brick.compression is None else None
    return _BrickLayout(tuple(brick.shape), offset), handle


def read_images(nsd_ids, source=None, *, cache_dir=None, max_workers: int = 16,
                progress=None) -> ImageFiles:
    """NSD stimuli as RGB images (425 × 425), by range requests into ``imgBrick``.

    Each image is cached as a PNG (``<cache>/stimuli/nsdNNNNN.png``); the 39.6 GB
    stimulus file is never read whole, and the images are not kept in memory: the
    result reads each one from its PNG when it is used (a subject's 10,000 images are
    5.4 GB decoded).

    Parameters
    ----------
    nsd_ids : sequence of int
        0-based 73k indices.

    Returns
    -------
    ImageFiles
        A lazy, read-only list of RGB PIL images in ``nsd_ids`` order.
    """
    from PIL import Image

    src = open_source(source, max_workers=max_workers)
    cache = _cache_dir(cache_dir) / "stimuli"
    ids = [int(i) for i in nsd_ids]
    bad = [i for i in ids if not 0 <= i < N_NSD_IMAGES]
    if bad:
        raise ValueError(f"NSD image ids run 0…{N_NSD_IMAGES - 1} (0-based); got {bad[:5]}.")
    paths = {i: cache / f"nsd{i:05d}.png" for i in ids}
    todo = []
    for i in dict.fromkeys(ids):
        if paths[i].exists():
            try:
                with Image.open(paths[i]) as im:
                    im.verify()         # a cut-short PNG fails its checksums
                continue
            except Exception as err:
                discard_unreadable(paths[i], err, what="Cached NSD image", then="fetched again")
        todo.append(i)
    if todo:
        layout, handle = _brick_layout(src)
        if max(todo) >= layout.shape[0]:
            raise ValueError(f"'imgBrick' holds {layout.shape[0]} images; asked for id "
                             f"{max(todo)}.")
        size = int(np.prod(layout.shape[1:]))

        def fetch(i):
            if layout.offset is not None:
                start = layout.offset + i * size
                pixels = np.frombuffer(src.read(STIMULI_KEY, start, start + size), np.uint8)
                pixels = pixels.reshape(layout.shape[1:])
            else:
                pixels = handle["imgBrick"][i]
            with atomic_path(paths[i]) as tmp:
                Image.fromarray(pixels, "RGB").save(tmp, format="PNG")
            if progress is not None:
                progress.update(size)

        workers = max_workers if layout.offset is not None else 1  # h5py is not threaded
        with handle, ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(fetch, todo))
    return ImageFiles([paths[i] for i in ids])


def _coco_ids(src, cache, nsd_ids) -> list:
    table = _read_small(src, cache, STIM_INFO_KEY,
                        lambda path: pd.read_csv(path, usecols=["nsdId", "cocoId"]))
    coco = dict(zip(table["nsdId"].astype(int), table["cocoId"].astype(int)))
    return [coco.get(int(i)) for i in nsd_ids]


# ---------------------------------------------------------------------- the study


def _cache_dir(cache_dir) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else get_data_home() / "nsd"


def _select_images(design: pd.DataFrame, images, sessions: list[int], n_repeats: int,
                   subject: int) -> tuple[list[int], pd.DataFrame]:
    """Image ids and their first ``n_repeats`` trials within ``sessions``."""
    shown = design[design.session.isin(sessions)]
    counts = shown.groupby("nsd_id").size()
    if isinstance(images, str):
        if images not in ("all", "shared1000"):
            raise ValueError(f"'images' must be 'all', 'shared1000' or a list of NSD ids; "
                             f"got {images!r}.")
        candidates = counts.index if images == "all" else counts.index[
            np.isin(counts.index, design.loc[design.shared, "nsd_id"])]
        ids = sorted(int(i) for i in candidates if counts[i] >= n_repeats)
    else:
        asked = [int(i) for i in images]
        unknown = [i for i in asked if i not in set(design.nsd_id)]
        if unknown:
            raise ValueError(f"NSD images {unknown[:5]} were never shown to subj{subject:02d} "
                             "(ids are 0-based 73k indices).")
        short = [i for i in asked if counts.get(i, 0) < n_repeats]
        if short:
            raise ValueError(f"NSD images {short[:5]} have fewer than n_repeats={n_repeats} "
                             f"showings in sessions {sessions}; lower n_repeats or add "
                             "sessions.")
        ids = sorted(set(asked))
    if not ids:
        raise ValueError(f"No image of subj{subject:02d} has {n_repeats} showings within "
                         f"sessions {sessions}; lower n_repeats or add sessions.")
    trials = shown[shown.nsd_id.isin(ids)].sort_values("trial").groupby("nsd_id").head(n_repeats)
    trials = trials.assign(repeat=trials.groupby("nsd_id").cumcount())
    return ids, trials


def load_subject(subject=1, *, images="all", sessions=None, n_repeats: int = 3,
                 hemis=("left", "right"), roi: str | None = "nsdgeneral",
                 resolution: str = "fsaverage5", hierarchy_atlas: str = "Kastner2015",
                 max_images: int | None = None, source=None, cache_dir=None,
                 max_workers: int = 16, dry_run: bool = False, progress: bool = True):
    """Load one NSD subject's fMRI as a :class:`Study` on fsaverage5 (or fsaverage).

    Parameters
    ----------
    subject : int or str
        1…8 (``"subj01"`` also accepted).
    images : "all", "shared1000" or sequence of int
        ``"all"``: every image the subject saw ``n_repeats`` times within ``sessions``;
        ``"shared1000"``: only the 1,000 images every subject saw; or 0-based 73k ids.
        Shared images form the test split, the others the training split (NSD's usual
        split): the fMRI chapters need both, so ``"all"``.
    sessions : sequence of int or None
        Sessions to read (1-based); None: every session in the public release (listed
        from the source). A first run fits in minutes with a few sessions and
        ``n_repeats=1``.
    n_repeats : int
        Showings kept per image (the first ones within ``sessions``); images shown fewer
        times there are left out.
    hemis : sequence of {"left", "right"}
    roi : {"nsdgeneral", "streams", "Kastner2015", "HCP_MMP1"} or None
        NSD's fsaverage atlas whose labelled vertices (value > 0) are kept; None keeps all.
    resolution : {"fsaverage5", "fsaverage"}
        fsaverage5 (10,242 vertices per hemisphere, the book's figures) keeps the first
        10,242 fsaverage vertices after checking on the pial surfaces that they are
        fsaverage5's; fsaverage keeps all 163,842 (16× the download).
    hierarchy_atlas : str
        Atlas whose V1 (``V1``, ``V1v``, ``V1d``) anchors the hierarchy coordinate.
    max_images : int or None
        Keep this many images (half from the test split, spread over ids).
    source : str, path-like or None
        See :func:`open_source` (default: the public bucket).
    cache_dir : path-like or None
        Blocks, small files and stimuli; default ``$GRADBRAIN_DATA/nsd``.
    max_workers : int
        Parallel range requests.
    dry_run : bool
        Print the files, trials and bytes a load would read, and return that plan (a
        dict) without reading betas or images.
    progress : bool
        Show download progress in bytes.

    Returns
    -------
    Study
        ``betas`` (n_images, n_repeats, n_vertices) float32, each vertex z-scored within
        each session over all its trials; ``ncsnr`` and ``hierarchy`` (Euclidean pial
        distance in mm from V1) per vertex; ``vertices``/``hemi`` on ``mesh`` =
        ``resolution``; ``image_ids`` ``"nsdNNNNN"`` (0-based 73k index) with the
        images, whose ``sources`` give the NSD and COCO ids. Vertices without data (NaN
        or constant in a session, or without an NC estimate) are left out.
    """
    from tqdm.auto import tqdm

    subject = _check_subject(subject)
    if isinstance(n_repeats, bool) or not isinstance(n_repeats, (int, np.integer)) \
            or not 1 <= n_repeats <= 3:
        raise ValueError(f"'n_repeats' must be 1, 2 or 3 (NSD shows each image up to 3 "
                         f"times); got {n_repeats!r}.")
    if resolution not in RESOLUTIONS:
        raise ValueError(f"'resolution' must be one of {list(RESOLUTIONS)}; got "
                         f"{resolution!r}.")
    if roi not in ROIS:
        raise ValueError(f"'roi' must be one of {list(ROIS)}; got {roi!r}.")
    hemis = tuple(hemis)
    if not hemis or any(h not in HEMIS for h in hemis) or len(set(hemis)) != len(hemis):
        raise ValueError(f"'hemis' must be a non-empty subset of ('left', 'right'); got "
                         f"{hemis!r}.")
    src = open_source(source, max_workers=max_workers)
    cache = _cache_dir(cache_dir)
    design = read_design(subject, src, cache_dir=cache)
    public = available_sessions(subject, src)
    if sessions is None:
        sessions = public
    else:
        sessions = sorted({int(s) for s in sessions})
        for s in sessions:
            if not 1 <= s <= N_SESSIONS[subject]:
                raise ValueError(f"subj{subject:02d} has sessions 1…{N_SESSIONS[subject]}; "
                                 f"got session {s}.")
            if s not in public:
                raise ValueError(f"Session {s} of subj{subject:02d} is not in "
                                 f"{src.description} (held out of the public release, or "
                                 f"not copied); available: {public}.")
    explicit = sessions is not public
    split_of = {i: "test" if s else "train"
                for i, s in zip(design.nsd_id, design.shared)}
    if max_images is not None and (isinstance(max_images, bool) or not isinstance(
            max_images, (int, np.integer)) or max_images < 1):
        raise ValueError(f"'max_images' must be a positive integer or None; got "
                         f"{max_images!r}.")
    hemi_codes = [HEMIS[h] for h in hemis]
    # NSD lists some sessions it does not let anyone download (held out of the public
    # release: HTTP 403): a session whose header cannot be read is left out, and the
    # images are chosen again from the others
    forbidden: list[int] = []
    while True:
        ids, trials = _select_images(design, images, sessions, n_repeats, subject)
        if max_images is not None:
            ids = stratified_subset(ids, split_of, int(max_images))
            trials = trials[trials.nsd_id.isin(ids)]
        read_sessions = sorted(set(trials.session))
        files = [betas_key(subject, s, h) for s in read_sessions for h in hemi_codes]
        shapes, denied = {}, []
        for key, session in zip(files, [s for s in read_sessions for _ in hemi_codes]):
            if session in denied:
                continue
            try:
                shapes[key] = _mgh_shape(src, key, cache)
            except PermissionError:
                denied.append(session)
        if not denied:
            break
        if explicit:
            raise PermissionError(
                f"Session(s) {denied} of subj{subject:02d} are listed in {src.description} "
                "but cannot be downloaded (HTTP 403: NSD holds some sessions out of the "
                "public release). Leave them out of 'sessions', or pass sessions=None to "
                "use every downloadable one.")
        forbidden += denied
        sessions = [s for s in sessions if s not in denied]
        if not sessions:
            raise PermissionError(f"No session of subj{subject:02d} in {src.description} "
                                  "can be downloaded (HTTP 403 for every one). "
                                  + _ACCESS_HELP)
    kept = {key: _n_keep(resolution, shapes[key][0], key) for key in files}
    absent = [s for s in range(1, N_SESSIONS[subject] + 1) if s not in public]
    print(f"NSD subj{subject:02d}: using sessions {_spans(read_sessions)} of "
          f"{N_SESSIONS[subject]}"
          + (f"; {_spans(forbidden)} listed but not downloadable (HTTP 403)"
             if forbidden else "")
          + (f"; {_spans(absent)} not in the source" if absent else "")
          + (f"; {_spans([s for s in sessions if s not in read_sessions])} hold none of "
             "the images kept" if set(sessions) - set(read_sessions) else "") + ".",
          file=sys.stdout)
    plan = {
        "subject": subject, "sessions": read_sessions, "sessions_forbidden": sorted(forbidden),
        "sessions_absent": absent, "n_images": len(ids),
        "n_trials_kept": len(trials), "n_trials_read": len(read_sessions) * TRIALS_PER_SESSION,
        "files": files,
        "betas_bytes": sum(_session_request_bytes(shapes[key][0], kept[key]) for key in files),
        "image_bytes": len(ids) * 425 * 425 * 3,
    }
    if dry_run:
        _print_plan(plan, src, resolution)
        return plan

    # per vertex: atlas labels, ROI, coordinates, NC
    per_hemi = {}
    for hemi in hemi_codes:
        n_keep = kept[betas_key(subject, read_sessions[0], hemi)]
        coords = _surface(src, cache, hemi)
        if resolution == "fsaverage5":
            _check_fsaverage5(coords, hemi)
        areas = _label(src, cache, hierarchy_atlas, hemi)
        names = _read_small(src, cache, ctab_key(hierarchy_atlas), read_ctab)
        distance = _v1_distance(coords, areas, names, hierarchy_atlas)[:n_keep]
        keep = np.ones(n_keep, bool) if roi is None else _label(src, cache, roi, hemi)[:n_keep] > 0
        ncsnr = _read_ncsnr(src, cache, subject, hemi)[:n_keep]
        per_hemi[hemi] = dict(keep=keep & np.isfinite(ncsnr), distance=distance, ncsnr=ncsnr)

    position = {i: k for k, i in enumerate(ids)}
    n_vertices = {h: int(per_hemi[h]["keep"].sum()) for h in hemi_codes}
    betas = np.full((len(ids), n_repeats, sum(n_vertices.values())), np.nan, np.float32)
    bar = tqdm(total=plan["betas_bytes"], unit="B", unit_scale=True, disable=not progress,
               desc=f"NSD subj{subject:02d} betas")
    with bar:
        for session in read_sessions:
            rows = trials[trials.session == session]
            image_index = rows.nsd_id.map(position).to_numpy()
            repeat = rows.repeat.to_numpy()
            column = 0
            for hemi in hemi_codes:
                keep = per_hemi[hemi]["keep"]
                key = betas_key(subject, session, hemi)
                z = _zscore(_session_betas(src, cache, subject, session, hemi, resolution,
                                           shapes[key], max_workers, bar)[:, keep])
                betas[image_index, repeat, column:column + keep.sum()] = \
                    z[rows.trial_in_session.to_numpy()]
                column += keep.sum()
    finite = np.isfinite(betas).all(axis=(0, 1))
    vertex_index = np.concatenate([np.flatnonzero(per_hemi[h]["keep"]) for h in hemi_codes])
    hemi_names = np.concatenate([np.full(n_vertices[h], side, dtype="<U5")
                                 for side, h in zip(hemis, hemi_codes)])
    distance = np.concatenate([per_hemi[h]["distance"][per_hemi[h]["keep"]] for h in hemi_codes])
    ncsnr = np.concatenate([per_hemi[h]["ncsnr"][per_hemi[h]["keep"]] for h in hemi_codes])

    image_bar = tqdm(total=plan["image_bytes"], unit="B", unit_scale=True,
                     disable=not progress, desc="NSD stimuli")
    with image_bar:
        pictures = read_images(ids, src, cache_dir=cache, max_workers=max_workers,
                               progress=image_bar)
    coco = _coco_ids(src, cache, ids)
    image_ids = [f"nsd{i:05d}" for i in ids]
    return Study(
        name=f"NSD subj{subject:02d}",
        image_ids=image_ids,
        images=ImageSet(images=pictures, ids=image_ids,
                        labels=[split_of[i] for i in ids],
                        sources=[f"NSD {i} (COCO {c})" for i, c in zip(ids, coco)]),
        split=np.array([split_of[i] for i in ids], dtype="<U5"),
        betas=np.ascontiguousarray(betas[:, :, finite]),
        vertices=vertex_index[finite],
        hemi=hemi_names[finite],
        hierarchy=distance[finite],
        ncsnr=ncsnr[finite].astype(float),
        mesh=resolution,
    )


def _read_ncsnr(src, cache, subject: int, hemi: str) -> np.ndarray:
    import nibabel as nib

    return _read_small(src, cache, ncsnr_key(subject, hemi), lambda path: np.asarray(
        nib.load(path).get_fdata(), dtype=float).ravel())


def _spans(numbers) -> str:
    """``[1, 2, 3, 5, 7, 8]`` → ``"1–3, 5, 7–8"``."""
    numbers, out = sorted(set(int(n) for n in numbers)), []
    start = prev = None
    for n in numbers + [None]:
        if start is not None and (n is None or n != prev + 1):
            out.append(f"{start}" if start == prev else f"{start}–{prev}")
            start = None
        if n is not None and start is None:
            start = n
        prev = n
    return ", ".join(out) or "none"


def _print_plan(plan: dict, src: Source, resolution: str) -> None:
    gb = 1e9
    lines = [
        f"NSD subj{plan['subject']:02d} from {src.description} ({resolution}):",
        f"  sessions {plan['sessions']}: {plan['n_trials_read']} trials read per hemisphere "
        f"(whole sessions, for the per-session z-score), {plan['n_trials_kept']} kept "
        f"({plan['n_images']} images)",
        f"  betas: {len(plan['files'])} files, {plan['betas_bytes'] / gb:.2f} GB by range "
        "requests",
        f"  stimuli: {plan['n_images']} images, {plan['image_bytes'] / gb:.2f} GB from "
        f"{STIMULI_KEY}",
        "  files:",
        *[f"    {key}" for key in plan["files"]],
    ]
    print("\n".join(lines), file=sys.stdout)
