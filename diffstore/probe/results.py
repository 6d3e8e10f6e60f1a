"""Training heads on sources, and the results cache: a result is stored as results/probe/{name}, name = head + a
fingerprint of (the arrays' fingerprints, the head, the recipe with its seed); the same recipe again is shown from
the store, marked "cached", instead of retraining (retrain forces it). With save_heads the fitted head is stored
too, as results/heads/{name} (saved.py); a stored result whose head is not is computed again to get it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..errors import DiffstoreError
from ..key import fingerprint
from ..options import spell
from ..progress import stderr, working_on
from ..store import Store
from .feed import DEFAULT_BUDGET, first_labels
from .heads import KNN, HeadSpec
from .intervals import accuracy_record
from .knn import knn_many
from .options import ProbeOptions
from .recipe import ProbeRecipe
from .saved import save_head, saveable, stored_heads
from .solve import solve_many
from .sources import Source
from .train import Job, train_many


def result_name(source: Source, spec: HeadSpec, recipe: ProbeRecipe) -> str:
    fp = fingerprint({"arrays": source.fingerprints, "head": spec.to_dict(), "recipe": recipe.to_dict(spec.kind)})
    return f"{spec.kind}-{fp[:24]}"


def cached_results(store: Store, sources: list[Source], specs: list[HeadSpec], recipe: ProbeRecipe,
                   retrain: bool = False, save_heads: bool = False) -> tuple[list, list[tuple]]:
    """(one slot per (source, head): the stored result, marked cached, or None; the (slot, name, source, head) of
    each one still to compute). With `retrain` nothing counts as stored; with `save_heads`, only results whose
    head is stored too (or cannot be)."""
    stored = {} if retrain else {r["name"]: r for r in store.results("probe")}
    if save_heads:
        heads = stored_heads(store)
        stored = {name: r for name, r in stored.items() if name in heads or not saveable(r)}
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
               device: str | None = None, budget: int = DEFAULT_BUDGET, show_progress: bool = True,
               save_heads: bool = False) -> list[dict]:
    """One result per (source, head), in that order: stored ones reused unless `retrain`; the rest side by side
    per dataset (linear heads of the converged recipe solved, solve.py; knn heads evaluated, knn.py; others
    trained, train.py) and stored, each with its test hits (packed) and its top-1, top-5 and mean-per-class
    accuracy with bootstrap intervals. save_heads: every fitted head is stored too (saved.py)."""
    results, missing = cached_results(store, sources, specs, recipe, retrain, save_heads)
    todo: dict[str, list] = {}
    for i, name, source, spec in missing:
        todo.setdefault(source.row["dataset"], []).append((i, name, source, spec))
    writer = Store.open(store.url, "a") if todo else None
    fit_warnings: list[tuple[tuple, str]] = []
    for dataset, items in todo.items():
        train, test = (first_labels(store.split(dataset, s), recipe.limit) for s in ("train", "test"))
        if recipe.views > 1:  # training rows are (sample, view) pairs, sample-major (extract --views)
            train = replace(train, ids=np.repeat(train.ids, recipe.views), labels=np.repeat(train.labels, recipe.views))
        for _, _, source, _ in items:
            for rows, split in ((source.train, train), (source.test, test)):
                if rows.n_rows != len(split.labels):
                    raise DiffstoreError(f"{dataset} {source.row['model']} t={source.row['t']}/b={source.row['block']}/"
                                         f"p={source.row['pool']}: {rows.n_rows} feature rows but the {split.split} "
                                         f"split has {len(split.labels)} labels; re-extract the array into this store")
        solved = [it for it in items if it[3].kind == "linear" and recipe.name == "converged"]
        nearest = [it for it in items if it[3].kind == KNN]
        trained = [it for it in items if it not in solved and it not in nearest]
        n_classes = len(train.class_names)
        if len(np.unique(train.labels)) < 2 or len(train.labels) < n_classes:
            raise DiffstoreError(f"{dataset}: {len(train.labels)} train rows ({len(np.unique(train.labels))} of "
                                 f"{n_classes} classes) are too few to train and validate a probe; raise --limit to "
                                 f"at least {n_classes} (a few per class, for a number worth reading)")
        stderr.print(f"{dataset}: {len(solved)} linear probe(s) to solve, {len(trained)} head(s) to train "
                     f"({recipe.name} recipe, seed {recipe.seed})"
                     + (f", {len(nearest)} knn evaluation(s)" if nearest else ""))
        models = ", ".join(dict.fromkeys(s.row["model"] for _, _, s, _ in items))
        with working_on(f"{dataset}/train {models} ({recipe.name} recipe, seed {recipe.seed})"):
            metrics = []
            for fitter, group in ((solve_many, solved), (knn_many, nearest)):
                metrics += fitter([s.train for _, _, s, _ in group], [s.test for _, _, s, _ in group],
                                  [spec.pool for *_, spec in group], train.labels, test.labels, n_classes, recipe,
                                  device, budget, show_progress) if group else []
            jobs = [Job(s.train, s.test, spec, fix=s.fix,
                        what=f"{s.row['model']} t={s.row['t']}/b={s.row['block']}/p={s.row['pool']}")
                    for _, _, s, spec in trained]
            metrics += train_many(jobs, train.labels, test.labels, n_classes, recipe, device, budget,
                                  show_progress) if trained else []
        for (i, name, source, spec), m in zip(solved + nearest + trained, metrics):
            hits, hits5, fitted = m.pop("hits"), m.pop("hits5"), m.pop("fitted")
            results[i] = {"name": name, **source.row, "kind": source.kind, "keys": [k.to_dict() for k in source.keys],
                          "fingerprints": source.fingerprints, "head": spec.to_dict(), "head_label": spec.label(),
                          "recipe": recipe.to_dict(spec.kind), "seed": recipe.seed, **m,
                          **accuracy_record(hits, hits5, test.labels)}
            fit_warnings += fit_warning(results[i], source, spec)
            writer.put_result("probe", name, results[i])
            if save_heads:
                save_head(writer, results[i], spec, fitted, source.train.row_shape, train.class_names)
    warn_fits(fit_warnings, recipe)
    return results


def fit_warning(r: dict, source: Source, spec: HeadSpec) -> list[tuple[tuple, str]]:
    """(what, where) for a head that did not converge, or whose chosen C is an end of the grid (the optimum may
    lie beyond it); `warn_fits` prints them, one line per what."""
    row = source.row
    where = f"{r['model']} t={row['t']}/b={row['block']}/p={row['pool']}"
    found = []
    if r.get("converged") is False:
        found.append((("converged", spec.label(), spec.kind), where))
    if r.get("C_at_grid_end"):
        found.append((("C", spec.label(), r["C"], r["C_at_grid_end"]), where))
    return found


def warn_fits(found: list[tuple[tuple, str]], recipe: ProbeRecipe, shown: int = 4) -> None:
    """On stderr, one line per kind of warning naming the heads it concerns (the first `shown` of them)."""
    by_what: dict[tuple, list[str]] = {}
    for what, where in found:
        by_what.setdefault(what, []).append(where)
    for what, wheres in by_what.items():
        n = len(wheres)
        heads = f"the {what[1]} head" + (f"s of {n} keys" if n > 1 else "")
        on = ", ".join(wheres[:shown]) + (f" and {n - shown} more" if n > shown else "")
        if what[0] == "converged":
            why = ("still improving on validation at the step budget: raise --steps" if what[2] != "linear"
                   else "L-BFGS hit --max-iter before its gradient test")
            stderr.print(f"[yellow]warning[/]: {heads} did not converge ({why}): {on}")
        else:
            grid = ", ".join(f"{c:g}" for c in sorted(recipe.Cs))
            stderr.print(f"[yellow]warning[/]: {heads} chose C={what[2]:g}, the {what[3]} C of the grid ({grid}): "
                         f"the best L2 strength may lie beyond it; extend the grid with {spell('cs', ProbeOptions)}. "
                         f"On {on}")
