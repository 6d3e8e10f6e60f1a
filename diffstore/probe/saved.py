"""Fitted heads kept in the store (`diffstore probe --save-heads`) and loaded back as estimators
(`ds.open(url).head(...)`, estimators.py) that predict on new features.

A head is stored next to its result, as results/heads/{the result's name}: its weights as arrays (never a pickle:
nothing read from a store is executed) and, in attrs, what it is: the key(s), fingerprints and row shape of the
arrays it was fitted on, the head spec, the recipe, the chosen hyperparameters (C, k, lr and weight decay), the
class names and the result's top-1. `diffstore rm` of a key removes the heads fitted on it with its results.

    linear (converged)   float32 mean, std [D], coef [D, K], bias [K]: logits = (x - mean) / std @ coef + bias
                         (solve.fold: the form the stage scored its test rows with) -> LinearProbe
    mlp, cnn, attention  the module's state dict, one array per tensor, loaded into heads.build_head -> HeadProbe
    (linear: paper)
    knn                  no arrays: the bank is the train array itself, named by key and checked by fingerprint on
                         loading, with which of its rows are the bank (fit rows or all). A copy would be the train
                         split again per head, and could silently outlive a re-extraction -> KNNProbe
Not saved, with a note: fusion heads (their input is several keys' tokens, no one array of the store) and kNN
heads on pixels (their bank is not in the store).

What a store says about a head is untrusted (attrs.py): every field a loader acts on is checked first, and the
weights' names and shapes must be exactly those of the head the description builds (built on torch's meta device,
so a forged size allocates nothing) before any weight is read.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import DiffstoreError
from ..key import FeatureKey, check_name
from ..progress import stderr
from ..store import Store
from ..store.attrs import bad, positive_int, shown
from .feed import Rows, first_labels, first_rows, fuse_rows, split_val
from .heads import FUSION, KNN, HeadSpec, build_head
from .options import KINDS
from .solve import flat

IDENTITY = ("dataset", "model", "input", "t", "block", "block_name", "pool", "kind", "keys", "fingerprints",
            "head_label", "top1")
SELECTABLE = ("dataset", "model", "input", "t", "block", "pool", "head", "estimator")


def estimator_name(result: dict) -> str:
    kind = result["head"]["kind"]
    if kind == KNN:
        return "KNNProbe"
    return "LinearProbe" if kind == "linear" and result["recipe"]["name"] == "converged" else "HeadProbe"


def saveable(result: dict) -> bool:
    return result["head"]["kind"] != FUSION and (result["head"]["kind"] != KNN or result["kind"] in ("store", "fuse"))


def stored_heads(store: Store) -> set[str]:
    return {p.get("result") for p in store.results("heads") if isinstance(p, dict)}


def save_head(writer: Store, result: dict, spec: HeadSpec, fitted, row_shape: tuple, class_names: list) -> None:
    """Store the fitted head of `result` (its weights: a folded linear head's arrays, an nn.Module, or a kNN's k)."""
    if not saveable(result):
        why = "it reads several keys' tokens" if spec.kind == FUSION else "its bank (the pixels) is not in the store"
        stderr.print(f"note: the {spec.label()} head on {result['model']} is not saved: {why}")
        return
    if isinstance(fitted, torch.nn.Module):
        arrays = {name: t.detach().cpu().numpy() for name, t in fitted.state_dict().items()}
    else:
        arrays = {name: np.asarray(v, np.float32) for name, v in fitted.items() if isinstance(v, np.ndarray)}
    payload = {"result": result["name"], "estimator": estimator_name(result), **{f: result[f] for f in IDENTITY},
               "head": result["head"], "recipe": result["recipe"], "row_shape": list(row_shape),
               "class_names": list(class_names), "chosen": {f: result[f] for f in ("C", "k", "lr", "weight_decay")
                                                             if f in result},
               **({"bank": fitted["bank"]} if spec.kind == KNN else {})}
    writer.put_result("heads", result["name"], payload, arrays)


def find_heads(store: Store, **selector) -> list[dict]:
    """The saved heads' descriptions matching a selector: any of SELECTABLE (head: its kind or label, e.g.
    "linear+bn"), a value or a list of values. Each description is checked (checked_payload) before it is read."""
    unknown = set(selector) - set(SELECTABLE)
    if unknown:
        raise DiffstoreError(f"unknown head field(s) {', '.join(sorted(unknown))}: use {', '.join(SELECTABLE)}")
    want = {f: {str(x) for x in (v if isinstance(v, (list, tuple, set)) else [v])} for f, v in selector.items()
            if v is not None}

    def value(p: dict, f: str) -> set:
        if f == "head":
            return {p["head"]["kind"], p["head_label"]}
        return {str(p[f])} | ({str(p["block_name"])} if f == "block" else set())

    found = [checked_payload(p, f"{store.url.rstrip('/')}/results/heads") for p in store.results("heads")]
    return [p for p in found if all(value(p, f) & vals for f, vals in want.items())]


def checked_payload(p, where: str) -> dict:
    """A saved head's description, refused (naming the field) unless every field a loader reads has its type and
    a bounded size."""
    if not isinstance(p, dict):
        raise bad(where, "payload", f"must be a mapping, got {shown(p, 40)}")
    name = p.get("result")
    try:
        where = f"{where}/{check_name('result', name)}"
    except DiffstoreError:
        raise bad(where, "payload.result", f"must be a result name, got {shown(name, 40)}") from None
    if p.get("estimator") not in LOADERS:
        raise bad(where, "payload.estimator",
                  f"must be one of {', '.join(LOADERS)}, got {shown(p.get('estimator'), 40)}")
    kinds = {"head": dict, "recipe": dict, "chosen": dict, "head_label": str, "dataset": str, "model": str,
             "keys": list, "fingerprints": list, "row_shape": list, "class_names": list}
    for field, kind in kinds.items():
        if not isinstance(p.get(field), kind):
            raise bad(where, f"payload.{field}", f"must be a {kind.__name__}, got {shown(p.get(field), 40)}")
    if p["head"].get("kind") not in KINDS:
        raise bad(where, "payload.head.kind",
                  f"must be one of {', '.join(KINDS)}, got {shown(p['head'].get('kind'), 40)}")
    if len(p["row_shape"]) != 3:
        raise bad(where, "payload.row_shape", f"must be 3 sizes [C, H, W], got {shown(p['row_shape'], 40)}")
    for i, size in enumerate(p["row_shape"]):
        positive_int(size, where, f"payload.row_shape[{i}]", 1 << 24)
    names = p["class_names"]
    if not 2 <= len(names) <= 1 << 20 or not all(isinstance(c, str) for c in names):
        raise bad(where, "payload.class_names", f"must be 2 or more class names, got {shown(names, 40)}")
    return p


def load_head(store: Store, name: str | None = None, **selector):
    """A saved head, by name or as the one head matching a selector (find_heads), as a fitted estimator."""
    found = [p for p in find_heads(store, **selector) if name is None or p["result"] == name]
    asked = ", ".join([*([name] if name else []), *(f"{f}={v}" for f, v in selector.items())]) or "(no selector)"
    if not found:
        raise DiffstoreError(f"no saved head in {store.url} matches {asked}: `diffstore probe --save-heads` stores "
                             "them; store.heads() lists them")
    if len(found) > 1:
        differ = {f: sorted({str(p.get(f)) for p in found})
                  for f in ("dataset", "model", "t", "block", "pool", "head_label")}
        choices = "; ".join(f"{f}: {', '.join(v)}" for f, v in differ.items() if len(v) > 1) or \
            "names: " + ", ".join(p["result"] for p in found)
        raise DiffstoreError(f"{len(found)} saved heads in {store.url} match {asked}; pick one ({choices})")
    payload = found[0]
    where = f"{store.url.rstrip('/')}/results/heads/{payload['result']}"
    try:
        spec = HeadSpec.from_dict(payload["head"])
        estimator = LOADERS[payload["estimator"]](store, payload, spec, payload["recipe"])
    except (KeyError, TypeError, ValueError, IndexError) as e:  # a field of the wrong form deeper in the description
        raise bad(where, "payload", f"cannot describe a head ({type(e).__name__}: {shown(str(e), 80)})") from None
    n_classes = len(payload["class_names"])
    estimator.classes_, estimator.class_names_ = np.arange(n_classes), payload["class_names"]
    estimator.row_shape_, estimator.n_features_in_ = tuple(payload["row_shape"]), int(np.prod(payload["row_shape"]))
    estimator.saved_ = payload
    return estimator


def linear(store: Store, payload: dict, spec: HeadSpec, recipe: dict):
    """The folded linear head: its four arrays, of the sizes its row shape, pool and classes give."""
    from .estimators import LinearProbe

    width = flat(torch.zeros(1, *payload["row_shape"], device="meta"), spec.pool).shape[1]
    n_classes = len(payload["class_names"])
    shapes = {"mean": (width,), "std": (width,), "coef": (width, n_classes), "bias": (n_classes,)}
    est = LinearProbe(Cs=tuple(recipe["Cs"]), val_frac=recipe["val_frac"], seed=recipe["seed"], tol=recipe["tol"],
                      max_iter=recipe["max_iter"], refit=recipe.get("refit", False), pool=spec.pool)
    est._set_weights(store.result_arrays("heads", payload["result"], shapes))
    est.C_ = payload["chosen"]["C"]
    return est


def nearest(store: Store, payload: dict, spec: HeadSpec, recipe: dict):
    """The kNN head with its bank read from the train array(s) it names, refused if they changed since."""
    from .estimators import KNNProbe

    limit = recipe["limit"]
    parts = []
    for key, fingerprint in zip(payload["keys"], payload["fingerprints"][::2]):  # (train, test) per key
        array = store.features(FeatureKey(**key))
        if array.attrs.get("fingerprint") != fingerprint:
            raise DiffstoreError(f"the kNN head {payload['result']} was fitted on {array.path} as it was then; that "
                                 "array has changed since. Run `diffstore probe --head knn --save-heads` again")
        parts.append(first_rows(Rows.of(array.require_done(limit)), limit))
    if not parts:
        raise KeyError("keys")
    labels = first_labels(store.split(payload["dataset"], payload["keys"][0]["split"]), limit).labels
    bank = np.arange(len(labels)) if payload["bank"] == "train" else \
        split_val(len(labels), recipe["val_frac"], recipe["seed"])[0]
    est = KNNProbe(ks=tuple(recipe["ks"]), temperature=recipe["temperature"], val_frac=recipe["val_frac"],
                   seed=recipe["seed"], refit=recipe["refit"], pool=spec.pool)
    est._set_bank(parts[0] if len(parts) == 1 else fuse_rows(parts), labels, bank, int(payload["chosen"]["k"]))
    return est


def trained(store: Store, payload: dict, spec: HeadSpec, recipe: dict):
    """An iterative head: built from its spec on the meta device, its weights read only when their names and
    shapes are the built head's, then loaded strictly."""
    from .estimators import HeadProbe

    fields = ("steps", "lrs", "weight_decays", "epochs", "lr", "weight_decay", "batch_size", "val_frac", "seed")
    given = {f: tuple(recipe[f]) if isinstance(recipe[f], list) else recipe[f] for f in fields if f in recipe}
    est = HeadProbe(kind=spec.kind, pool=spec.pool, batchnorm=spec.batchnorm, hidden=spec.hidden,
                    channels=spec.channels, dim=spec.dim, depth=spec.depth, n_heads=spec.n_heads, recipe=recipe["name"],
                    **given)
    row_shape, n_classes = tuple(payload["row_shape"]), len(payload["class_names"])
    with torch.device("meta"):
        module = build_head(spec, row_shape, n_classes, torch.zeros(row_shape[0]), torch.ones(row_shape[0]))
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    arrays = store.result_arrays("heads", payload["result"], shapes)
    module = module.to_empty(device="cpu")
    module.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()})
    est._set_module(module)
    return est


LOADERS = {"LinearProbe": linear, "KNNProbe": nearest, "HeadProbe": trained}
