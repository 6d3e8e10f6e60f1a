"""The `diffstore probe` stage: pick feature arrays in a store, train heads on them side by side (train.py),
show the results as a table (or JSON) and store them next to the features.

Which keys: every train array matching the filters (--dataset/--model/--input/--t/--blocks/--pools), each paired
with its test twin; --model M also keeps M's random-init twins (M.random-init-sN) as the baseline they are.
--baseline pixels adds the same head on the preprocessed images; --fuse trains one head on several keys'
features concatenated; --select K ranks the keys by the ridge proxy (probe.select.rank_keys) and trains the top K;
--fuse auto --select K fuses the top K; --head fusion trains the fusion head over the fused keys (fusion.py).

Results cache: a result is stored as results/probe/{name}, name = head + a fingerprint of (the arrays'
fingerprints, the head, the recipe with its seed). Running the same recipe again shows the stored result,
marked "cached", instead of retraining (--retrain forces it); --list shows every stored result.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, replace

import numpy as np
from rich.console import Console

from ..datasets import load_split
from ..errors import DiffstoreError
from ..key import FeatureKey, fingerprint
from ..key import select as match_selector
from ..preprocess import Preprocess
from ..progress import stderr
from ..store import ShardedArray, Store
from .feed import DEFAULT_BUDGET, Rows, first_labels, first_rows, fuse_rows
from .fusion import auto_keys, compare, comparison_table, fusion_runs
from .heads import HeadSpec
from .intervals import bootstrap_interval, pack
from .report import collapse_seeds, grid_tables, ranking_table, results_table, summary, summary_lines, write_plots
from .select import rank_keys
from .recipe import ProbeRecipe
from .solve import solve_many
from .train import Job, train_many

DEFAULT_STORE = "data/default.zarr"
ROW_FIELDS = ("dataset", "model", "input", "t", "block", "pool")


@dataclass
class Source:
    """The train and test rows one head reads, and the identity shown in the table and stored with results."""

    row: dict  # dataset, model, input, t, block, pool
    kind: str  # "store" | "fuse" | "pixels"
    keys: list[FeatureKey]  # train keys read (empty for pixels)
    fingerprints: list[str]  # what the values depend on: a changed array invalidates cached results
    train: Rows
    test: Rows
    fix: str  # how to get spatial maps, for heads that need them


def extract_command(url: str, key: FeatureKey, attrs: dict, pools: str | None = None) -> str:
    """The `diffstore extract` call that writes (or completes) `key`, from what its array's attrs recorded."""
    base, _, seed = key.model.partition(".random-init-s")
    spec = attrs.get("model", {}).get("source", {}).get("spec", base)
    root = attrs.get("dataset", {}).get("source", {}).get("root")
    return " ".join(["diffstore extract", f"--store {url}", f"--dataset {key.dataset}",
                     *([f"--data-root {root}"] if root else []),
                     f"--split {key.split}", f"--model {spec}", f"--model-name {base}",
                     *([f"--random-init {seed}"] if seed else []), f"--input {key.input}", f"--t {key.t}",
                     f"--blocks {key.block}", f"--pools {pools or key.pool}"])


def open_complete(store: Store, key: FeatureKey) -> ShardedArray:
    arr = store.features(key)
    missing = arr.missing()
    if missing:
        shown = ", ".join(map(str, missing[:12])) + (", ..." if len(missing) > 12 else "")
        raise DiffstoreError(f"{key.path} is incomplete: {len(missing)} of {arr.n_shards} shards are missing "
                             f"({shown}). Complete it (done shards are skipped) with:\n  "
                             + extract_command(store.url, key, arr.attrs))
    return arr


def key_source(store: Store, key: FeatureKey, limit: int | None = None) -> Source:
    """A train key and its test twin, both complete."""
    train, test_key = open_complete(store, key), replace(key, split="test")
    try:
        store.features(test_key)
    except DiffstoreError:
        raise DiffstoreError(f"{key.path} has no test twin {test_key.path}; extract it with:\n  "
                             f"{extract_command(store.url, test_key, train.attrs)}") from None
    test = open_complete(store, test_key)
    row = {"dataset": key.dataset, "model": key.model, "input": key.input, "t": key.t, "block": key.block,
           "block_name": train.attrs.get("block", {}).get("name", str(key.block)), "pool": key.pool}
    fix = (f"Extract spatial maps with `{extract_command(store.url, key, train.attrs, 'full')}` (and the same for "
           "--split test), or use a larger pool.")
    return Source(row, "store", [key], [train.attrs["fingerprint"], test.attrs["fingerprint"]],
                  first_rows(Rows.of(train), limit), first_rows(Rows.of(test), limit), fix)


def joined(values: list) -> str:
    """One value when all agree, else all of them joined by '+' (a fused key's table cell)."""
    return str(values[0]) if len({str(v) for v in values}) == 1 else "+".join(map(str, values))


def fuse_source(sources: list[Source]) -> Source:
    """One source of several keys' features (same samples), channels concatenated (feed.fuse_rows)."""
    if len({s.row["dataset"] for s in sources}) > 1:
        raise DiffstoreError("--fuse needs keys of one dataset (the same samples): pass --dataset")
    row = {f: joined([s.row[f] for s in sources]) for f in (*ROW_FIELDS, "block_name")}
    return Source(row, "fuse", [k for s in sources for k in s.keys], [f for s in sources for f in s.fingerprints],
                  fuse_rows([s.train for s in sources]), fuse_rows([s.test for s in sources]), sources[0].fix)


def parse_fuse(spec: str, keys: list[FeatureKey]) -> list[FeatureKey]:
    """'t=90/b=5/p=2,t=150/b=6/p=2' (key.py selectors) -> one train key each, among `keys` (already filtered)."""
    out = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        try:
            found = match_selector(keys, item)
        except ValueError as e:
            raise DiffstoreError(f"--fuse: {e}") from None
        if len(found) != 1:
            close = difflib.get_close_matches(item, sorted({k.short() for k in keys}), n=3, cutoff=0.3)
            why = "no array" if not found else f"{len(found)} arrays (add model=/input=/dataset= to the item to pick one)"
            raise DiffstoreError(f"--fuse {item}: {why} in the store matches; closest: {', '.join(close) or 'none'}")
        out.append(found[0])
    if len(out) < 2:
        raise DiffstoreError("--fuse needs at least two keys, e.g. t=90/b=5/p=2,t=150/b=6/p=2")
    return out


def pixel_source(store: Store, dataset: str, attrs: dict, data_root: str | None, limit: int | None = None) -> Source:
    """The raw images, preprocessed exactly as the features' extraction did (attrs['preprocess'])."""
    pre = Preprocess(**attrs["preprocess"])
    root = data_root or attrs.get("dataset", {}).get("source", {}).get("root")
    rows, fps = {}, []
    for split in ("train", "test"):
        record = store.split(dataset, split)
        data = load_split(dataset, split, root).take(record.ids, f"pass --data-root of the data it was extracted from (tried {root})")
        x = np.concatenate([pre(data.load(np.arange(i, min(i + 1024, len(data))))).numpy() for i in range(0, len(data), 1024)])
        rows[split] = first_rows(Rows.of(x), limit)
        fps.append(fingerprint({"pixels": dataset, "split": split, "ids_sha256": record.ids_sha256,
                                "source": data.source, "preprocess": pre.to_dict()}))
    row = {"dataset": dataset, "model": "pixels", "input": "-", "t": "-", "block": "-", "block_name": "-",
           "pool": f"{pre.size}"}
    return Source(row, "pixels", [], fps, rows["train"], rows["test"], "")


def block_names(store: Store, keys: list[FeatureKey]) -> dict[FeatureKey, str]:
    """Each key's block name, as its array recorded it (the model's block table: 'mid', 'down1.0', ...)."""
    return {k: store.features(k).attrs.get("block", {}).get("name", str(k.block)) for k in keys}


def select_keys(store: Store, dataset=None, model=None, input=None, ts=None, blocks=None, pools=None) -> list[FeatureKey]:
    """Train keys matching the filters; a model filter also keeps its random-init twins (the baseline). Blocks
    are indices or the names `extract --blocks` accepts ('mid', 'down1.0')."""
    every = [k for k in store.feature_keys() if k.split == "train"]
    keys = [k for k in every if (dataset is None or k.dataset == dataset)
            and (model is None or k.model == model or k.model.startswith(f"{model}.random-init-"))
            and (input is None or k.input == input) and (ts is None or k.t in ts) and (pools is None or k.pool in pools)]
    if blocks is not None:
        names = block_names(store, keys)
        unknown = [b for b in blocks if not b.isdigit() and b not in names.values()]
        if unknown and keys:
            raise DiffstoreError(f"--blocks {','.join(unknown)}: no such block among the matching arrays; they hold "
                                 + ", ".join(f"{i} {n}" for i, n in sorted({(k.block, names[k]) for k in keys})))
        keys = [k for k in keys if str(k.block) in blocks or names[k] in blocks]
    if not keys:
        asked = {"dataset": dataset, "model": model, "input": input, "t": ts, "block": blocks, "pool": pools}
        given = {f: ",".join(map(str, v)) if isinstance(v, list) else v for f, v in asked.items()}
        want = "/".join(f"{f}={v}" for f, v in given.items() if v is not None)
        spell = lambda get: "/".join(f"{f}={get(f)}" for f in ROW_FIELDS)  # noqa: E731
        close = difflib.get_close_matches(spell(lambda f: given[f] or "*"), [spell(lambda f: getattr(k, f)) for k in every],
                                          n=3, cutoff=0.3)
        held = "; ".join(f"{f}: {', '.join(sorted({str(getattr(k, f)) for k in every}))}" for f in ROW_FIELDS)
        raise DiffstoreError(f"no train feature array in {store.url} matches {want or '(no filter)'}. "
                             + (f"Closest: {'; '.join(close)}. " if close else "")
                             + (f"The store holds {held}" if every else "The store is empty: run `diffstore extract` first"))
    return keys


# --- training and the results cache -----------------------------------------------------------------------


def result_name(source: Source, spec: HeadSpec, recipe: ProbeRecipe) -> str:
    fp = fingerprint({"arrays": source.fingerprints, "head": spec.to_dict(), "recipe": recipe.to_dict(spec.kind)})
    return f"{spec.kind}-{fp[:24]}"


def run_probes(store: Store, sources: list[Source], specs: list[HeadSpec], recipe: ProbeRecipe, retrain: bool = False,
               device: str | None = None, budget: int = DEFAULT_BUDGET, show_progress: bool = True) -> list[dict]:
    """One result per (source, head), in that order: stored ones reused unless `retrain`; the rest side by side
    per dataset (linear heads of the converged recipe solved, solve.py; others trained, train.py) and stored,
    each with its test hits (packed) and the bootstrap interval of its top-1."""
    cached = {} if retrain else {r["name"]: r for r in store.results("probe")}
    results: list = [None] * (len(sources) * len(specs))
    todo: dict[str, list] = {}
    for i, (source, spec) in enumerate((src, sp) for src in sources for sp in specs):
        name = result_name(source, spec, recipe)
        if name in cached:
            results[i] = {**cached[name], "cached": True}
        else:
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
        stderr.print(f"{dataset}: {len(solved)} linear probe(s) to solve, {len(trained)} head(s) to train "
                     f"({recipe.name} recipe, seed {recipe.seed})")
        metrics = solve_many([s.train for _, _, s, _ in solved], [s.test for _, _, s, _ in solved],
                             [spec.pool for *_, spec in solved], train.labels, test.labels, n_classes, recipe, device,
                             budget, show_progress) if solved else []
        jobs = [Job(s.train, s.test, spec, what=f"{s.row['model']} t={s.row['t']}/b={s.row['block']}/p={s.row['pool']}",
                    fix=s.fix) for _, _, s, spec in trained]
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


# --- the command ---------------------------------------------------------------------------------------------


def parse_list(text, name: str, cast=str) -> list | None:
    """'90,150' -> [90, 150]; None, '' or 'all' -> None (no filter)."""
    if text is None or str(text).strip() in ("", "all"):
        return None
    try:
        return [cast(v.strip()) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise DiffstoreError(f"--{name} takes comma-separated {cast.__name__}s, got {text!r}") from None


def probe_command(store: str = DEFAULT_STORE, dataset: str | None = None, model: str | None = None,
                  input: str | None = None, t: str | None = None, blocks: str | None = None, pools: str | None = None,
                  head: str = "linear", head_pool: int | None = None, batchnorm: bool = False, hidden: str = "512",
                  channels: str = "64,64", dim: int = 128, depth: int = 1, n_heads: int = 4, recipe: str = "converged",
                  steps: int = 3000, lrs: str = "0.001,0.003,0.01", weight_decays: str = "0,0.05,0.5", epochs: int = 28,
                  lr: float = 1e-3, weight_decay: float = 0.0, batch_size: int = 128,
                  step_every: int = 8, gamma: float = 0.1, val_frac: float = 0.1, early_stop: bool = False, seed: int = 0,
                  seeds: int = 1, limit: int | None = None, baseline: str | None = None, data_root: str | None = None,
                  select: int = 0, fuse: str | None = None, grid: bool = False, plot: str | None = None, show_all: bool = False,
                  json_out: bool = False, list_results: bool = False, retrain: bool = False, device: str | None = None,
                  memory_gb: float = DEFAULT_BUDGET / 2**30, show_progress: bool = True, workers: int | None = None,
                  scheduler: str | None = None, echo: bool = True) -> dict:
    """`diffstore probe`: a summary (or, with --all, every result; with --json, all of it as JSON) on stdout,
    progress on stderr; returns the results as the JSON holds them (echo=False: prints nothing on stdout)."""
    st = Store.open(store, "r")
    ranking, rho, plots = [], {}, []
    if list_results:
        results = st.results("probe", with_provenance=True)
    else:
        base = ProbeRecipe(recipe, epochs, lr, weight_decay, step_every, gamma, early_stop, steps=steps,
                           min_steps=min(steps, ProbeRecipe.min_steps), lrs=tuple(parse_list(lrs, "lrs", float) or ()),
                           weight_decays=tuple(parse_list(weight_decays, "weight-decays", float) or ()),
                           batch_size=batch_size, val_frac=val_frac, seed=seed, limit=limit)
        specs = [HeadSpec(k, head_pool, batchnorm, tuple(parse_list(hidden, "hidden", int) or ()),
                          tuple(parse_list(channels, "channels", int) or ()), dim, depth, n_heads)
                 for k in parse_list(head, "head") or ["linear"]]
        if seeds < 1:
            raise DiffstoreError(f"--seeds must be >= 1, got {seeds}")
        if select and fuse and fuse != "auto":
            raise DiffstoreError("--select ranks single keys; use it without --fuse (or --fuse auto: fuse the top K)")
        if baseline not in (None, "", "none", "pixels"):
            raise DiffstoreError(f"--baseline takes 'pixels' (random-init models are keys: extract them), got {baseline!r}")
        keys = select_keys(st, dataset, model, input, parse_list(t, "t", int), parse_list(blocks, "blocks"),
                           parse_list(pools, "pools"))
        budget, singles = int(memory_gb * 2**30), None
        if fuse:  # --model names the one model whose keys are fused (not its random-init twins)
            mine = [k for k in keys if model is None or k.model == model]
            if fuse == "auto":
                ranking, rho = rank_keys(st, [key_source(st, k, limit) for k in mine], base, device, budget, show_progress)
            singles = [key_source(st, k, limit) for k in (auto_keys(ranking, select) if fuse == "auto" else parse_fuse(fuse, mine))]
            sources = [fuse_source(singles)]
        else:
            sources = [key_source(st, k, limit) for k in keys]
        if select and not fuse:
            ranking, rho = rank_keys(st, sources, base, device, budget, show_progress)
            sources = [r["source"] for r in ranking if r["rank"] <= select]
        if baseline == "pixels":
            for ds in dict.fromkeys(s.row["dataset"] for s in sources):
                attrs = st.features(next(k for s in sources for k in s.keys if k.dataset == ds)).attrs
                sources.append(pixel_source(st, ds, attrs, data_root, limit))
        fusion = any(sp.kind == "fusion" for sp in specs)
        if fusion and baseline == "pixels":
            raise DiffstoreError("--baseline pixels is a single-key comparison: run it without --head fusion")
        runs = fusion_runs(singles, sources[0] if singles else None, specs) if fusion else [(sources, specs)]
        results = []
        for s, (group, group_specs) in ((s, run) for s in range(seed, seed + seeds) for run in runs):
            run = replace(base, seed=s)
            if workers or scheduler:  # one task per (key, head) on a dask cluster; same rows as in-process
                from ..distributed import probe_distributed

                results += probe_distributed(st, group, group_specs, run, retrain, device, budget, show_progress,
                                             workers=workers, scheduler=scheduler)
            else:
                results += run_probes(st, group, group_specs, run, retrain, device, budget, show_progress)
    shown = collapse_seeds(results)
    if plot:
        plots = write_plots(shown, plot)
        stderr.print(f"wrote {len(plots)} plots to {plot}")
    ranking = [{k: v for k, v in r.items() if k != "source"} for r in ranking]
    lines, fusions = summary(shown), compare(shown)
    out = {"results": results, "summary": [summary_json(s) for s in lines],
           **({"fusion": [fusion_json(f) for f in fusions]} if fusions else {}),
           **({"ranking": ranking, "spearman": rho} if select else {}), **({"plots": plots} if plots else {})}
    if json_out or not echo:
        if echo:
            print(json.dumps(out, indent=1))
        return out
    console = Console()
    if not console.is_terminal:  # piped: rich would squeeze the table into 80 columns
        console = Console(width=200)
    if ranking:
        console.print(ranking_table(ranking, rho))
    if show_all or list_results or not lines:
        console.print(results_table(shown, "stored probe results" if list_results else "probe results"))
    for table in grid_tables(shown) if grid else []:
        console.print(table)
    for line in fusions:
        console.print(comparison_table(line))
    for line in summary_lines(lines, plots):
        console.print(line, highlight=False, markup=False)
    if not (show_all or list_results) and lines:
        console.print(f"({len(shown)} results; every one with --all, or as JSON with --json)", highlight=False)
    return out


def fusion_json(line: dict) -> dict:
    """A fusion comparison with results named (not embedded)."""
    return {"fusion": line["fusion"]["name"],
            "rows": [{"features": r["features"], "result": r["result"]["name"], "head": r["result"]["head_label"],
                      "top1": r["result"]["top1"], "ci95": r["result"]["ci95"], "fusion_minus": r["fusion_minus"]}
                     for r in line["rows"]]}


def summary_json(line: dict) -> dict:
    """A summary line with results named (not embedded) and no packed hits."""
    best = line["best"]
    return {"dataset": line["dataset"], "head": line["head"], "recipe": line["recipe"], "n_keys": line["n_keys"],
            "best": {k: best.get(k) for k in ("name", "model", "t", "block", "block_name", "pool", "top1", "ci95",
                                               "val_top1", "seeds")},
            **{name: {"result": line[name]["result"]["name"], "diff": line[name]["diff"], "ci95": line[name]["ci95"]}
               for name in ("twin", "pixels") if name in line}}
