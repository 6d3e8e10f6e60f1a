"""Two ImageFolder datasets cut from the CIFAR-10 JPEG archive: the stand-in `make transfer` measures on.

    python pipelines/cifar_folders.py --archive ../shared/datasets/cifar10-jpg.tar.gz --out data/transfer-data \\
        [--train-per-class 75] [--test-per-class 50]

Writes OUT/vehicles/{train,test}/<class>/*.jpg (airplane, automobile, ship, truck) and OUT/animals/... (bird, cat,
deer, dog, frog, horse): per class the first N files of each split in the archive's order, copied byte for byte. The
two class sets are disjoint, as two fine-grained datasets are. Prints what it wrote as JSON.
"""

from __future__ import annotations

import argparse
import json
import tarfile
from pathlib import Path

GROUPS = {"vehicles": ("airplane", "automobile", "ship", "truck"),
          "animals": ("bird", "cat", "deer", "dog", "frog", "horse")}


def cut(archive: Path, out: Path, per_class: dict[str, int]) -> dict:
    """Copy the first per_class[split] JPEGs (archive order) of every class of each split into
    OUT/<group>/<split>/<class>/."""
    group_of = {c: g for g, classes in GROUPS.items() for c in classes}
    taken: dict[tuple, int] = {}
    with tarfile.open(archive, "r|gz") as tar:  # one streaming pass, in the archive's order
        for m in tar:
            parts = Path(m.name).parts
            if not m.isfile() or len(parts) != 3:
                continue
            split, cls, file = parts
            if cls not in group_of or split not in per_class or taken.get((split, cls), 0) >= per_class[split]:
                continue
            dst = out / group_of[cls] / split / cls / file
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(tar.extractfile(m).read())
            taken[(split, cls)] = taken.get((split, cls), 0) + 1
    return {g: {s: sum(taken.get((s, c), 0) for c in classes) for s in per_class} for g, classes in GROUPS.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archive", default="../shared/datasets/cifar10-jpg.tar.gz")
    ap.add_argument("--out", default="data/transfer-data")
    ap.add_argument("--train-per-class", type=int, default=75)
    ap.add_argument("--test-per-class", type=int, default=50)
    args = ap.parse_args(argv)
    out = Path(args.out)
    if any(out.glob("*/*/*/*")):
        raise SystemExit(f"{out} already holds images; remove it or pass another --out")
    counts = cut(Path(args.archive), out, {"train": args.train_per_class, "test": args.test_per_class})
    print(json.dumps({"out": str(out), "images": counts, "classes": GROUPS}))
    return counts


if __name__ == "__main__":
    main()
