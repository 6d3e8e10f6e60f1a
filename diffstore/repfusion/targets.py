"""Teacher targets: z(t) for every sample x view x t of a K-point grid, at one layer, computed once.

    targets/{dataset}/{split}/{model}/{layer}/{input}/pooled    [N, V, K, C]         global average pool
    targets/{dataset}/{split}/{model}/{layer}/{input}/map       [N, V, K, C, H, W]   only with maps=True

Rows follow the split's order (its ids and labels are stored once under datasets/). The fingerprint covers
the model (weights + config), the dataset (ids + preprocessing), the t grid, the view bank, the input mode,
noise seed and draws, the layer, and the dtypes; a different recipe under the same path is refused.

Views are a fixed, seeded bank (identity, horizontal flip, optional translated crops): distillation draws its
augmentations from the same bank (`view_images`), so every augmented image has its exact stored target.
With noised input, the noise of a sample is keyed by its id and t (noise.py): every view of a sample sees the
same eps.

Layer (`--layer`): "mid-conv" (default) is the last convolution to run inside the mid block, the paper code's
choice (mid_block.resnets.1.conv2 in a diffusers U-Net); a block index or name from the model's block table
("mid", "5"); or any module path. A layer outside the table is traced once and appended to a private copy
of the table, so one code path (extract.forward_blocks, truncated right after the layer) serves all three.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import zarr

from ..blocks import BlockInfo, BlockTable, trace_blocks
from ..datasets import Split
from ..errors import DiffstoreError
from ..extract import SHARD_BYTES, encode_images, forward_blocks
from ..key import EXTRACTOR_VERSION, INPUT_MODES, fingerprint
from ..models.base import DiffusionModel
from ..preprocess import Preprocess
from ..progress import progress
from ..store import ShardedArray, Store
from .config import DEFAULT_LAYER, TargetsConfig


def parse_t_grid(spec: str, num_timesteps: int) -> list[int]:
    """'0:50:1,50:1000:50' -> the sorted union of range(start, stop, step); a plain integer is one point."""
    ts: set[int] = set()
    for item in (s.strip() for s in str(spec).split(",") if s.strip()):
        try:
            parts = [int(p) for p in item.split(":")]
        except ValueError:
            parts = []
        if len(parts) == 1:
            ts.add(parts[0])
        elif len(parts) == 3 and parts[2] > 0:
            ts.update(range(*parts))
        else:
            raise DiffstoreError(f"--t-grid takes start:stop:step ranges and integers separated by commas "
                                 f"(e.g. 0:50:1,50:1000:50), got {item!r}")
    bad = sorted(t for t in ts if not 0 <= t < num_timesteps)
    if bad or not ts:
        raise DiffstoreError(f"t grid {spec!r} must lie in [0, {num_timesteps - 1}] for this "
                             f"model; out of range: {bad[:5]}")
    return sorted(ts)


@dataclass(frozen=True)
class View:
    flip: bool = False
    dx: int = 0  # translation in pixels, the padding filled with black (-1), as a padded random crop does
    dy: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def view_bank(spec: str, size: int, seed: int = 0) -> list[View]:
    """'none' | 'flip' | 'flip,crops:4': identity first, then the flip, then N seeded crops (shift up to
    size/8, random flip) drawn once from `seed`, so the bank is the same on every machine."""
    bank = [View()]
    for item in (s.strip() for s in spec.split(",") if s.strip() and s.strip() != "none"):
        if item == "flip":
            bank.append(View(flip=True))
        elif item.startswith("crops:") and item[6:].isdigit():
            rng = np.random.default_rng(seed)
            shift = max(1, size // 8)
            for _ in range(int(item[6:])):
                dx, dy = (int(v) for v in rng.integers(-shift, shift + 1, size=2))
                bank.append(View(flip=bool(rng.integers(2)), dx=dx, dy=dy))
        else:
            raise DiffstoreError(f"--views takes 'none', 'flip' and 'crops:N' separated by commas, got {item!r}")
    return list(dict.fromkeys(bank))  # a repeated view would only duplicate targets


def translate(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    if dx == 0 and dy == 0:
        return x
    pad = max(abs(dx), abs(dy))
    h, w = x.shape[-2:]
    padded = F.pad(x, (pad, pad, pad, pad), value=-1.0)
    return padded[..., pad + dy:pad + dy + h, pad + dx:pad + dx + w]


def view_images(split: Split, rows: np.ndarray, preprocess: Preprocess, view: View) -> torch.Tensor:
    """float32 [len(rows), C, S, S] in [-1, 1]: the student's input and the teacher's x_0 for this view."""
    return translate(dataclasses.replace(preprocess, flip=view.flip)(split.load(rows)), view.dx, view.dy)


@dataclass(frozen=True)
class Layer:
    name: str  # the store path segment: "b5" for a table block, else the module path
    block: int  # its index in the (possibly extended) block table, for forward_blocks
    info: BlockInfo


def _trace_module_outputs(model: DiffusionModel, paths: list[str], x0: torch.Tensor) -> BlockTable:
    t = torch.zeros(len(x0), dtype=torch.long, device=next(model.module.parameters()).device)
    return trace_blocks(model.module, [(p, p) for p in paths], lambda: model.run(x0.to(t.device), t, None))


def resolve_layer(model: DiffusionModel, spec: str, x0: torch.Tensor) -> tuple[DiffusionModel, Layer]:
    """The model (with the layer appended to a copy of its table when it is not a block) and the layer."""
    names = {b.name for b in model.blocks} | ({"mid"} if model.blocks.mid is not None else set())
    if spec.isdigit() or spec in names:
        (b,) = model.blocks.resolve(spec)
        return model, Layer(f"b{b}", b, model.blocks[b])
    if spec == DEFAULT_LAYER:
        if model.blocks.mid is None:
            raise DiffstoreError(f"model {model.name} has no mid block for --layer {DEFAULT_LAYER}; "
                                 "pass a block or module path")
        mid = model.blocks[model.blocks.mid].module
        convs = [f"{mid}.{n}" for n, m in model.module.get_submodule(mid).named_modules()
                 if isinstance(m, torch.nn.Conv2d)]
        fired = _trace_module_outputs(model, convs, x0[:1])
        if not len(fired):
            raise DiffstoreError(f"no convolution ran inside {mid}; pass --layer as a block or module path")
        spec = fired.blocks[-1].module
    for b in model.blocks:
        if b.module == spec:
            return model, Layer(f"b{b.index}", b.index, b)
    try:
        model.module.get_submodule(spec)
    except AttributeError:
        raise DiffstoreError(f"--layer {spec!r} is neither a block of {model.name} ({', '.join(sorted(names))}, 1.."
                             f"{len(model.blocks)}) nor a module path in it. Run "
                             "`diffstore blocks --model M`") from None
    traced = _trace_module_outputs(model, [spec], x0[:1])
    if not len(traced):
        raise DiffstoreError(f"module {spec} never runs in a forward of {model.name}; pick another --layer")
    info = dataclasses.replace(traced.blocks[0], index=len(model.blocks) + 1)
    extended = dataclasses.replace(model, blocks=BlockTable([*model.blocks, info], model.blocks.mid))
    return extended, Layer(spec, info.index, info)


def targets_base(dataset: str, split: str, model: str, layer: str, input_mode: str) -> str:
    return f"targets/{dataset}/{split}/{model}/{layer}/{input_mode}"


def target_paths(store: Store, kind: str = "pooled") -> list[str]:
    """Every target array of `kind` ("pooled" or "map") in the store."""
    try:
        g = store.root["targets"]
    except KeyError:
        return []
    return sorted(f"targets/{p}" for p, node in g.members(max_depth=None)
                  if isinstance(node, zarr.Group) and p.endswith(f"/{kind}") and "x" in node)


def open_targets(store: Store, path: str | None = None) -> ShardedArray:
    """The targets at `path` (a pooled or map array, or their folder: pooled), or the store's only pooled
    ones; complete, or a message saying how to finish them."""
    paths = target_paths(store)
    if path is None:
        if len(paths) != 1:
            raise DiffstoreError(f"{store.url} holds {len(paths)} target arrays; "
                                 + ("pass --targets, one of: " + ", ".join(paths) if paths
                                    else "run `diffstore repfusion targets` first"))
        path = paths[0]
    path = path if path.endswith(("/pooled", "/map")) else f"{path.rstrip('/')}/pooled"
    return store.open_array(path).require_done()


def build_targets(store: Store, model: DiffusionModel, split: Split, cfg: TargetsConfig, show_progress: bool = True,
                  whole: Split | None = None) -> dict:
    """Fill the target arrays shard by shard; done shards are skipped, so a re-run resumes or does nothing."""
    if cfg.input not in INPUT_MODES:
        raise DiffstoreError(f"--input must be one of {', '.join(INPUT_MODES)}, got {cfg.input!r}")
    ts = parse_t_grid(cfg.t_grid, model.num_timesteps)
    pre = Preprocess(size=model.image_size, channels=model.image_channels)
    bank = view_bank(cfg.views, pre.size, cfg.view_seed)
    model.module.eval()

    def x0_of(rows, view):
        return encode_images(model, view_images(split, rows, pre, view))

    model, lay = resolve_layer(model, cfg.layer, x0_of(np.arange(1), bank[0]))
    recipe = {"kind": "repfusion-targets", "model_fingerprint": model.fingerprint,
              "dataset_fingerprint": split.fingerprint(pre), "t_grid": ts, "views": [v.to_dict() for v in bank],
              "input": cfg.input, "noise_seed": cfg.noise_seed, "noise_draws": cfg.noise_draws,
              "layer": lay.info.module,
              "compute_dtype": cfg.compute_dtype, "storage_dtype": cfg.dtype, "extractor_version": EXTRACTOR_VERSION}
    base = targets_base(split.name, split.split, model.name, lay.name, cfg.input)
    c, h, w = lay.info.channels, lay.info.height, lay.info.width
    shapes = {"pooled": (len(bank), len(ts), c), **({"map": (len(bank), len(ts), c, h, w)} if cfg.maps else {})}
    row_bytes = sum(int(np.prod(s)) for s in shapes.values()) * 4
    shard_rows = cfg.shard_rows or int(max(8, min(256, SHARD_BYTES // row_bytes)))
    key = {"dataset": split.name, "split": split.split, "model": model.name, "layer": lay.name, "input": cfg.input}
    # how to load the same images again (distill.load_images): name, the loader's split, root and prefix
    dataset = {"name": split.name, "split": split.split, "loader_split": cfg.split, "limit": cfg.limit,
               "root": cfg.data_root, "source": split.source, "ids_sha256": split.ids_sha256(),
               "class_names": split.class_names}
    attrs = {kind: {"key": {**key, "kind": kind}, "recipe": {**recipe, "target": kind}, "t_grid": ts,
                    "views": [v.to_dict() for v in bank], "block": lay.info.to_dict(), "preprocess": pre.to_dict(),
                    "dataset": dataset, "model": {"name": model.name, "source": model.source}} for kind in shapes}
    # Refuse before writing anything: other sample ids, or another recipe under the same path.
    store.check_split(whole or split)  # the store's split is the whole order; the targets' rows are its first ones
    for kind in shapes:
        store.check(f"{base}/{kind}", fingerprint(attrs[kind]["recipe"]), attrs[kind])
    store.put_split(whole or split)
    arrays = {kind: store.create(f"{base}/{kind}", fingerprint(attrs[kind]["recipe"]), attrs[kind], shape, len(split),
                                 shard_rows, cfg.dtype) for kind, shape in shapes.items()}
    todo = sorted(set().union(*(a.missing() for a in arrays.values())))
    pools = ["1"] + (["full"] if cfg.maps else [])
    with progress("img", disable=not show_progress) as bar:
        task = bar.add_task(f"targets {lay.name} on {split.name}/{split.split} {model.name}",
                            total=sum(len(range(len(split))[arrays['pooled'].shard_slice(i)])
                                      for i in todo) * len(bank) * len(ts))
        for i in todo:
            rows = np.arange(len(split))[arrays["pooled"].shard_slice(i)]
            buffers = {k: np.empty((len(rows), *s), dtype=np.float32) for k, s in shapes.items()}
            for start in range(0, len(rows), cfg.batch_size):
                batch = rows[start:start + cfg.batch_size]
                for v, view in enumerate(bank):
                    x0 = x0_of(batch, view)
                    for k, t in enumerate(ts):
                        out = forward_blocks(model, x0, t, split.ids[batch], split.labels[batch], cfg.noise_seed,
                                             cfg.noise_draws, cfg.input, [lay.block], pools, cfg.compute_dtype)
                        pooled = out[(lay.block, "1")].flatten(1).cpu().numpy()
                        buffers["pooled"][start:start + len(batch), v, k] = pooled
                        if cfg.maps:
                            buffers["map"][start:start + len(batch), v, k] = out[(lay.block, "full")].cpu().numpy()
                        bar.advance(task, len(batch))
            for kind, arr in arrays.items():
                if not arr.done_mask()[i]:
                    arr.write_shard(i, buffers[kind])
    return {"path": base, "layer": lay.name, "module": lay.info.module, "t_grid": ts, "K": len(ts),
            "views": [v.to_dict() for v in bank], "shape": {k: list(a.shape) for k, a in arrays.items()},
            "shards_written": len(todo), "shards_total": arrays["pooled"].n_shards,
            "bytes_per_image": {k: int(np.prod(s)) * np.dtype(cfg.dtype).itemsize for k, s in shapes.items()},
            "fingerprint": arrays["pooled"].attrs["fingerprint"]}
