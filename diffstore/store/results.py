"""A store's results: probe accuracies, CKA matrices, policies and saved heads, as JSON payloads (with their
provenance) under results/{kind}/{name}, beside the features they were computed from."""

from __future__ import annotations

import numpy as np

from ..errors import DiffstoreError
from ..key import check_name
from .attrs import shown
from .provenance import provenance


class ResultsMixin:
    """Store methods for results (they use the Store's nodes: _group, child_groups, root, url)."""

    def put_result(self, kind: str, name: str, payload: dict, arrays: dict[str, np.ndarray] | None = None) -> None:
        """A result's payload (JSON attrs), replacing any of that name; `arrays` (a saved head's weights) are
        written first and the payload last, so a write cut short leaves no payload and is not listed."""
        path = f"results/{check_name('result kind', kind)}/{check_name('result', name)}"
        if self._group(path) is not None:
            del self.root[path]
        g = self.root.create_group(path)
        for array, value in (arrays or {}).items():  # dimension names make the group an xarray Dataset
            g.create_array(array, data=value, dimension_names=[f"{array}_{i}" for i in range(value.ndim)])
        g.attrs.update({"payload": payload, "provenance": provenance(finished=True)})

    def result_paths(self, kind: str | None = None) -> list[str]:
        kinds = [kind] if kind else self.child_groups("results")
        return [f"results/{k}/{name}" for k in kinds for name in self.child_groups(f"results/{k}")]

    def results(self, kind: str, with_provenance: bool = False) -> list[dict]:
        """Payloads of the stored results of `kind`; with_provenance: each with its "provenance" record too."""
        attrs = [a for a in (dict(self._group(p).attrs) for p in self.result_paths(kind)) if "payload" in a]
        return [{**a["payload"], "provenance": a.get("provenance")} if with_provenance else a["payload"] for a in attrs]

    def result_arrays(self, kind: str, name: str, shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
        """The float arrays stored with a result (a saved head's weights), by name, read only when their names and
        shapes are exactly `shapes` (what the reader expects: a forged size is refused before anything is read)."""
        path = f"results/{check_name('result kind', kind)}/{check_name('result', name)}"
        g = self._group(path)
        nodes = dict(g.arrays()) if g is not None else {}
        found = {a: tuple(node.shape) for a, node in nodes.items() if node.dtype.kind == "f"}
        wrong = sorted(a for a in {*nodes, *shapes} if found.get(a) != tuple(shapes.get(a, ())) or a not in shapes)
        if wrong:
            raise DiffstoreError(f"{self.url.rstrip('/')}/{path}: its arrays ({shown(', '.join(wrong), 120)}) are not "
                                 "the float arrays of the shapes its description gives. Remove it with `diffstore rm` "
                                 "and store it again")
        return {a: np.asarray(node[...], np.float32) for a, node in nodes.items()}
