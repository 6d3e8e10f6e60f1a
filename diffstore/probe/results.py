"""Training heads on sources, and the results cache: a result is stored as results/probe/{name}, name = head + a
fingerprint of (the arrays' fingerprints, the head, the recipe with its seed); the same recipe again is shown from
the store, marked "cached", instead of retraining (retrain forces it)."""

from __future__ import annotations

import numpy as np

from ..errors import DiffstoreError
from ..key import fingerprint
from ..progress import stderr, working_on
from ..store import Store
from .feed import DEFAULT_BUDGET, first_labels
from .heads import HeadSpec
from .intervals import bootstrap_interval, pack
from .recipe import ProbeRecipe
from .solve import solve_many
from .sources import Source
from .train import Job, train_many


def result_name(source: Source, spec: HeadSpec, recipe: ProbeRecipe) -> str:
    fp = fingerprint({"arrays": source.fingerprints, "head": spec.to_dict(), "recipe": recipe.to_dict(spec.kind)})
    return f"{spec.kind}-{fp[:24]}"


def cached_results(store: Store, sources: list[Source], specs: list[HeadSpec], recipe: ProbeRecipe,
                   retrain: bool = False) -> tuple[list, list[tuple]]:
    """(one slot per (source, head): the stored result, marked cached, or None; the (slot, name, source, head) of
    each one still to compute). With `retrain` nothing counts as stored."""
    stored = {} if retrain else {r["name"]: r for r in store.results("probe")}
    results: list = [None] * (len(sources) * len(specs))
    missing = []
    for i, (source, spec) in enumerate((src, sp) for src in sources for sp in specs):
        name = result_name(source, spec, recipe)
        if name in stored:
            results[i] = {**stored[name], "cached": True}
        else:
            missing.append((i, name, source, spec))
    return results, missing


def run_probes(store: Store, sources: list[Source], specs: list[HeadSpec], recipe: ProbeRecipe, retrain: bool = False,
               device: str | None = None, budget: int = DEFAULT_BUDGET, show_progress: bool = True) -> list[dict]:
    """One result per (source, head), in that order: stored ones reused unless `retrain`; the rest side by side
    per dataset (linear heads of the converged recipe solved, solve.py; others trained, train.py) and stored,
    each with its test hits (packed) and the bootstrap interval of its top-1."""
    results, missing = cached_results(store, sources, specs, recipe, retrain)
    todo: dict[str, list] = {}
    for i, name, source, spec in missing:
        todo.setdefault(source.row["dataset"], []).append((i, name, source, spec))
    writer = Store.open(store.url, "a") if todo else None
    for dataset, items in todo.items():
        train, test = (first_labels(store.split(dataset, s), recipe.limit) for s in ("train", "test"))
        for _, _, source, _ in items:
            for rows, split in ((source.train, train), (source.test, test)):
                if rows.n_rows != len(split.labels):
                    raise DiffstoreError(f"{dataset} {source.row['model']} t={source.row['t']}/b={source.row['block']}/"
                                         f"p={source.row['pool']}: {rows.n_rows} feature rows but the {split.split} split "
                                         f"has {len(split.labels)} labels; re-extract the array into this store")
        solved = [it for it in items if it[3].kind == "linear" and recipe.name == "converged"]
        trained = [it for it in items if it not in solved]
        n_classes = len(train.class_names)
        if len(np.unique(train.labels)) < 2 or len(train.labels) < n_classes:
            raise DiffstoreError(f"{dataset}: {len(train.labels)} train rows ({len(np.unique(train.labels))} of "
                                 f"{n_classes} classes) are too few to train and validate a probe; raise --limit to "
                                 f"at least {n_classes} (a few per class, for a number worth reading)")
        stderr.print(f"{dataset}: {len(solved)} linear probe(s) to solve, {len(trained)} head(s) to train "
                     f"({recipe.name} recipe, seed {recipe.seed})")
        models = ", ".join(dict.fromkeys(s.row["model"] for _, _, s, _ in items))
        with working_on(f"{dataset}/train {models} ({recipe.name} recipe, seed {recipe.seed})"):
            metrics = solve_many([s.train for _, _, s, _ in solved], [s.test for _, _, s, _ in solved],
                                 [spec.pool for *_, spec in solved], train.labels, test.labels, n_classes, recipe,
                                 device, budget, show_progress) if solved else []
            jobs = [Job(s.train, s.test, spec, fix=s.fix,
                        what=f"{s.row['model']} t={s.row['t']}/b={s.row['block']}/p={s.row['pool']}")
                    for _, _, s, spec in trained]
            metrics += train_many(jobs, train.labels, test.labels, n_classes, recipe, device, budget,
                                  show_progress) if trained else []
        for (i, name, source, spec), m in zip(solved + trained, metrics):
            hits = m.pop("hits")
            results[i] = {"name": name, **source.row, "kind": source.kind, "keys": [k.to_dict() for k in source.keys],
                          "fingerprints": source.fingerprints, "head": spec.to_dict(), "head_label": spec.label(),
                          "recipe": recipe.to_dict(spec.kind), "seed": recipe.seed, **m,
                          "ci95": bootstrap_interval(hits), "test_hits": pack(hits)}
            if m.get("converged") is False:
                stderr.print(f"[yellow]warning[/]: the {spec.label()} head on {results[i]['model']} t={source.row['t']}/"
                             f"b={source.row['block']}/p={source.row['pool']} did not converge "
                             + ("(still improving on validation at the step budget: raise --steps)" if spec.kind != "linear"
                                else "(L-BFGS hit --max-iter before its gradient test)"))
            writer.put_result("probe", name, results[i])
    return results
