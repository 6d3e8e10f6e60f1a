"""Dataset splits with a deterministic order, stable sample ids, labels, class names and a fingerprint.

    digits          sklearn's bundled 8x8 digits (the embedded default). Fixed split: ids 0..1436 train,
                    1437..1796 test (sklearn's order; the test writers are not in train).
    mnist,          IDX .gz files in one directory: {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz.
    fashion-mnist   id = record index in the split's file.
    cifar10         the binary-batch format (data_batch_1..5.bin, test_batch.bin, batches.meta.txt, in root or
                    root/cifar-10-batches-bin; id = record index across the split's batches in order), or the
                    folder layout root/{train,test}/<class>/*.jpg, read like imagefolder (sorted class names are
                    CIFAR's official order, so both layouts give the same labels).
    imagefolder     root/{train,test}/<class>/*.{jpg,jpeg,png}: classes = sorted folder names of both splits (so
                    train and test labels agree), files sorted by relative path, id = position in that list.
                    Images keep their size (Preprocess resizes + center-crops); grey stays grey, the rest is RGB.

Data root: --data-root DIR, else $DIFFSTORE_DATA/<name>, else a system default when present
(fashion-mnist: /usr/share/datasets/fashion-mnist). The resolved root is recorded in `source` (provenance) but
left out of the fingerprint, so colleagues with the same files under other paths share keys.

Corrupt data: a truncated or malformed IDX/CIFAR file is always refused, naming the file. In folder layouts a
corrupt image is refused when it is decoded, naming it; with skip_bad every image is decoded once up front and
unreadable ones are dropped: their ids go to Split.skipped and the other ids do not move (an id is a position in
the full sorted list). Dropping ids changes the ids hash, so a skip_bad split never mixes with a complete one.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import zlib
from dataclasses import dataclass, field, replace
from functools import cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from .errors import DiffstoreError
from .key import fingerprint, ids_sha256, sha256_files

if TYPE_CHECKING:
    from .preprocess import Preprocess

DIGITS_TRAIN = 1437
DATA_ENV = "DIFFSTORE_DATA"
SYSTEM_ROOTS = {"fashion-mnist": "/usr/share/datasets/fashion-mnist"}
DIGIT_CLASSES = [str(i) for i in range(10)]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IDX_IMAGES, IDX_LABELS = 0x803, 0x801  # magic numbers: unsigned bytes, 3 or 1 dimensions
CIFAR_RECORD = 1 + 3 * 32 * 32  # label byte + CHW pixels
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
SKIP_HINT = "fix or remove it, or pass --skip-bad to skip unreadable images (their ids are recorded)"


@dataclass
class Split:
    name: str  # dataset name, a store path segment: "digits"
    split: str  # "train" | "test"
    ids: np.ndarray  # int64 [N], stable sample ids (noise is keyed by them)
    labels: np.ndarray  # int64 [N]
    class_names: list[str]
    source: dict  # plain JSON describing where the data came from (part of the fingerprint)
    # load(rows) -> sequence of uint8 images (HxW or HxWxC) for the given row positions
    load: Callable[[np.ndarray], list] = field(repr=False, default=None)
    skipped: list[int] = field(default_factory=list)  # ids dropped by --skip-bad

    def __len__(self) -> int:
        return len(self.ids)

    def ids_sha256(self) -> str:
        return ids_sha256(self.ids)

    def take(self, ids: np.ndarray, hint: str = "") -> "Split":
        """The samples `ids`, in that order (a store may hold a subset of a split, or another order)."""
        if np.array_equal(self.ids, ids):
            return self
        sorter = np.argsort(self.ids)
        rows = sorter[np.searchsorted(self.ids, ids, sorter=sorter).clip(0, max(len(self) - 1, 0))]
        if len(self) == 0 or not np.array_equal(self.ids[rows], ids):
            raise DiffstoreError(f"the {self.name}/{self.split} data loaded here lacks samples the store holds; "
                                 f"{hint or 'pass the --data-root the store was extracted from'}")
        return replace(self, ids=self.ids[rows], labels=self.labels[rows],
                       load=lambda r: self.load(rows[np.asarray(r)]))

    def head(self, limit: int) -> "Split":
        """The first `limit` samples (--limit): the split keeps its name, the limit goes into the source and
        so into the dataset fingerprint, and the ids differ, so a store never mixes it with the full split."""
        if limit < 1:
            raise DiffstoreError(f"--limit must be >= 1, got {limit}")
        if limit >= len(self):
            return self
        return replace(self.take(self.ids[:limit]), source={**self.source, "limit": int(limit)})

    def fingerprint(self, preprocess: "Preprocess") -> str:
        return dataset_fingerprint(self.name, self.split, self.source, self.ids_sha256(), preprocess.to_dict())


def dataset_fingerprint(name: str, split: str, source: dict, ids_sha256: str, preprocess: dict) -> str:
    """Source + split + the exact sample order + preprocessing. The local root is left out: colleagues with the
    same files in other folders share one store."""
    source = {k: v for k, v in source.items() if k != "root"}
    return fingerprint({"name": name, "split": split, "source": source, "ids_sha256": ids_sha256,
                        "preprocess": preprocess})


def in_memory(images: np.ndarray) -> Callable[[np.ndarray], list]:
    return lambda rows: images[np.asarray(rows)]


def data_root(name: str, root: str | None) -> Path:
    if root is not None:
        path = Path(root).expanduser()
        if not path.is_dir():
            raise DiffstoreError(f"{name}: data root {path} is not a directory; pass --data-root DIR holding the data")
        return path.resolve()
    tried = [Path(os.environ[DATA_ENV]).expanduser() / name] if os.environ.get(DATA_ENV) else []
    tried += [Path(SYSTEM_ROOTS[name])] if name in SYSTEM_ROOTS else []
    for path in tried:
        if path.is_dir():
            return path.resolve()
    looked = f" (looked in {', '.join(map(str, tried))})" if tried else ""
    raise DiffstoreError(f"{name}: no data directory{looked}; pass --data-root DIR, or set {DATA_ENV}=DIR "
                         f"to a directory holding {name}/")


def load_digits(split: str) -> Split:
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    images = np.clip(np.rint(d.images * (255 / 16)), 0, 255).astype(np.uint8)  # 0..16 -> 0..255
    ids = np.arange(len(images), dtype=np.int64)
    keep = ids < DIGITS_TRAIN if split == "train" else ids >= DIGITS_TRAIN
    return Split("digits", split, ids[keep], d.target[keep].astype(np.int64), DIGIT_CLASSES.copy(),
                 {"kind": "sklearn.load_digits", "n_total": len(images)}, in_memory(images[keep]))


# --- IDX (MNIST, Fashion-MNIST) ----------------------------------------------------------------------
def idx_dims(path: Path, magic: int, ndim: int) -> tuple[int, ...]:
    """Check an IDX .gz file's magic and that its length matches its header, without decompressing it all:
    gzip's trailer holds the uncompressed size (mod 2**32), so a truncated file is caught here."""
    if not path.is_file():
        raise DiffstoreError(f"missing {path}: the directory needs the four IDX .gz files "
                             f"({{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte.gz); pass --data-root DIR")
    try:
        with gzip.open(path) as f:
            head = f.read(4 + 4 * ndim)
    except (OSError, EOFError, zlib.error) as e:
        raise DiffstoreError(f"{path} is not a readable gzip file ({e}); re-download it") from None
    if len(head) < 4 + 4 * ndim or int.from_bytes(head[:4], "big") != magic:
        raise DiffstoreError(f"{path} is not an IDX file with {ndim} dimension(s) (expected magic {magic:#010x}); "
                             "re-download it")
    dims = tuple(int.from_bytes(head[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        isize = int.from_bytes(f.read(4), "little")
    if isize != (len(head) + math.prod(dims)) % 2**32:
        raise DiffstoreError(f"{path} is truncated or corrupt: its header promises {'x'.join(map(str, dims))} "
                             "bytes of data but its gzip trailer disagrees; re-download it")
    return dims


def read_idx(path: Path, dims: tuple[int, ...]) -> np.ndarray:
    try:
        with gzip.open(path) as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DiffstoreError(f"{path} is corrupt ({e}); re-download it") from None
    header = 4 + 4 * len(dims)
    if len(data) != header + math.prod(dims):
        raise DiffstoreError(f"{path} is truncated or corrupt (wrong length); re-download it")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def load_idx(name: str, class_names: list[str], split: str, root: str | None, skip_bad: bool) -> Split:
    root = data_root(name, root)
    prefix = "train" if split == "train" else "t10k"
    images_path, labels_path = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    dims = idx_dims(images_path, IDX_IMAGES, 3)
    labels = read_idx(labels_path, idx_dims(labels_path, IDX_LABELS, 1)).astype(np.int64)
    if len(labels) != dims[0]:
        raise DiffstoreError(f"{images_path} holds {dims[0]} images but {labels_path.name} {len(labels)} labels: "
                             "the files come from different sets; re-download them")
    if labels.max(initial=0) >= len(class_names):
        raise DiffstoreError(f"{labels_path} has label {labels.max()} but {name} has {len(class_names)} classes")
    images = cache(lambda: read_idx(images_path, dims))  # decompressed on first use, then kept
    source = {"kind": "idx", "root": str(root),
              "files": {p.name: p.stat().st_size for p in (images_path, labels_path)},
              "labels_sha256": sha256_files([labels_path])}
    return Split(name, split, np.arange(dims[0], dtype=np.int64), labels, list(class_names), source,
                 lambda rows: images()[np.asarray(rows)])


# --- CIFAR-10 binary batches -------------------------------------------------------------------------
def cifar_bin_dir(root: Path) -> Path | None:
    return next((d for d in (root / "cifar-10-batches-bin", root)
                 if (d / "test_batch.bin").is_file() or (d / "data_batch_1.bin").is_file()), None)


def load_cifar10_bin(split: str, bin_dir: Path) -> Split:
    files = [bin_dir / f"data_batch_{i}.bin" for i in range(1, 6)] if split == "train" else [bin_dir / "test_batch.bin"]
    batches = []
    for path in files:
        if not path.is_file():
            raise DiffstoreError(f"missing {path}: a CIFAR-10 binary set needs data_batch_1..5.bin and test_batch.bin")
        size = path.stat().st_size
        if size == 0 or size % CIFAR_RECORD:
            raise DiffstoreError(f"{path} is truncated or not a CIFAR-10 batch: {size} bytes is not a whole number "
                                 f"of {CIFAR_RECORD}-byte records; re-download it")
        batches.append(np.memmap(path, np.uint8, "r").reshape(-1, CIFAR_RECORD))
    meta = bin_dir / "batches.meta.txt"
    class_names = [s.strip() for s in meta.read_text().splitlines() if s.strip()] if meta.is_file() else CIFAR10_CLASSES
    labels = np.concatenate([b[:, 0] for b in batches]).astype(np.int64)
    if len(class_names) != 10 or labels.max() >= 10:
        raise DiffstoreError(f"{bin_dir} is not CIFAR-10: {len(class_names)} class names in {meta.name}, "
                             f"largest label {labels.max()}; use the right --data-root")
    starts = np.cumsum([0] + [len(b) for b in batches])

    def load(rows):
        rows = np.asarray(rows, dtype=np.int64)
        which = np.searchsorted(starts, rows, side="right") - 1
        out = np.empty((len(rows), CIFAR_RECORD - 1), np.uint8)
        for b in np.unique(which):  # one fancy-indexed read per batch file
            out[which == b] = batches[b][rows[which == b] - starts[b], 1:]
        return out.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)

    source = {"kind": "cifar10-bin", "root": str(bin_dir), "files": {p.name: p.stat().st_size for p in files},
              "labels_sha256": ids_sha256(labels)}
    return Split("cifar10", split, np.arange(len(labels), dtype=np.int64), labels, class_names, source, load)


# --- folder layouts (imagefolder, CIFAR-10 jpg) ------------------------------------------------------
def decode(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            mode = "L" if im.mode in ("1", "L", "LA") else "RGB"
            return np.asarray(im if im.mode == mode else im.convert(mode))  # convert() to its own mode is a copy
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DiffstoreError(f"cannot decode image {path} ({e}); {SKIP_HINT}") from None


def readable(path: Path) -> bool:
    try:
        decode(path)
        return True
    except DiffstoreError:
        return False


def load_folder(name: str, kind: str, split: str, root: str | Path | None, skip_bad: bool) -> Split:
    root = data_root(name, root)
    split_dir = root / split
    if not split_dir.is_dir():
        raise DiffstoreError(f"{split_dir} is not a directory: {name} expects {root}/{split}/<class>/*.jpg|png")
    class_names = sorted({d.name for s in ("train", "test") if (root / s).is_dir()
                          for d in (root / s).iterdir() if d.is_dir() and not d.name.startswith(".")})
    files = sorted(f"{c}/{p.name}" for c in class_names if (split_dir / c).is_dir() for p in (split_dir / c).iterdir()
                   if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())
    if not files:
        raise DiffstoreError(f"{split_dir} holds no images: expected {split_dir}/<class>/*.jpg|jpeg|png")
    index = {c: i for i, c in enumerate(class_names)}
    labels = np.array([index[f.split("/")[0]] for f in files], dtype=np.int64)
    ids = np.arange(len(files), dtype=np.int64)
    listing = "".join(f"{f}\t{(split_dir / f).stat().st_size}\n" for f in files)  # names + sizes: cheap identity
    source = {"kind": kind, "root": str(root), "n_files": len(files),
              "files_sha256": hashlib.sha256(listing.encode()).hexdigest()}
    if skip_bad:
        from rich.console import Console
        from rich.progress import track

        ok = np.array([readable(split_dir / f) for f in track(files, f"checking {name}/{split} images",
                                                              console=Console(stderr=True), transient=True)])
        skipped = [int(i) for i in ids[~ok]]
        if not ok.any():
            raise DiffstoreError(f"every one of the {len(files)} images in {split_dir} is unreadable; nothing to "
                                 "extract. Check the folder (a failed download or copy?)")
        ids, labels, files = ids[ok], labels[ok], [f for f, good in zip(files, ok) if good]
    else:
        skipped = []
    return Split(name, split, ids, labels, class_names, source,
                 lambda rows: [decode(split_dir / files[r]) for r in np.asarray(rows)], skipped)


def load_cifar10(split: str, root: str | None, skip_bad: bool) -> Split:
    root = data_root("cifar10", root)
    if (bin_dir := cifar_bin_dir(root)) is not None:
        return load_cifar10_bin(split, bin_dir)
    if not (root / split).is_dir():
        raise DiffstoreError(f"{root} holds no CIFAR-10 data: expected cifar-10-batches-bin/ (data_batch_1..5.bin, "
                             "test_batch.bin, batches.meta.txt) or train/<class>/*.jpg and test/<class>/*.jpg")
    s = load_folder("cifar10", "cifar10-folder", split, root, skip_bad)
    if s.class_names != CIFAR10_CLASSES:
        raise DiffstoreError(f"{root} has classes {s.class_names}, not CIFAR-10's; use --dataset imagefolder")
    return s


LOADERS = {
    "digits": lambda split, root, skip_bad: load_digits(split),
    "mnist": partial(load_idx, "mnist", DIGIT_CLASSES),
    "fashion-mnist": partial(load_idx, "fashion-mnist", FASHION_CLASSES),
    "cifar10": load_cifar10,
    "imagefolder": partial(load_folder, "imagefolder", "imagefolder"),
}


def load_split(name: str, split: str, root: str | None = None, skip_bad: bool = False, limit: int | None = None,
               as_name: str | None = None) -> Split:
    """A split, or (limit=N) its first N samples (Split.head). as_name: the dataset's name in a store when it is
    not the loader's (`extract --dataset-name`: several image folders in one store); its source then records the
    loader, so stored_split can load it again by its stored name."""
    if name not in LOADERS:
        raise DiffstoreError(f"unknown dataset {name!r}: choose one of {', '.join(sorted(LOADERS))}")
    if split not in ("train", "test"):
        raise DiffstoreError(f"unknown split {split!r}: use train or test")
    data = LOADERS[name](split, root, skip_bad)
    if as_name is not None and as_name != name:
        data = replace(data, name=as_name, source={**data.source, "loader": name})
    return data.head(limit) if limit is not None else data


def stored_split(dataset: str, split: str, source: dict, root: str | None = None, skip_bad: bool = False,
                 limit: int | None = None) -> Split:
    """The split a store holds as `dataset`, loaded again from `root`: with the loader its recorded `source` names
    when it was stored under another name, else the loader of that name."""
    loader = source.get("loader") if isinstance(source, dict) else None
    return load_split(loader if isinstance(loader, str) else dataset, split, root, skip_bad, limit, as_name=dataset)
