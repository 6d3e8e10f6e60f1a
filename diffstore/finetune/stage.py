"""The `diffstore finetune` stage: one stored key (dataset, model, input, t, block, pool), its network truncated
after block b plus a head, trained end to end (network.py, train.py); the result stored as results/finetune/{name}
with the row fields of a probe result, and shown beside the stored frozen probe of the same key and head on the
same test rows, with paired differences (report.py).

Nothing read from the store is loaded or run. The network is --model (as extract takes it), and before anything
else its fingerprint must be the one the key's arrays recorded (extract/recorded.py, as repair checks it); the data
comes from --data-root (or the dataset's default location), in the store's order, checked against the recorded
dataset fingerprint. The forward recipe (noise seed and draws, compute dtype, micro-batch) is the arrays', checked
like extract's options. --limit N reads rows [0, N) only, and only when they are extracted. Before training, the
pretrained network's output on the first test rows is compared with the stored features (`store_check`). Running
the same settings again shows the stored result, marked cached, unless --retrain.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from ..device import pick_device
from ..errors import DiffstoreError
from ..extract.recorded import Recorded, recorded
from ..key import FeatureKey, fingerprint
from ..models import load_model
from ..models.base import DiffusionModel
from ..options import api, spell
from ..probe.feed import Feed, first_labels, split_val
from ..probe.heads import HeadSpec, build_head
from ..probe.intervals import bootstrap_interval, pack
from ..probe.recipe import ProbeRecipe
from ..probe.sources import Source, key_source, select_keys
from ..progress import stderr
from ..store import Store
from .network import Truncated, check_model, input_rows, output_rows, trainable
from .options import FinetuneOptions
from .report import KIND, compare, show
from .train import EVAL_BATCH, train_grid

CHECK_ROWS = 64  # test rows compared with the stored features before training (at least one micro-batch)


def settings(o: FinetuneOptions) -> tuple[HeadSpec, ProbeRecipe]:
    """The head and the converged recipe the options describe (the recipe checks its grid)."""
    spec = HeadSpec(o.head, dim=o.dim, depth=o.depth, n_heads=o.n_heads)
    recipe = ProbeRecipe(steps=o.steps, min_steps=min(o.steps, o.min_steps), lrs=o.lrs, weight_decays=o.weight_decays,
                         batch_size=o.batch_size, eval_every=o.eval_every, patience=o.patience, val_frac=o.val_frac,
                         seed=o.seed, limit=o.limit)
    return spec, recipe


def find_key(store: Store, o: FinetuneOptions, model: DiffusionModel) -> FeatureKey:
    """The one train key of `model` (by its name in store paths) the options name; select_keys refuses unknown
    blocks and keys, naming what is stored."""
    keys = select_keys(store, o.dataset, None, o.input, [o.t], [o.block], [o.pool])
    mine = [k for k in keys if k.model == model.name]
    if not mine:
        held = ", ".join(sorted({k.model for k in keys}))
        raise DiffstoreError(f"no train array of model {model.name} in {store.url} matches t={o.t}/b={o.block}/"
                             f"p={o.pool}; arrays of model(s) {held} do: pass {spell('model_name', FinetuneOptions)}"
                             f" NAME with the {spell('model', FinetuneOptions)} that extracted them")
    if len(mine) > 1:
        raise DiffstoreError(f"{len(mine)} keys in {store.url} match: {', '.join(k.path for k in mine)}; pass "
                             f"{spell('dataset', FinetuneOptions)} or {spell('input', FinetuneOptions)} to pick one")
    return mine[0]


def load(o: FinetuneOptions, scratch: bool = False) -> DiffusionModel:
    """--model as given (ModelOptions, as extract loads it), or with scratch=True the same architecture with
    seeded random weights (random_init = --init-seed)."""
    spec = o.model_spec()
    if scratch:
        spec["random_init"] = o.init_seed
    return load_model(spec.pop("spec"), **spec)


def result_name(source: Source, spec: HeadSpec, recipe: ProbeRecipe, o: FinetuneOptions) -> str:
    start = {"from": o.start, **({"init_seed": o.init_seed} if o.start == "scratch" else {})}
    fp = fingerprint({"arrays": source.fingerprints, "head": spec.to_dict(), "recipe": recipe.to_dict("iterative"),
                      **start})
    return f"{o.start}-{spec.kind}-{fp[:24]}"


def store_check(net: Truncated, test_rows, stored, device) -> dict:
    """The untrained network's output on the first test rows vs the stored features, after the storage cast."""
    n = min(max(CHECK_ROWS, net.recipe.micro_batch), test_rows.n_rows)  # whole micro-batches, as extraction ran them
    ours = torch.from_numpy(output_rows(net, test_rows, device).read(slice(0, n)))
    theirs = torch.from_numpy(np.asarray(stored.read(slice(0, n)), np.float32))  # readers may decode to float32
    ours = ours.to(getattr(torch, net.recipe.storage_dtype)).float()  # the cast extraction stored
    return {"rows": n, "bit_identical": bool(torch.equal(ours, theirs)),
            "max_abs_diff": float((ours.float() - theirs.float()).abs().max())}


def train_key(store: Store, arrays: dict[str, Recorded], model: DiffusionModel, source: Source, spec: HeadSpec,
              recipe: ProbeRecipe, o: FinetuneOptions) -> dict:
    """Build the network for the key, train it (train.train_grid) and return its result payload."""
    key, forward = arrays["train"].key, arrays["train"].recipe
    model = model.to(device := pick_device(o.device))
    labels = {s: first_labels(store.split(key.dataset, s), o.limit).labels for s in ("train", "test")}
    n_classes = len(store.split(key.dataset, "train").class_names)
    if len(labels["train"]) < n_classes:
        raise DiffstoreError(f"{len(labels['train'])} train rows are too few to train and validate {n_classes} "
                             f"classes; raise {spell('limit', FinetuneOptions)} to at least {n_classes}")
    rows = {s: input_rows(model, a.data, a.preprocess, key, forward, len(labels[s])) for s, a in arrays.items()}
    truncated = Truncated(model, key, forward)
    check = store_check(truncated, rows["test"], source.test, device) if o.start == "pretrained" else None
    if check and not check["bit_identical"]:
        stderr.print(f"[yellow]warning[/]: the untrained network's features differ from the stored ones on the first "
                     f"{check['rows']} test rows (max |diff| {check['max_abs_diff']:.3g}; another device or kernels?)")
    outputs = output_rows(truncated, rows["train"], device)  # Standardize: the probe's statistics, of these outputs
    stats = Feed([outputs], labels["train"], split_val(len(labels["train"]), recipe.val_frac, recipe.seed)[0],
                 EVAL_BATCH, device).channel_stats()[0]
    network_params = trainable(truncated, torch.from_numpy(rows["train"].read(slice(0, 2))).to(device))
    torch.manual_seed(recipe.seed)  # the head's init, as the probe seeds it
    net = nn.Sequential(truncated, build_head(spec, outputs.row_shape, n_classes, *stats, fix=source.fix)).to(device)
    stderr.print(f"{key.path}: fine-tuning {network_params:,} network values from {o.start} weights with a "
                 f"{spec.label()} head ({len(recipe.lrs) * len(recipe.weight_decays)} grid points, <= {recipe.steps} "
                 "steps each)")
    m = train_grid(net, rows["train"], rows["test"], labels["train"], labels["test"], n_classes, recipe, device,
                   show_progress=o.show_progress)
    hits = m.pop("hits")
    start = {"init_seed": o.init_seed} if o.start == "scratch" else {"store_check": check}
    return {**source.row, "kind": KIND, "from": o.start, **start, "keys": [key.to_dict()],
            "fingerprints": source.fingerprints, "head": spec.to_dict(), "head_label": spec.label(),
            "recipe": recipe.to_dict("iterative"), "seed": recipe.seed, "network_params": network_params, **m,
            "ci95": bootstrap_interval(hits), "test_hits": pack(hits)}


def compute(o: FinetuneOptions) -> dict:
    """Fine-tune (or show the stored result of) the network truncated after the key's block, plus a head, end to
    end; with start="scratch" the same architecture from seeded random weights. Stored as results/finetune/{name}.
    Returns {"result", "frozen", "runs", "differences"}: this result, the stored frozen probe of the same key and
    head on the same test rows, every stored fine-tuning of it, and the paired differences. Prints nothing."""
    spec, recipe = settings(o)
    given = load(o)
    check_model(given)
    store = Store.open(o.store, "r")
    key = find_key(store, o, given)
    source = key_source(store, key, o.limit)  # refuses a missing test twin, and rows [0, limit) not extracted
    fix = (f"Pass the {spell('model', FinetuneOptions)} (and {spell('model_name', FinetuneOptions)}) {key.path} was "
           "extracted with; nothing was trained")
    arrays = {s: recorded(store, replace(key, split=s).path, given, o.data_root, fix) for s in ("train", "test")}
    name = result_name(source, spec, recipe, o)
    stored = {} if o.retrain else {r["name"]: r for r in store.results(KIND)}
    if name in stored:
        result = {**stored[name], "cached": True}
    else:
        model = given if o.start == "pretrained" else load(o, scratch=True)
        result = {"name": name, **train_key(store, arrays, model, source, spec, recipe, o)}
        Store.open(store.url, "a").put_result(KIND, name, result)
        if not result["converged"]:
            stderr.print("[yellow]warning[/]: the chosen grid point was still improving on validation at the step "
                         f"budget: raise {spell('steps', FinetuneOptions)}")
    return {"result": result, **compare(store, result)}


def finetune_command(o: FinetuneOptions, json_out: bool = False) -> dict:
    """`diffstore finetune`: the comparison table on stdout (or everything as JSON), progress on stderr."""
    out = compute(o)
    if json_out:
        print(json.dumps(out, indent=1, default=str))
    else:
        show(out, o)
    return out


finetune = api(FinetuneOptions)(compute)
