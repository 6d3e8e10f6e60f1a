"""A store's dataset splits: each split's ids and labels, stored once under datasets/{dataset}/{split} and shared
by every array of that split (the rows of every feature array follow them)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from zarr.errors import ContainsArrayError, ContainsGroupError

from ..errors import DiffstoreError
from ..key import ids_sha256
from .attrs import shown


@dataclass
class SplitRecord:
    dataset: str
    split: str
    ids: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    ids_sha256: str


class SplitsMixin:
    """Store methods for splits (they use the Store's nodes: _group, _node, _put_values, root, url)."""

    def check_split(self, split) -> None:
        g = self._group(f"datasets/{split.name}/{split.split}")
        if g is not None and g.attrs.get("ids_sha256") != split.ids_sha256():
            raise DiffstoreError(f"{self.url} holds {split.name}/{split.split} with other sample ids "
                                 f"({shown(g.attrs.get('n'), 20)} samples, you have {len(split)}, and theirs are not "
                                 "the first rows of yours: other files, another order, or --skip-bad on one side "
                                 "only); refusing to mix them. Use another --store, or the data the store was made "
                                 "from")

    @staticmethod
    def split_attrs(split) -> dict:
        """What a split's group records: the whole split's identity (ids and labels sha256), size and source."""
        return {"class_names": list(split.class_names), "ids_sha256": split.ids_sha256(), "n": len(split),
                "labels_sha256": ids_sha256(split.labels), "source": split.source, "skipped": split.skipped}

    def put_split(self, split) -> SplitRecord:
        """Store ids and labels once per split; a split a killed run left without them is completed."""
        path = f"datasets/{split.name}/{split.split}"
        self.check_split(split)
        g = self._group(path)
        if g is None:
            try:
                g = self.root.create_group(path, attributes=self.split_attrs(split))
            except (ContainsGroupError, ContainsArrayError):
                self.check_split(split)
                g = self._group(path)
        self._put_values(g, "ids", split.ids)
        self._put_values(g, "labels", split.labels)
        return self.split(split.name, split.split)

    def split(self, dataset: str, split: str) -> SplitRecord:
        path = f"datasets/{dataset}/{split}"
        g = self._group(path)
        if g is None or "ids" not in g or "labels" not in g:
            raise DiffstoreError(f"{self.url} has no {dataset}/{split} split: run `diffstore extract --dataset "
                                 f"{dataset} --split {split}`")
        where, fix = f"{self.url.rstrip('/')}/{path}", f"diffstore repair --store {self.url} {path}"
        try:
            ids, labels = self._node(f"{path}/ids")[:], self._node(f"{path}/labels")[:]
        except DiffstoreError:
            raise
        except Exception as e:  # noqa: BLE001 - a corrupt chunk (zstd, checksum): name it and the fix
            raise DiffstoreError(f"{where}: its ids or labels cannot be read ({type(e).__name__}: {str(e)[:200]}). "
                                 f"Rebuild them from the dataset with `{fix}`") from None
        attrs = dict(g.attrs)
        names = attrs.get("class_names")
        if ids_sha256(ids) != attrs.get("ids_sha256") or ids.shape != labels.shape or not isinstance(names, list) \
                or ("labels_sha256" in attrs and ids_sha256(labels) != attrs["labels_sha256"]):
            raise DiffstoreError(f"{where}: its ids or labels do not match what was recorded (sha256, length or "
                                 f"class names). Rebuild them from the dataset with `{fix}`")
        return SplitRecord(dataset, split, ids, labels, [str(c)[:200] for c in names], attrs["ids_sha256"])
