"""`diffstore rm`: remove arrays and the stored results computed from them."""

from __future__ import annotations

from ..errors import DiffstoreError
from ..key import FeatureKey
from .store import Store


def referencing(payload, path: str, key: dict | None, fingerprint: str | None) -> bool:
    """Whether a result payload names the array (by path, key or fingerprint) anywhere inside it."""
    if isinstance(payload, dict):
        return (key is not None and {k: payload.get(k) for k in key} == key) or \
            any(referencing(v, path, key, fingerprint) for v in payload.values())
    if isinstance(payload, list):
        return any(referencing(v, path, key, fingerprint) for v in payload)
    return isinstance(payload, str) and (payload == path or payload.startswith(path + "/") or payload == fingerprint)


def plan_removal(store: Store, texts: list[str]) -> tuple[list[str], list[str]]:
    """(node paths, result paths) that `diffstore rm` would delete. A split (datasets/D/S) takes with it every
    feature array of that split. Invalid keys (a path that is not a key, e.g. a name edited by hand) are removed by
    their path. Results are matched by path, key or fingerprint."""
    splits = [t.rstrip("/") for t in texts if t.startswith("datasets/")]
    for path in splits:
        if path.count("/") != 2 or store._group(path) is None:
            raise DiffstoreError(f"no split {path} in {store.url}: splits are datasets/DATASET/SPLIT")
    store.feature_keys()  # fills store.invalid
    invalid = [t.rstrip("/") for t in texts if t.rstrip("/") in store.invalid]
    named = [t for t in texts if not t.startswith("datasets/") and t.rstrip("/") not in invalid]
    arrays = store.match(named) if named else []
    arrays += [p for s in splits for p in store.array_paths(f"features/{s.removeprefix('datasets/')}")]
    arrays = list(dict.fromkeys(arrays + invalid))
    results = []
    for result in store.result_paths():
        payload = dict(store._group(result).attrs).get("payload", {})
        for path in arrays:
            try:
                attrs = dict(store._group(path).attrs)
            except DiffstoreError:  # its zarr.json is broken: match by path and key
                attrs = {}
            if not isinstance(attrs.get("key"), dict) and path.startswith("features/") and path not in invalid:
                attrs["key"] = FeatureKey.from_path(path).to_dict()
            if referencing(payload, path, attrs.get("key"), attrs.get("fingerprint")):
                results.append(result)
                break
    return arrays + splits, results


def remove(store: Store, paths: list[str]) -> None:
    """Delete each node, and the groups above it left empty; a path whose folder is a symlink is unlinked, never
    followed (see Store.remove)."""
    for path in paths:
        store.remove(path)
        store.prune(path)
