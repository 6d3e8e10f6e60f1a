"""`diffstore repair`: recompute exactly the shards `verify` reports bad, with the extraction code itself.

Features are a pure function of the key, so a repaired array is bit-identical to a clean run. Nothing read from
the store is executed, imported, downloaded or unpickled: the model comes from the command line (`--model SPEC`,
as `extract` takes it) and the data from `--data-root` (or the dataset's default location). Before anything is
touched, the model's fingerprint and the data's fingerprint are checked against every array to repair; a
mismatch is refused, naming the array and what its attributes recorded (as a hint, never as something to run).
Only then is broken metadata (x/ or done/zarr.json) rebuilt from the layout the group recorded, keeping every
shard, and the bad shards recomputed. Every check comes before anything is deleted: a layout it cannot rebuild from
(edited, NaN, another shape than the model gives) is refused first.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

from ..datasets import Split, stored_split
from ..errors import DiffstoreError
from ..models.base import DiffusionModel
from ..options import api
from ..store import Store
from ..store.verify import Finding, check_array, verify_findings
from .options import RepairOptions
from .pipeline import extract_features
from .plan import plan_extraction
from .recorded import recorded


def rebuild_metadata(store: Store, path: str) -> None:
    """Drop an array's x/ and done/zarr.json (not its shards) so that extraction re-creates them from the layout
    the group recorded; refuses when the group's own zarr.json (its fingerprint) is what is broken."""
    g = store._group(path)  # raises, naming the file, when the group's zarr.json is unreadable
    if g is None or "layout" not in g.attrs:
        raise no_layout(store, path)
    for name in ("x", "done"):
        store.remove_key(f"{path}/{name}/zarr.json")


def no_layout(store: Store, path: str) -> DiffstoreError:
    return DiffstoreError(f"{store.url.rstrip('/')}/{path}: its metadata cannot be rebuilt (no recorded layout: a "
                          f"format-1 array). Remove it with `diffstore rm --store {store.url} {path}` and re-extract")


def rebuild_split(store: Store, path: str, data_root: str | None) -> dict:
    """Rewrite a split's ids and labels from the dataset (loaded from `data_root`, never from a path the store
    names), after checking that the dataset gives exactly the ids whose sha256 the split recorded."""
    _, dataset, split = path.split("/")
    g = store._group(path)
    attrs = dict(g.attrs) if g is not None else {}
    n, want = attrs.get("n"), attrs.get("ids_sha256")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1 or not isinstance(want, str):
        raise DiffstoreError(f"{path}: its attributes (n, ids_sha256) are missing or corrupt, so its ids cannot be "
                             f"checked; remove it with `diffstore rm --store {store.url} {path}` and re-extract")
    skipped = attrs.get("skipped")
    try:
        data = stored_split(dataset, split, attrs.get("source"), data_root, skip_bad=bool(skipped))
    except DiffstoreError as e:
        raise DiffstoreError(f"repair needs the data of {dataset}/{split}: {e}") from None
    ids, labels = data.ids[:n], data.labels[:n]  # a split written by an older version may hold a prefix
    if len(ids) != n or Split.ids_sha256(data.take(ids)) != want:
        raise DiffstoreError(f"{path}: the {dataset}/{split} data loaded here does not give the ids the store "
                             "recorded; pass the --data-root of the files it was extracted from. Nothing was changed")
    for name, values in (("ids", ids), ("labels", labels)):
        store.remove(f"{path}/{name}")
        store._put_values(g, name, values)
    store.split(dataset, split)  # reads back: ids and labels now match what was recorded
    return {"array": path, "problems": "split", "shards recomputed": 0, "shards": 0}


def repair(store: Store, model: DiffusionModel, texts: list[str] | None = None, data_root: str | None = None,
           batch_size: int = 64, show_progress: bool = True) -> list[dict]:
    """Repair the feature arrays named by `texts` (default: every array verify finds a problem in) with `model`,
    the network that wrote them, and every split whose ids or labels are broken; one row per node repaired."""
    if texts:  # named nodes: splits by path (datasets/D/S), arrays by path or selector
        splits = [p.rstrip("/") for p in texts if p.startswith("datasets/")]
        arrays = [p for p in texts if not p.startswith("datasets/")]
        findings = verify_findings(store, store.match(arrays))[0] if arrays else []
    else:  # everything verify finds
        findings = verify_findings(store)[0]
        splits = [f.array for f in findings if f.kind == "split"]
        findings = [f for f in findings if f.kind != "split"]
    rows = [rebuild_split(store, p, data_root) for p in splits]
    by_path: dict[str, list[Finding]] = defaultdict(list)
    for f in findings:
        by_path[f.array].append(f)
    targets = [p for p in by_path if not p.startswith("features/")]
    if targets:
        raise DiffstoreError(f"repair rebuilds feature arrays; {targets[0]} is not one: remove it with `diffstore rm "
                             f"--store {store.url} {targets[0]}` and re-run `diffstore repfusion targets`")
    # Every check before anything is touched: the model's and the data's identity, per array.
    fix = (f"Pass the model that wrote it, or name only this model's arrays (e.g. model={model.name}); "
           "nothing was changed")
    jobs = [recorded(store, path, model, data_root, fix) for path in by_path]  # (layouts checked there too)
    for job in jobs:  # broken metadata is rebuilt from the recorded layout: without one, refused before anything
        if "layout" not in job.attrs and any(f.kind == "metadata" for f in by_path[job.key.path]):
            raise no_layout(store, job.key.path)
    for job in jobs:
        key, path = job.key, job.key.path
        if any(f.kind == "metadata" for f in by_path[path]):
            rebuild_metadata(store, path)
        # the array's name for these weights (the fingerprint decides)
        named = dataclasses.replace(model, name=key.model)
        plan = plan_extraction(store, named, job.data, job.options)
        array = plan.arrays[(key.t, key.block, key.pool)]
        array.invalidate(sorted({i for f in check_array(store, path) if f.kind == "corrupt" for i in f.shards}))
        summary = extract_features(plan, batch_size=batch_size, show_progress=show_progress)
        rows.append({"array": path, "problems": ", ".join(sorted({f.kind for f in by_path[path]})),
                     "shards recomputed": summary["tasks_run"], "shards": array.n_shards})
    left, _ = verify_findings(store, list(by_path))
    if left:
        raise DiffstoreError(f"repair left {len(left)} problem(s), first: {left[0].array}: {left[0].problem}")
    return rows


def run(o: RepairOptions) -> list[dict]:
    """`diffstore repair` / `ds.repair`: load the model the options name, then repair (see repair)."""
    from ..device import pick_device
    from ..models import load_model

    spec = o.model_spec()
    model = load_model(spec.pop("spec"), **spec).to(pick_device(o.device))
    return repair(Store.open(o.store, mode="a"), model, list(o.keys) or None, o.data_root, o.batch_size,
                  o.show_progress)


repair_command = api(RepairOptions)(run)
