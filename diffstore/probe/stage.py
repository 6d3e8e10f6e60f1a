"""The `diffstore probe` stage: pick feature arrays in a store (sources.py), train heads on them side by side
(results.py: solve.py for converged linear heads, train.py for the rest), show the results as a table (or JSON)
and store them next to the features.

Which keys: every train array matching the filters, each paired with its test twin; --model M also keeps M's
random-init twins (M.random-init-sN) as the baseline they are. --baseline pixels adds the same head on the
preprocessed images; --fuse trains one head on several keys' features concatenated; --select K ranks the keys by
the ridge proxy (select.rank_keys) and trains the top K; --fuse auto --select K fuses the top K; --head fusion
trains the fusion head over the fused keys (fusion.py).
"""

from __future__ import annotations

import json
from dataclasses import replace

from ..errors import DiffstoreError, require
from ..options import api, check_folder, spell
from ..progress import stderr, write_csv
from ..store import Store
from ..terminal import console as make_console
from ..terminal import fold
from ..views import view_set
from .frame import COLUMNS, ProbeResults
from .fusion import auto_keys, compare, comparison_table, fusion_runs
from .heads import HeadSpec
from .options import ProbeOptions
from .recipe import ProbeRecipe
from .report import collapse_seeds, grid_tables, ranking_table, results_table, summary, summary_lines
from .results import run_probes
from .select import rank_keys
from .sources import fuse_source, key_source, parse_fuse, pixel_source, select_keys, with_views


def compute(o: ProbeOptions) -> ProbeResults:
    """Train heads on stored features (the U-Net is never run) and store the results; returns them as data
    (ProbeResults: its to_json() is what `--json` prints). Nothing is printed on stdout."""
    check_folder(o, "plot")
    if o.plot:  # refused before any training: a missing extra, no format
        require("matplotlib", "plots")
        if not o.plot_format:
            raise DiffstoreError(f"{spell('plot_format', ProbeOptions)} needs a format: png, pdf or svg")
    st = Store.open(o.store, "r")
    ranking, rho, plots = [], {}, []
    show_progress, budget, baseline = o.show_progress, int(o.memory_gb * 2**30), o.baseline
    if o.list_results:
        results = st.results("probe", with_provenance=True)
    else:
        base = ProbeRecipe(o.recipe, o.epochs, o.lr, o.weight_decay, o.step_every, o.gamma, o.early_stop,
                           steps=o.steps, min_steps=min(o.steps, ProbeRecipe.min_steps), lrs=o.lrs,
                           weight_decays=o.weight_decays, batch_size=o.batch_size, val_frac=o.val_frac, seed=o.seed,
                           limit=o.limit, Cs=o.cs, refit=o.refit, ks=o.ks, temperature=o.temperature,
                           augment=o.augment, views=len(view_set(o.augment)) if o.augment else 1)
        if o.augment and o.baseline == "pixels":
            raise DiffstoreError(f"{spell('augment', ProbeOptions)} trains on stored views, which pixels do not have: "
                                 f"drop {spell('baseline', ProbeOptions)} pixels (or run it in a separate call)")
        specs = [HeadSpec(k, o.head_pool, o.batchnorm, o.hidden, o.channels, o.dim, o.depth, o.n_heads)
                 for k in o.head]
        select, fuse = o.select, o.fuse
        if select and fuse and fuse != "auto":
            raise DiffstoreError(f"{spell('select', ProbeOptions)} ranks single keys; use it without "
                                 f"{spell('fuse', ProbeOptions)} (or fuse auto: fuse the top K)")
        keys = select_keys(st, o.dataset, o.model, o.input, o.t, o.blocks, o.pools)
        if o.augment:
            keys, without = with_views(st, keys, o.augment)
            if without:
                stderr.print(f"note: {len(without)} key(s) without stored {o.augment} views are not probed (models "
                             f"{', '.join(dict.fromkeys(k.model for k in without))}); to compare them, extract with "
                             f"`{st.features(without[0]).extract_hint()} --views {o.augment}`")
        singles = None
        if fuse:  # --model names the one model whose keys are fused (not its random-init twins)
            mine = [k for k in keys if o.model is None or k.model == o.model]
            if fuse == "auto":
                ranking, rho = rank_keys(st, [key_source(st, k, o.limit, o.augment) for k in mine], base, o.device,
                                         budget, show_progress)
            chosen = auto_keys(ranking, select) if fuse == "auto" else parse_fuse(fuse, mine)
            singles = [key_source(st, k, o.limit, o.augment) for k in chosen]
            sources = [fuse_source(singles)]
        else:
            sources = [key_source(st, k, o.limit, o.augment) for k in keys]
        if select and not fuse:
            ranking, rho = rank_keys(st, sources, base, o.device, budget, show_progress)
            sources = [r["source"] for r in ranking if r["rank"] <= select]
        if baseline == "pixels":
            for ds in dict.fromkeys(s.row["dataset"] for s in sources):
                attrs = st.features(next(k for s in sources for k in s.keys if k.dataset == ds)).attrs
                sources.append(pixel_source(st, ds, attrs, o.data_root, o.limit))
        fusion = any(sp.kind == "fusion" for sp in specs)
        if fusion and baseline == "pixels":
            raise DiffstoreError("--baseline pixels is a single-key comparison: run it without --head fusion")
        runs = fusion_runs(singles, sources[0] if singles else None, specs) if fusion else [(sources, specs)]
        results = []
        for s, (group, group_specs) in ((s, run) for s in range(o.seed, o.seed + o.seeds) for run in runs):
            recipe = replace(base, seed=s)
            if o.workers or o.scheduler:  # one task per (key, head) on a dask cluster; same rows as in-process
                from .distributed import probe_distributed

                results += probe_distributed(st, group, group_specs, recipe, o.retrain, o.device, budget,
                                             show_progress, workers=o.workers, scheduler=o.scheduler,
                                             save_heads=o.save_heads)
            else:
                results += run_probes(st, group, group_specs, recipe, o.retrain, o.device, budget, show_progress,
                                      o.save_heads)
    shown = collapse_seeds(results)
    if o.plot:
        from .figures import write_plots

        plots = write_plots(shown, o.plot, o.plot_format, o.dpi)
        stderr.print(f"wrote {len(plots)} plots to {o.plot}")
    # test labels: mean-per-class intervals resample within each class
    labels = {d: st.split(d, "test").labels for d in dict.fromkeys(r["dataset"] for r in shown)}
    lines = [line for m in o.metric for line in summary(shown, m, labels)]
    return ProbeResults(results, shown, lines, compare(shown), ranking, rho, plots, labels)


def probe_command(o: ProbeOptions, fmt: str | None = None) -> ProbeResults:
    """`diffstore probe`: a summary (or, with --all, every result; with --json all of it as JSON, with --csv the
    tidy table) on stdout, progress on stderr; returns what compute() returns."""
    out = compute(o)
    shown, lines, fusions, ranking = out.shown, out.lines, out.fusions, out.ranking
    if fmt == "json":
        print(json.dumps(out.to_json(), indent=1))
        return out
    if fmt == "csv":
        write_csv(out.rows(), COLUMNS)
        return out
    console = make_console()
    if ranking:
        console.print(fold(ranking_table(ranking, out.rho), console.width))
    if o.show_all or o.list_results or not lines:
        title = "stored probe results" if o.list_results else "probe results"
        console.print(fold(results_table(shown, title, o.metric), console.width))
    for table in grid_tables(shown) if o.grid else []:
        console.print(fold(table, console.width))
    for line in fusions:
        console.print(fold(comparison_table(line), console.width))
    for line in summary_lines(lines, out.plots):
        console.print(line, highlight=False, markup=False)
    if not (o.show_all or o.list_results) and lines:
        console.print(f"({len(shown)} results; every one with --all, or as JSON with --json)", highlight=False)
    return out


probe = api(ProbeOptions)(compute)
