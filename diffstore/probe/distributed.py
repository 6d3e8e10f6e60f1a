"""Probe sweeps on a dask cluster (`diffstore probe --workers N` or `--scheduler`): one task per (source, head)
not already stored, each one run_probes call on a worker that opens the store by URL and stores its result; the
rows come back in the same order as the in-process path. Pixel baselines (rows held in this process, not in the
store) train here."""

from __future__ import annotations

from ..key import FeatureKey
from ..scale import cluster_client, run_all, worker_url
from ..store import Store
from .feed import DEFAULT_BUDGET
from .results import cached_results, run_probes
from .sources import fuse_source, key_source


def probe_task(store_url: str, kind: str, keys: list[dict], spec, recipe, device, budget: int,
               torch_threads: int, save_heads: bool = False) -> dict:
    """On a worker: train one head on one source (a key, or fused keys) and store its result, as run_probes does."""
    import torch

    torch.set_num_threads(torch_threads)
    store = Store.open(store_url, "r")
    sources = [key_source(store, FeatureKey(**k)) for k in keys]
    source = fuse_source(sources) if kind == "fuse" else sources[0]
    return run_probes(store, [source], [spec], recipe, retrain=True, device=device, budget=budget,
                      show_progress=False, save_heads=save_heads)[0]


def probe_distributed(store: Store, sources: list, specs: list, recipe, retrain: bool = False,
                      device: str | None = None, budget: int = DEFAULT_BUDGET, show_progress: bool = True,
                      workers: int | None = None, scheduler: str | None = None, torch_threads: int = 1,
                      client=None, save_heads: bool = False) -> list[dict]:
    """results.run_probes on a cluster: one task per (source, head) not already stored; the same result rows,
    in the same order. Pixel baselines (rows held in this process, not in the store) train here."""
    items = [(source, spec) for source in sources for spec in specs]
    results, missing = cached_results(store, sources, specs, recipe, retrain, save_heads)
    remote = []
    for i, _, source, spec in missing:
        if source.kind == "pixels":
            results[i] = run_probes(store, [source], [spec], recipe, True, device, budget, show_progress,
                                    save_heads)[0]
        else:
            remote.append(i)
    if remote:
        url = worker_url(store.url)
        calls = [(url, items[i][0].kind, [k.to_dict() for k in items[i][0].keys], items[i][1], recipe, device, budget,
                  torch_threads, save_heads) for i in remote]
        names = [f"{items[i][1].kind} head on {'+'.join(k.short() for k in items[i][0].keys)}" for i in remote]
        with cluster_client(workers, scheduler, client) as client:
            on = ", ".join(dict.fromkeys(f"{items[i][0].row['dataset']}/train {items[i][0].row['model']}"
                                         for i in remote))
            for i, r in zip(remote, run_all(client, probe_task, calls, names, f"probe {on}", "head", [1] * len(calls),
                                            show_progress)):
                results[i] = r
    return results
