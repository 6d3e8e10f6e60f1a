"""`make cka-networks`: CKA of a diffusion model's blocks against a classifier's (the seed paper's Fig. 6, bottom).

Extracts, on one dataset split (digits test by default), every block of the diffusion model at one t and every
block of a comparison network brought in through a py: plugin (examples/plugins: ResNet-50's stem + 16
bottlenecks, or a ViT's 12 layers), then computes the cross-model matrix (diffusion blocks x network blocks) with
the unbiased linear CKA estimator (`diffstore cka --a ... --b ...`) and draws it.

Without --weights the network has seeded RANDOM weights at a small input size (64 px): it runs offline on a CPU,
and it is a control (what architecture alone gives), not the paper's supervised ResNet-50; the figure's title says
so. With --weights FILE (a torchvision resnet50 / timm vit state_dict) it is the trained network, at 224 px.

    python pipelines/cka_networks.py [--store data/default.zarr] [--out data/cka-networks] [--network resnet50]
        [--weights resnet50-11ad3fa6.pth] [--image-size 224] [--t 50] [--pool 1]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import diffstore as ds
from diffstore.cka.options import CKAOptions
from diffstore.cka.report import draw
from diffstore.cka.stage import compute
from diffstore.errors import DiffstoreError
from diffstore.store import Store

PLUGINS = Path(__file__).resolve().parents[1] / "examples" / "plugins"
# --network -> (plugin factory, the environment variables it reads for its weights and image size)
NETWORKS = {
    "resnet50": ("resnet50.py:factory", "DIFFSTORE_RESNET50"),
    "vit_base": ("vit.py:base", "DIFFSTORE_VIT"),
    "vit_small": ("vit.py:small", "DIFFSTORE_VIT"),
}


@contextlib.contextmanager
def environment(settings: dict):
    """os.environ with `settings` while the plugin loads (it reads its weights and size from there), then as before."""
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def keyset(store: Store, model: str, dataset: str, split: str, t: int, pool: str) -> str:
    """Every stored block of one (model, t, pool) as a --a/--b key set, in block order."""
    blocks = sorted(k.block for k in store.feature_keys() if (k.model, k.dataset, k.split, k.t, k.pool, k.input)
                    == (model, dataset, split, t, pool, "noised"))
    return ",".join(f"model={model}/t={t}/b={b}/p={pool}" for b in blocks)


def network_note(args, name: str) -> str:
    """The line of the title that says which weights the comparison network has."""
    if args.weights is None:
        return f"{args.network}: RANDOM weights (seed {args.random_init}), a control, not the paper's trained network"
    sha = hashlib.sha256(Path(args.weights).expanduser().read_bytes()).hexdigest()[:8]
    return f"{args.network}: weights {Path(args.weights).name} (sha256 {sha}), {args.image_size} px"


def run(args) -> dict:
    started = time.perf_counter()
    if args.weights and not Path(args.weights).expanduser().is_file():  # before anything is extracted
        raise DiffstoreError(f"--weights {args.weights}: no such file (a local torchvision/timm state_dict)")
    args.image_size = args.image_size or (224 if args.weights else 64)
    factory, env = NETWORKS[args.network]
    # A py: plugin is given its settings through the environment (see the plugin's docstring).
    settings = {f"{env}_SIZE": str(args.image_size)}
    if args.weights:
        settings[f"{env}_WEIGHTS"] = str(Path(args.weights).expanduser().resolve())
    data = dict(dataset=args.dataset, split=args.split, limit=args.limit, blocks="all", pools=str(args.pool),
                show_progress=not args.quiet)
    seconds = {}
    diffusion = ds.extract(args.store, model=args.model, t=str(args.t), **data)[0]
    seconds["extract diffusion"] = time.perf_counter() - started
    with environment(settings):
        network = ds.extract(args.store, model=f"py:{PLUGINS / factory}", t="0", **data,
                             random_init=None if args.weights else args.random_init,
                             model_name=args.name or f"{args.network}-{args.image_size}px")[0]
    seconds["extract network"] = time.perf_counter() - started - sum(seconds.values())
    store = Store.open(args.store, mode="r")
    a = keyset(store, diffusion["model"], args.dataset, args.split, args.t, str(args.pool))
    b = keyset(store, network["model"], args.dataset, args.split, 0, str(args.pool))
    payload = compute(CKAOptions.build(store=args.store, a=a, b=b, dataset=args.dataset, split=args.split,
                                       method=args.method, limit=args.limit,  # the rows extracted: [0, limit)
                                       show_progress=not args.quiet))
    seconds["cka"] = time.perf_counter() - started - sum(seconds.values())
    payload["title"] = (f"{diffusion['model']} blocks at t={args.t} vs {network['model']} blocks, "
                        f"{args.dataset} {args.split}, pool {args.pool}\n{network_note(args, network['model'])}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{diffusion['model']}-t{args.t}_vs_{network['model']}_{args.dataset}-{args.split}_p{args.pool}"
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    png = draw(payload, out / stem)[0]
    seconds["total"] = time.perf_counter() - started
    return {"png": str(png), "json": str(out / f"{stem}.json"), "shape": [len(payload["rows"]), len(payload["cols"])],
            "n": payload["n"], "method": payload["method"], "seconds": {k: round(v, 1) for k, v in seconds.items()}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="data/default.zarr", help="store path or URL (features are added to it)")
    ap.add_argument("--out", default="data/cka-networks", help="folder for the JSON matrix and the PNG heatmap")
    ap.add_argument("--model", default="default", help="the diffusion model (any --model spec of diffstore extract)")
    ap.add_argument("--network", default="resnet50", choices=sorted(NETWORKS), help="comparison network (a plugin)")
    ap.add_argument("--weights", "--resnet-weights", default=None,
                    help="the network's local weight file (torchvision/timm state_dict); default: random weights")
    ap.add_argument("--random-init", type=int, default=0, help="seed of the random weights (without --weights)")
    ap.add_argument("--image-size", type=int, default=None,
                    help="network input size (default: 224 with --weights, else 64)")
    ap.add_argument("--name", default=None, help="model name of the network in the store (default NETWORK-SIZEpx)")
    ap.add_argument("--dataset", default="digits", help="dataset (diffstore extract --dataset)")
    ap.add_argument("--split", default="test", help="split both models are extracted and compared on")
    ap.add_argument("--limit", type=int, default=None,
                    help="only the first N samples of the split (a quick look; as `diffstore extract --limit`)")
    ap.add_argument("--t", type=int, default=50, help="noise step of the diffusion features")
    ap.add_argument("--pool", default="1", help="pool of both models' features (1: global average; 2: 2x2 grid)")
    ap.add_argument("--method", default="unbiased", choices=("unbiased", "exact", "minibatch", "auto"),
                    help="CKA estimator (see `diffstore cka --help`)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    try:
        result = run(args)
    except DiffstoreError as e:
        sys.exit(f"error: {e}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
