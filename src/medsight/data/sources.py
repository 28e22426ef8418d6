"""Where samples come from. Everything here returns a :class:`Dataset`: in-memory arrays per split.

Images are held as ``(N, C, *spatial)`` arrays: uint8 (MedMNIST, scaled by 1/255 on the device) or float32
already in [0, 1] (user files after the reader's intensity normalisation). ``recipe`` says how a raw file is
turned into such an array at prediction time, and is saved in the model bundle.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medsight.data.dataset import Dataset, Split, resolve_class  # noqa: F401 - re-exported
from medsight.data.download import download, md5sum  # noqa: F401 - re-exported
from medsight.data.medmnist import INFO, MedMNISTInfo
from medsight.errors import DataError, choices_message
from medsight.tasks import class_names_for, infer_task, kind_of

if TYPE_CHECKING:
    from medsight.config import DataConfig

SPLITS = ("train", "val", "test")
NPZ_KEYS = tuple(f"{s}_{k}" for s in SPLITS for k in ("images", "labels"))


def default_data_dir() -> Path:
    env = os.environ.get("MEDSIGHT_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".medsight" / "data"


def _offline_hint(info, size: int, root: Path) -> str:
    """What to do without network access (the same steps as the README's "Data without network access")."""
    return (f"without network access, download {info.url(size)} on another machine, check its MD5 is "
            f"{info.md5[size]}, and copy it to {root / info.filename(size)} (or set MEDSIGHT_DATA_DIR to the "
            f"folder that holds {info.filename(size)})")


def medmnist_path(name: str, size: int = 28, root: str | Path | None = None, download_missing: bool = True) -> Path:
    """Find (or download) the official file for a MedMNIST set and check its published MD5."""
    info = medmnist_info(name)
    if size not in info.md5:
        raise DataError(f"{name} is released at sizes {', '.join(map(str, info.sizes))}, not {size}")
    root = Path(root).expanduser() if root else default_data_dir()
    path = root / info.filename(size)
    expected = info.md5[size]
    if not path.exists():
        if not download_missing:
            raise DataError(f"{path} not found and downloading is off; {_offline_hint(info, size, root)}")
        try:
            download(info.url(size), path, expected)
        except DataError as e:
            raise DataError(f"{name} (size {size}) is not in {root} and could not be downloaded ({e}); "
                            f"{_offline_hint(info, size, root)}") from e
    got = md5sum(path)
    if got != expected:
        raise DataError(f"{path} has MD5 {got}, but the official {info.filename(size)} has {expected}; "
                        "the file is corrupt or not the official release (delete it to re-download)")
    return path


def medmnist_info(name: str) -> MedMNISTInfo:
    key = name.lower()
    if key not in INFO:
        raise DataError(choices_message("MedMNIST dataset", name, INFO))
    return INFO[key]


def check_npz(path: str | Path) -> None:
    """Refuse, in medsight's own words, a file named .npz that is not a zip archive of arrays (numpy would advise
    loading it "unsafely" with allow_pickle, which medsight never does)."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        return
    with open(path, "rb") as f:
        head = f.read(512)
    what = ("empty" if not head else "a single .npy array, not an archive" if head.startswith(b"\x93NUMPY") else
            "text" if all(32 <= b < 127 or b in (9, 10, 13) for b in head) else "not a zip archive")
    raise DataError(f"{path} is not an .npz archive (the file is {what}); an .npz is a zip of arrays, as written by "
                    f"numpy.savez, with {', '.join(NPZ_KEYS[:2])}, ...")


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Read a MedMNIST-layout .npz; refuses missing keys or mismatched lengths with a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} not found")
    check_npz(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in NPZ_KEYS if k not in z.files]
            if missing:
                raise DataError(f"{path} lacks keys {', '.join(missing)}; an .npz needs {', '.join(NPZ_KEYS)} "
                                f"(found {', '.join(z.files) or 'none'})")
            arrays = {k: z[k] for k in NPZ_KEYS}
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"cannot read {path}: not a valid .npz archive ({type(e).__name__}: {e})") from e
    for s in SPLITS:
        ni, nl = len(arrays[f"{s}_images"]), len(arrays[f"{s}_labels"])
        if ni != nl:
            raise DataError(f"{path}: {s}_images has {ni} items but {s}_labels has {nl}")
        if ni == 0:
            raise DataError(f"{path}: split {s} is empty")
    return arrays


def _channel_first(images: np.ndarray, spatial_dims: int, path: Path) -> np.ndarray:
    """(N, *spatial) or (N, *spatial, C) -> (N, C, *spatial)."""
    from medsight.data.cache import DiskArray

    if isinstance(images, DiskArray):  # rows read on demand: the layout is applied per read
        raw = images._row_shape
        if len(raw) == spatial_dims:
            images.layout = "none"
        elif len(raw) == spatial_dims + 1 and raw[-1] in (1, 3, 4):
            images.layout = "last"
        else:
            raise DataError(f"{path}: images of shape {raw} are not {spatial_dims}D gray or RGB")
        return images
    if images.ndim == spatial_dims + 1:
        return images[:, None]
    if images.ndim == spatial_dims + 2 and images.shape[-1] in (1, 3, 4):
        return np.ascontiguousarray(np.moveaxis(images, -1, 1))
    raise DataError(f"{path}: images of shape {images.shape[1:]} are not {spatial_dims}D gray or RGB")


def _cached_npz(path: Path, md5: str, cache_dir, stream, memory_budget_gb) -> dict:
    """The archive's arrays from the dataset cache (extracted once, streamed): labels in memory, images in memory
    or as :class:`~medsight.data.cache.DiskArray` (still in the archive's own layout, see ``_channel_first``)."""
    from medsight.data import cache

    entry = cache.extract_archive(path, md5, cache.resolve_dir(cache_dir), NPZ_KEYS)
    root = Path(entry["path"])
    nbytes = sum(entry["arrays"][f"{s}_images.npy"]["bytes"] for s in SPLITS)
    on_disk = cache.choose_stream(nbytes, stream, memory_budget_gb)
    arrays = {}
    for k in NPZ_KEYS:
        if k.endswith("_images") and on_disk:
            arrays[k] = cache.DiskArray(root / f"{k}.npy")
        else:
            arrays[k] = np.load(root / f"{k}.npy", allow_pickle=False)
    for s in SPLITS:
        ni, nl = len(arrays[f"{s}_images"]), len(arrays[f"{s}_labels"])
        if ni != nl or ni == 0:
            raise DataError(f"{path}: {s}_images has {ni} items and {s}_labels {nl}")
    return arrays


def dataset_from_npz(path: str | Path, *, name: str | None = None, task: str | None = None,
                     classes: list[str] | None = None, spatial_dims: int | None = None,
                     arrays: dict | None = None) -> Dataset:
    path = Path(path)
    arrays = read_npz(path) if arrays is None else arrays
    img = arrays["train_images"]
    if spatial_dims is None:
        # (N,H,W) gray 2D, (N,H,W,3) RGB 2D, (N,D,H,W) gray 3D
        spatial_dims = 2 if img.ndim == 3 or (img.ndim == 4 and img.shape[-1] in (1, 3, 4)) else 3
    labels = {s: arrays[f"{s}_labels"] for s in SPLITS}
    lab = labels["train"]
    if task is None:
        multi = lab.ndim == 2 and lab.shape[1] > 1
        n = int(max(np.max(v) for v in labels.values())) + 1
        task = infer_task(multi, n)
    kind = kind_of(task)
    if classes is None:
        k = lab.shape[1] if kind.indicator_labels else int(max(np.max(v) for v in labels.values())) + 1
        classes = class_names_for(task, k)
    splits = {}
    for s in SPLITS:
        images = _channel_first(arrays[f"{s}_images"], spatial_dims, path)
        if images.dtype != np.uint8:
            images = images.astype(np.float32)
            lo, hi = float(images.min()), float(images.max())
            if lo < 0 or hi > 1:
                raise DataError(f"{path}: {s}_images must be uint8 or float in [0, 1], got range [{lo:g}, {hi:g}]")
        y = labels[s]
        y = kind.encode_labels(y)
        kind.check_labels(y, len(classes), f"{path}: {s}_labels")
        splits[s] = Split(images=images, labels=y, ids=[f"{s}-{i}" for i in range(len(y))])
    from medsight.data.preprocess import make_recipe

    recipe = make_recipe(size=splits["train"].images.shape[2:], spatial_dims=spatial_dims,
                         channels=int(splits["train"].images.shape[1]), intensity="range",
                         value_range=(0.0, 255.0) if img.dtype == np.uint8 else (0.0, 1.0))
    return Dataset(name=name or path.stem, task=task, classes=list(classes), spatial_dims=spatial_dims,
                   splits=splits, recipe=recipe)


def load_medmnist(name: str, size: int = 28, root: str | Path | None = None, download_missing: bool = True,
                  positive_class: int | str | None = None, *, cache_dir=None, stream: str | bool = "auto",
                  memory_budget_gb: float | None = None) -> Dataset:
    """An official MedMNIST set; binary sets get their clinical positive class at index 1 (see
    :data:`medsight.data.medmnist.POSITIVE_CLASS`) unless ``positive_class`` names another.

    The archive is extracted once into the dataset cache (:mod:`medsight.data.cache`); later loads of the same
    file (same size and mtime) skip the MD5 check and the decompression, and splits above the memory budget (or
    with ``stream`` true) are read from disk on demand."""
    from medsight.data import cache

    info = medmnist_info(name)
    if size not in info.md5:
        raise DataError(f"{name} is released at sizes {', '.join(map(str, info.sizes))}, not {size}")
    local = (Path(root).expanduser() if root else default_data_dir()) / info.filename(size)
    if cache.find_archive_entry(local, info.md5[size], cache.resolve_dir(cache_dir)) is not None:
        path = local  # extracted before from this very file (MD5 checked then; size and mtime unchanged)
    else:
        path = medmnist_path(info.name, size, root, download_missing)
    arrays = _cached_npz(path, info.md5[size], cache_dir, stream, memory_budget_gb)
    ds = dataset_from_npz(path, name=info.name if size == 28 else f"{info.name}_{size}", task=info.task,
                          classes=list(info.classes), spatial_dims=info.spatial_dims, arrays=arrays)
    ds.recipe["source"] = {"medmnist": info.name, "size": size}
    ds.split_origin = "official MedMNIST split"
    ds.native_size = {"median": [size] * info.spatial_dims, "resized": False}
    if positive_class is not None:
        ds.set_positive_class(positive_class, "set by data.positive_class")
    elif info.positive_class is not None:
        ds.set_positive_class(info.positive_class, f"MedMNIST default for {info.name}")
    return ds


def load_dataset(spec: str | DataConfig, *, seed: int = 0, **settings: Any) -> Dataset:
    """Resolve ``--data``: a MedMNIST name, an .npz path, a class-per-folder tree or a CSV manifest.

    ``spec``: the run's :class:`medsight.config.DataConfig` (the pipeline passes ``cfg.data``), or its ``name``
    with any other of its fields as keywords (``load_dataset("breastmnist", size=64, download=False)``);
    ``seed``: the split seed for user data without given splits.

    This is the one place the positive class of a binary task is settled: ``positive_class`` (a name or an index
    in the data's own class order), else the MedMNIST default, else (user data) the second class in sorted order,
    which ``Dataset.positive_class_source`` then says was not chosen by anyone.
    """
    from medsight.config import DataConfig

    if isinstance(spec, DataConfig):
        if settings:
            raise TypeError(f"load_dataset: give the DataConfig or keywords, not both ({', '.join(settings)})")
        d = spec
    else:
        d = DataConfig(name=str(spec), **{k: os.fspath(v) if isinstance(v, os.PathLike) else v
                                          for k, v in settings.items()})
    spec, positive_class = d.name, d.positive_class
    p = Path(spec).expanduser()
    if spec.lower() in INFO:
        return load_medmnist(spec, d.size, d.root, d.download, positive_class=positive_class,
                             cache_dir=d.cache_dir, stream=d.stream, memory_budget_gb=d.memory_budget_gb)
    if p.suffix == ".npz":
        ds = dataset_from_npz(p, task=d.task)
        ds.split_origin = f"given in {p.name} (train/val/test arrays)"
    elif p.exists():
        from medsight.data import folders

        ds = folders.load_user_dataset(p, d, seed=seed)
    else:
        raise DataError(f"--data {spec!r} is neither a MedMNIST name ({', '.join(sorted(INFO))}), "
                        "nor an existing .npz, folder or CSV manifest")
    if positive_class is not None:
        ds.set_positive_class(positive_class, "set by data.positive_class")
    elif kind_of(ds.task).has_positive_class:
        ds.set_positive_class(1, "not set: the second class in sorted order (choose with data.positive_class)")
    return ds


def local_status(root: str | Path | None = None) -> list[dict]:
    """One row per MedMNIST set and size: whether its file is present in the data dir."""
    root = Path(root).expanduser() if root else default_data_dir()
    rows = []
    for info in INFO.values():
        for size in info.sizes:
            f = root / info.filename(size)
            rows.append({"name": info.name, "size": size, "task": info.task, "dims": info.spatial_dims,
                         "classes": len(info.classes), "present": f.exists(), "path": str(f)})
    return rows
