"""`diffstore extract` / `ds.extract`: load the model once, then plan and run every requested split."""

from __future__ import annotations

from ..options import api
from ..scale import maybe_cluster
from ..store import Store
from .options import ExtractOptions


def run(o: ExtractOptions) -> list[dict]:
    """Run the U-Net once per (batch, t) and store every requested (t, block, pool) array. Returns one summary per
    split: the arrays' paths, shards run and total. Keys already stored are skipped, so a re-run is a no-op."""
    from . import quick

    name = o.stored_dataset()  # checked before anything loads
    if not o.views and (rows := quick.all_stored(o)) is not None:  # all stored: answered without torch
        return rows
    from ..datasets import load_split
    from ..device import pick_device
    from ..models import load_model
    from .pipeline import extract_features
    from .plan import plan_extraction

    spec = o.model_spec()
    model = load_model(spec.pop("spec"), **spec).to(pick_device(o.device))
    remember = {quick.model_key(o): quick.model_identity(model)}
    store = Store.open(o.store)  # created on the first write: a dry run writes nothing
    rows = []
    with maybe_cluster(o.workers, o.scheduler) as client:  # one cluster (and one model load per worker) for all splits
        for split in o.split:
            data = load_split(o.dataset, split, o.data_root, skip_bad=o.skip_bad, as_name=name)
            remember[quick.split_key(o, split)] = quick.split_identity(data)
            if o.views:
                from ..preprocess import Preprocess
                from ..views import view_split

                data = view_split(data, o.views, o.view_seed, Preprocess(model.image_size, model.image_channels))
            plan = plan_extraction(store, model, data, o)
            if o.dry_run:
                from .estimate import dry_run

                rows.append({"store": store.url, "dataset": name, "model": model.name, **dry_run(plan)})
                continue
            if client is not None:
                from .distributed import extract_distributed

                summary = extract_distributed(plan, o, client=client)
            else:
                with store.undo_if_unstarted(plan.created):  # a failure before any shard is done leaves nothing
                    summary = extract_features(plan, batch_size=o.batch_size, show_progress=o.show_progress,
                                               workers=o.loader_workers)
            rows.append({"store": store.url, "dataset": name, "split": data.split, "model": model.name,
                         "rows": len(plan.rows), "of": len(data), "micro_batch": plan.recipe.micro_batch,
                         "arrays": [a.path for a in plan.arrays.values()],
                         "shards_run": summary["tasks_run"], "shards_total": summary["tasks_total"],
                         "status": "already stored" if summary["tasks_run"] == 0 else "extracted"})
    quick.remember(remember)
    return rows


extract = api(ExtractOptions)(run)
