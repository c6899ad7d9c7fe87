"""MedMNIST npz files -> `datasets.DatasetDict` (train / validation / test), converted once and cached as Arrow.

A local file (from `data_dir` or `$MEDMNIST_ROOT`) is checked by its structure: keys, shapes, dtypes, split sizes and
label range (some correct copies are ordered differently from the official file, so their MD5 differs). A download is
checked by its MD5. The Arrow cache is keyed on the file's content (a BLAKE2 hash), so a replaced file is never
served stale. Nothing partial is kept: downloads and caches are written under a temporary name that carries the
writer's process id and renamed when complete; what a killed writer left is removed by the next load.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import http.client
import os
import re
import shutil
import socket
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path

import datasets
import numpy as np
from tqdm.auto import tqdm

from .catalogue import CATALOGUE, SPLITS, MedMNISTInfo, dataset_info

CACHE_VERSION = 1  # bump when the Arrow layout changes, so old caches are not reused


def default_cache_dir() -> Path:
    """Where downloads and Arrow caches go: `$MEDFORMER_CACHE`, else under the `datasets` cache."""
    return Path(os.environ.get("MEDFORMER_CACHE", Path(datasets.config.HF_DATASETS_CACHE) / "medformer_medmnist"))


def load_medmnist(
    name: str,
    size: int = 28,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    mirror: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> datasets.DatasetDict:
    """Load one MedMNIST dataset as a `DatasetDict` with splits train / validation / test.

    Columns: `pixel_values` (uint8, channels first: (C, H, W) or (1, D, H, W)), `label` (`ClassLabel`, or 0/1 per
    label for multi-label sets), and `task`, `modality`, `body_part` (strings from the catalogue).

    Args:
        name: a MedMNIST flag such as "pneumoniamnist" or "organmnist3d".
        size: 28, 64, 128 or 224 (3D sets: 28 or 64).
        data_dir: folder searched first for the official file name (then `$MEDMNIST_ROOT`, then the cache).
        download: fetch a missing file from the official URL (or `mirror`), checking its MD5.
        mirror: base URL serving the official file names, used instead of the official URL (default:
            `$MEDMNIST_MIRROR`, which the example scripts read too).
        cache_dir: where downloads and Arrow caches go (default: `default_cache_dir()`).
    """
    info = dataset_info(name)
    if size not in info.sizes:
        raise ValueError(f"{info.name} comes in sizes {list(info.sizes)}, not {size}.")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = find_or_download(info, size, data_dir, download, mirror, cache_dir)
    arrow_dir = cache_dir / "arrow" / f"{info.name}_{size}_v{CACHE_VERSION}_{content_hash(path)}"
    remove_abandoned_partials(arrow_dir.parent)
    if not arrow_dir.exists():
        dataset = convert_npz(path, info, size)
        arrow_dir.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=_partial_prefix(arrow_dir.name), dir=arrow_dir.parent))
        try:
            dataset.save_to_disk(str(partial))
            os.replace(partial, arrow_dir)
        except OSError:
            if not arrow_dir.exists():
                raise
            # Another process built the same cache first (parallel runs on a fresh machine): use theirs.
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return datasets.load_from_disk(str(arrow_dir))


def content_hash(path: Path) -> str:
    """BLAKE2 of the file's bytes (about 0.1 s for a 30 MB file), memoised while its inode and change time stay."""
    stat = path.stat()
    return _content_hash(str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


@functools.lru_cache(maxsize=256)
def _content_hash(path: str, inode: int, size: int, mtime_ns: int, ctime_ns: int) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as file:
        while chunk := file.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _partial_prefix(name: str) -> str:
    """Temporary names carry the writer's host and pid, so a later load can tell abandoned ones from ones being
    written (by this machine or, on a shared filesystem, by another one)."""
    return f".{name}.{socket.gethostname()}.pid{os.getpid()}."


def remove_abandoned_partials(folder: Path) -> None:
    """Delete temporary files and folders in `folder` written on this machine by processes that no longer run."""
    if not folder.is_dir():
        return
    host = socket.gethostname()
    for entry in folder.glob(f".*.{glob.escape(host)}.pid*.*"):
        pid = re.search(rf"\.{re.escape(host)}\.pid(\d+)\.", entry.name)
        if pid is None or _process_alive(int(pid.group(1))):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def local_datasets(data_dir: str | os.PathLike, size: int = 28) -> list[str]:
    """The catalogued sets whose official file of `size` is in `data_dir`, in catalogue order (the scripts' default)."""
    return [name for name, info in CATALOGUE.items() if (Path(data_dir) / info.filename(size)).is_file()]


def search_folders(data_dir: str | os.PathLike | None = None, cache_dir: Path | None = None) -> list[Path]:
    """Where a MedMNIST file is looked for, in order: `data_dir`, `$MEDMNIST_ROOT`, then earlier downloads."""
    folders = [Path(folder) for folder in (data_dir, os.environ.get("MEDMNIST_ROOT")) if folder]
    return [*folders, (cache_dir if cache_dir is not None else default_cache_dir()) / "npz"]


def find_local(
    info: MedMNISTInfo, size: int, data_dir: str | os.PathLike | None = None, cache_dir: Path | None = None
) -> Path | None:
    """The set's official file of `size` in the first of `search_folders` that has it, else None."""
    filename = info.filename(size)
    return next(
        (folder / filename for folder in search_folders(data_dir, cache_dir) if (folder / filename).is_file()), None
    )


def find_or_download(
    info: MedMNISTInfo,
    size: int,
    data_dir: str | os.PathLike | None,
    download: bool,
    mirror: str | None,
    cache_dir: Path,
) -> Path:
    """The npz path: the first local folder that has it, else a fresh, MD5-checked download into the cache."""
    filename = info.filename(size)
    if data_dir is not None and not Path(data_dir).is_dir():
        raise FileNotFoundError(f"data_dir {data_dir} is not a folder; pass the folder that holds {filename}.")
    local = find_local(info, size, data_dir, cache_dir)
    if local is not None:
        return local
    searched = ", ".join(str(folder) for folder in search_folders(data_dir, cache_dir))
    if not download:
        raise FileNotFoundError(
            f"{filename} is not in {searched}. Put it in one of them (or set MEDMNIST_ROOT), or pass download=True."
        )
    mirror = mirror or os.environ.get("MEDMNIST_MIRROR")  # the scripts' way to name one
    url = f"{mirror.rstrip('/')}/{filename}" if mirror else info.urls[size]
    target = cache_dir / "npz" / filename
    download_file(url, target, info.md5s[size], searched)
    return target


def download_file(url: str, target: Path, md5: str, searched: str) -> None:
    """Stream `url` to `target` through a temporary file; keep it only if complete and its MD5 matches."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_partials(target.parent)
    handle, partial_name = tempfile.mkstemp(prefix=_partial_prefix(target.name), dir=target.parent)
    partial = Path(partial_name)
    digest = hashlib.md5()
    try:
        with os.fdopen(handle, "wb") as output, urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {target.name}") as progress:
                while chunk := response.read(1 << 20):
                    output.write(chunk)
                    digest.update(chunk)
                    progress.update(len(chunk))
        if digest.hexdigest() != md5:
            raise ValueError(
                f"{target.name} from {url} has MD5 {digest.hexdigest()}, expected {md5}: the download is truncated "
                "or corrupt, or the mirror serves another version. Nothing was kept; try again or another mirror."
            )
        os.replace(partial, target)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
        raise ConnectionError(
            f"Could not download {target.name} from {url} ({error}). Without internet, put the file in one of "
            f"{searched} (or set MEDMNIST_ROOT), or name a mirror serving the official file names: set "
            "MEDMNIST_MIRROR=<base URL> (also for the example scripts), or pass mirror=<base URL> to load_medmnist."
        ) from error
    finally:
        partial.unlink(missing_ok=True)


def read_npz(path: Path, info: MedMNISTInfo, size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Images (channels first) and labels of each split, after checking the file's structure against the catalogue."""
    problem = f"{path} is not a valid {info.filename(size)}"
    fix = "delete it and download it again (or replace it with the official file)"
    try:
        archive = np.load(path)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError(f"{problem}: it holds a single array (a .npy file), not an npz archive; {fix}.")
        arrays = {key: archive[key] for key in archive.files}
    except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError) as error:
        if str(error).startswith(problem):
            raise
        raise ValueError(f"{problem}: it cannot be read ({type(error).__name__}: {error}); {fix}.") from error
    expected_keys = {f"{prefix}_{kind}" for prefix in SPLITS.values() for kind in ("images", "labels")}
    if set(arrays) != expected_keys:
        raise ValueError(f"{problem}: its keys are {sorted(arrays)}, expected {sorted(expected_keys)}; {fix}.")
    spatial = (size,) * info.spatial_dims
    stored_shape = spatial + ((info.num_channels,) if info.num_channels > 1 else ())
    label_width = len(info.labels) if info.task_type == "multilabel" else 1
    splits = {}
    for split, prefix in SPLITS.items():
        images, labels = arrays[f"{prefix}_images"], arrays[f"{prefix}_labels"]
        count = info.split_sizes[split]
        if images.shape != (count, *stored_shape) or images.dtype != np.uint8:
            raise ValueError(
                f"{problem}: {prefix}_images is {images.dtype} {images.shape}, expected uint8 "
                f"{(count, *stored_shape)}; {fix}."
            )
        if labels.shape != (count, label_width):
            raise ValueError(f"{problem}: {prefix}_labels has shape {labels.shape}, expected {(count, label_width)}.")
        high = 1 if info.task_type == "multilabel" else len(info.labels) - 1
        if labels.dtype.kind not in "biuf" or (
            labels.dtype.kind == "f" and not (np.isfinite(labels).all() and (labels == np.round(labels)).all())
        ):
            raise ValueError(f"{problem}: {prefix}_labels must hold whole numbers, got {labels.dtype} values; {fix}.")
        if labels.min() < 0 or labels.max() > high:
            raise ValueError(
                f"{problem}: {prefix}_labels holds values {labels.min()}..{labels.max()}, outside 0..{high}; {fix}."
            )
        channels_first = np.moveaxis(images, -1, 1) if info.num_channels > 1 else images[:, None]
        splits[split] = (np.ascontiguousarray(channels_first), labels)
    return splits


def features_for(info: MedMNISTInfo, size: int) -> datasets.Features:
    shape = info.image_shape(size)
    array_type = datasets.Array3D if len(shape) == 3 else datasets.Array4D
    if info.task_type == "multilabel":
        label = datasets.List(datasets.Value("uint8"), length=len(info.labels))
    else:
        label = datasets.ClassLabel(names=list(info.labels))
    return datasets.Features(
        {
            "pixel_values": array_type(shape=shape, dtype="uint8"),
            "label": label,
            "task": datasets.Value("string"),
            "modality": datasets.Value("string"),
            "body_part": datasets.Value("string"),
        }
    )


def convert_npz(path: Path, info: MedMNISTInfo, size: int) -> datasets.DatasetDict:
    """Build the in-memory `DatasetDict` from a checked npz."""
    features = features_for(info, size)
    splits = {}
    for split, (images, labels) in read_npz(path, info, size).items():
        count = len(images)
        columns = {
            "pixel_values": images,
            "label": labels if info.task_type == "multilabel" else labels[:, 0].astype(np.int64),
            "task": [info.name] * count,
            "modality": [info.modality] * count,
            "body_part": [info.body_part] * count,
        }
        splits[split] = datasets.Dataset.from_dict(columns, features=features, split=split)
    return datasets.DatasetDict(splits)
