"""The fusion head: one transformer over the tokens of several stored keys (t, block), trained from the store alone.

Mukhopadhyay et al. ("Do text-free diffusion models learn discriminative visual representations?", ECCV 2024) fuse
features of several blocks and time steps with a transformer head, recomputing the U-Net for every t at every
training step. Here every (t, block) is already a key in the store, so fusion reads arrays and never the model.

    tokens   each key's map is average-pooled to at most 8x8 (or --head-pool) tokens, so keys of any resolution
             and channel count fit; a key stored as p=1 is one token
    head     per key a linear projection of its C channels to a common width, plus learned embeddings of its t,
             its block and the token's grid position (per token side); a CLS token and --depth Transformer blocks
             (heads.transformer, as the attention head) fuse them; classify from CLS
    rows     one row holds every key's pooled map flattened and concatenated ([D, 1, 1]), so the shared Feed,
             the per-feature Standardize and the converged recipe of train.py serve it unchanged
    compare  `--head attention,linear,fusion --fuse KEYS` also trains every other head on each fused key alone and
             on their concatenation (--fuse's feed.fuse_rows), and shows one table: best single key, concatenation
             and fusion, each with its 95% interval, and fusion minus each with the paired-bootstrap interval
    auto     `--fuse auto --select K` fuses the top K keys of the ridge proxy ranking (select.py)
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from rich.table import Table

from ..errors import DiffstoreError
from .feed import Rows
from .heads import FUSION, MAX_TOKENS_SIDE, HeadSpec
from .intervals import difference, result_hits
from .report import signed, with_ci


def token_side(row_shape: tuple, pool: int | None) -> int:
    return min(min(row_shape[1:]), pool or MAX_TOKENS_SIDE)


def token_rows(parts: list[Rows], pool: int | None = None) -> Rows:
    """Several keys' rows (same samples) as one: each map pooled to its token side, flattened, concatenated."""
    if len({p.n_rows for p in parts}) > 1:
        raise DiffstoreError(f"fusion needs arrays of the same samples; row counts differ: {[p.n_rows for p in parts]}")
    sides = [token_side(p.row_shape, pool) for p in parts]

    def read(sl):
        out = []
        for p, s in zip(parts, sides):
            x = np.asarray(p.read(sl), np.float32)
            if x.shape[2:] != (s, s):
                x = F.adaptive_avg_pool2d(torch.from_numpy(x), s).numpy()
            out.append(x.reshape(len(x), -1))
        return np.concatenate(out, 1)[:, :, None, None]

    width = sum(p.row_shape[0] * s * s for p, s in zip(parts, sides))
    return Rows(parts[0].n_rows, (width, 1, 1), parts[0].chunk_rows, read)


# --- the stage: which sources each head reads, auto keys, the comparison -----------------------------------


def auto_keys(ranking: list[dict], k: int) -> list:
    """The train keys of the top k of a proxy ranking (select.rank_keys), best first."""
    if k < 2:
        raise DiffstoreError("--fuse auto fuses the top K keys of the proxy ranking: pass --select K with K >= 2")
    if len({r["dataset"] for r in ranking}) > 1:
        raise DiffstoreError("--fuse auto needs keys of one dataset (the same samples): pass --dataset")
    return [r["source"].keys[0] for r in ranking if r["rank"] <= k]


def fusion_runs(singles: list | None, fused, specs: list[HeadSpec]) -> list[tuple[list, list[HeadSpec]]]:
    """(sources, heads) groups to train: the fusion head on the tokens of the fused keys; every other head on
    each fused key alone and on their concatenation (`fused`, a stage.Source), for the comparison."""
    if not singles:
        raise DiffstoreError("--head fusion needs the keys to fuse: --fuse t=10/b=7/p=full,t=50/b=12/p=full "
                             "or --fuse auto --select K")
    fusion = [s for s in specs if s.kind == FUSION]
    keys = tuple((s.train.row_shape[0], token_side(s.train.row_shape, fusion[0].pool), s.row["t"], s.row["block"])
                 for s in singles)
    tokens = replace(fused, kind=FUSION, train=token_rows([s.train for s in singles], fusion[0].pool),
                     test=token_rows([s.test for s in singles], fusion[0].pool))
    others = [s for s in specs if s.kind != FUSION]
    return [([tokens], [replace(s, keys=keys) for s in fusion])] + ([(singles + [fused], others)] if others else [])


def compare(results: list[dict]) -> list[dict]:
    """Per fusion result: rows (best single key per other head by validation top-1, the concatenation per head,
    the fusion head), each with fusion minus it (paired bootstrap over the same test samples)."""
    out = []
    for fusion in (r for r in results if r["kind"] == FUSION):
        mine = [r for r in results if r["dataset"] == fusion["dataset"] and r["n_test"] == fusion["n_test"]]
        rows = []
        for head in dict.fromkeys(r["head_label"] for r in mine if r["kind"] != FUSION):
            singles = [r for r in mine if r["kind"] == "store" and r["head_label"] == head
                       and r["keys"][0] in fusion["keys"] and r["val_top1"] is not None]
            if singles:
                rows.append({"features": "best single key", "result": max(singles, key=lambda r: r["val_top1"])})
            rows += [{"features": "concatenation", "result": r} for r in mine
                     if r["kind"] == "fuse" and r["head_label"] == head and r["keys"] == fusion["keys"]]
        hits = result_hits(fusion)
        out.append({"fusion": fusion, "rows": [{**row, "fusion_minus": difference(hits, result_hits(row["result"]))}
                                               for row in rows]})
    return out


def comparison_table(line: dict) -> Table:
    f = line["fusion"]
    table = Table(title=f"{f['dataset']} {f['model']}: fusion of {len(f['keys'])} keys vs the best single key and the "
                        "concatenation", caption="top-1 with its 95% bootstrap interval; best single key chosen by "
                                                 "validation top-1; fusion minus it: paired "
                                                 "bootstrap, same test samples")
    for col in ("features", "head", "t", "block", "pool", "params", "top-1 [95% CI]", "val top-1",
                "fusion minus it [95% CI]"):
        table.add_column(col, justify="right" if col in ("params", "val top-1") else "left")
    for row in [*line["rows"], {"features": "fusion", "result": f}]:
        r, d = row["result"], row.get("fusion_minus")
        table.add_row(row["features"], r["head_label"], str(r["t"]), str(r["block"]), str(r["pool"]),
                      f"{r['params']:,}", with_ci(r), f"{100 * r['val_top1']:.1f}",
                      "-" if d is None else signed(d))
    return table
