"""The transfer protocol (pipelines/transfer.py) end to end on two tiny ImageFolder datasets built here, checked
against independent computations; mean-per-class accuracy (intervals.mean_per_class) against scikit-learn; several
ImageFolder datasets kept apart in one store (extract --dataset-name)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import balanced_accuracy_score

import diffstore as ds
from diffstore.datasets import load_split
from diffstore.errors import DiffstoreError
from diffstore.probe.intervals import bootstrap_interval, difference, mean_per_class, result_hits
from diffstore.store import Store

PIPELINE = Path(__file__).resolve().parents[1] / "pipelines" / "transfer.py"
TRAIN, TEST = (12, 18, 24), (4, 10, 6)  # images per class (the first classes'), unbalanced as fine-grained sets are


def load_pipeline():
    spec = importlib.util.spec_from_file_location("transfer_pipeline", PIPELINE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_folder(root: Path, draw: dict, seed: int) -> Path:
    """root/{train,test}/<class>/NNN.png: 24x24 grey images, each class drawn by its own function of an rng, under
    enough pixel noise that the keys' accuracies differ."""
    rng = np.random.default_rng(seed)
    for split, counts in (("train", TRAIN), ("test", TEST)):
        for (name, image), n in zip(draw.items(), counts):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(image(rng) + rng.normal(0, 70, (24, 24)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i:03d}.png")
    return root


def level(v: float):
    return lambda rng: np.full((24, 24), v + rng.normal(0, 15))


def ramp(axis: int):
    grad = np.linspace(90, 170, 24)
    return lambda rng: np.broadcast_to(grad[:, None] if axis == 0 else grad, (24, 24)) + rng.normal(0, 15)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two datasets with disjoint classes: brightness levels, and ramp directions."""
    root = tmp_path_factory.mktemp("transfer-data")
    levels = {f"level{v}": level(v) for v in (100, 128, 156)}
    ramps = {"down": ramp(0), "right": ramp(1)}
    return {"levels": write_folder(root / "levels", levels, 0), "ramps": write_folder(root / "ramps", ramps, 1)}


@pytest.fixture(scope="module")
def run(folders, tiny_unet_dir, resnet_spec, tmp_path_factory):
    out = tmp_path_factory.mktemp("transfer-out")
    argv = ["--datasets", ",".join(f"{n}={p}" for n, p in folders.items()), "--model", str(tiny_unet_dir),
            "--random-init", "1", "--compare", f"py:{resnet_spec}", "--compare-random-init", "0", "--out", str(out),
            "--t", "10,100", "--blocks", "5,8", "--pools", "1,2", "--steps", "30", "--lrs", "0.003",
            "--weight-decays", "0", "--quiet"]
    report = load_pipeline().main(argv)
    return report, out


def test_mean_per_class_is_balanced_accuracy_with_a_stratified_interval():
    rng = np.random.default_rng(0)
    labels = rng.choice(4, 300, p=[0.55, 0.25, 0.15, 0.05])  # unbalanced, as fine-grained test sets can be
    pred = np.where(rng.random(300) < 0.3 + 0.15 * labels, labels, rng.integers(0, 4, 300))
    hits = (pred == labels).astype(float)
    got, ci = mean_per_class(hits, labels), bootstrap_interval(hits, labels=labels)
    assert got == pytest.approx(balanced_accuracy_score(labels, pred), abs=1e-12)
    assert ci[0] < got < ci[1]
    assert got != pytest.approx(np.mean(pred == labels), abs=0.02)  # not top-1 on these unbalanced labels
    # stratified: every draw keeps each class's size, so a class all right and a class all wrong give exactly 0.5
    assert bootstrap_interval(np.r_[np.ones(30), np.zeros(10)], labels=np.r_[np.zeros(30), np.ones(10)]) == [0.5, 0.5]
    # a difference of two results' hits: the difference of their values, with a paired interval
    other = (rng.random(300) < 0.5).astype(float)
    diff = difference(hits, other, labels)
    assert diff["diff"] == pytest.approx(got - mean_per_class(other, labels), abs=1e-12)


def test_the_protocol_end_to_end(run, folders):
    report, out = run
    store = Store.open(report["store"], "r")
    stored = store.results("probe")
    model, twin, compare = report["model"], report["twin"], report["compare"]
    assert twin == f"{model}.random-init-s1" and compare.endswith(".random-init-s0")
    for name, root in folders.items():
        # the folder's own labels (the loader, not the store) and the stored hits give sklearn's balanced accuracy
        labels = load_split("imagefolder", "test", str(root)).labels
        assert np.array_equal(store.split(name, "test").labels, labels)
        by_name = {r["name"]: r for r in stored}
        for row in [r for r in report["heads"] + report["sweep"] if r["dataset"] == name]:
            hits = result_hits(by_name[row["name"]])
            pred = np.where(hits, labels, (labels + 1) % len(set(labels)))  # a wrong class where the hit is 0
            assert row["mean_per_class"] == pytest.approx(balanced_accuracy_score(labels, pred), abs=1e-12)
            assert row["top1"] == pytest.approx(hits.mean())
            assert row["mean_per_class_ci95"][0] <= row["mean_per_class"] <= row["mean_per_class_ci95"][1]
        # the best key is the argmax of the stored validation top-1 over the sweep of this dataset and model
        sweep = [r for r in stored if (r["dataset"], r["model"], r["head"]["kind"]) == (name, model, "linear")
                 and r["pool"] != "full"]
        assert len(sweep) == 2 * 2 * 2  # t x blocks x pools
        best = max(r["val_top1"] for r in sweep)
        chosen = tuple(report["best_keys"][name])
        assert [r["val_top1"] for r in sweep if (r["t"], r["block"], r["pool"]) == chosen] == [best]
        # every head on the best key: mlp on it, cnn and attention on its full map; for the model and its twin
        heads = {(r["model"], r["head"], r["pool"]) for r in report["heads"] if r["dataset"] == name}
        for m in (model, twin):
            want = {(m, "linear", chosen[2]), (m, "mlp", chosen[2]), (m, "cnn", "full"), (m, "attention", "full")}
            assert want <= heads
    assert all(r["converged"] is not None for r in report["heads"])


def test_the_comparisons_are_paired_on_the_same_test_images(run):
    report, _ = run
    reference, keys = report["reference"], report["best_keys"]
    assert reference == "levels"
    rows = {(c["dataset"], c["what"].split(" ")[0]): c for c in report["comparisons"]}
    own = rows[("ramps", "own")]  # on ramps: its own best key vs the key that is best on levels
    assert [own["a"][f] for f in ("t", "block", "pool")] == keys["ramps"]
    assert [own["b"][f] for f in ("t", "block", "pool")] == keys["levels"]
    assert own["a"]["dataset"] == own["b"]["dataset"] == "ramps"
    for c in report["comparisons"]:
        assert c["top1"]["diff"] == pytest.approx(c["a"]["top1"] - c["b"]["top1"])
        assert c["mean_per_class"]["value"] == pytest.approx(c["a"]["mean_per_class"] - c["b"]["mean_per_class"])
        assert c["top1"]["ci95"][0] <= c["top1"]["diff"] <= c["top1"]["ci95"][1]
    kinds = {what for _, what in rows}
    assert kinds == {"own", "vs"} and len(report["comparisons"]) == 1 + 2 * 2  # + twin and network per dataset


def test_the_figure_and_the_report_are_written(run):
    report, out = run
    png = Image.open(report["figure"])
    assert png.format == "PNG" and png.size[0] > 800
    assert json.loads((out / "report.json").read_text())["best_keys"] == report["best_keys"]


def test_two_image_folders_live_apart_in_one_store(folders, tiny_unet_dir, tmp_path):
    url = str(tmp_path / "s.zarr")
    common = dict(model=str(tiny_unet_dir), dataset="imagefolder", t=10, blocks="5", pools="2", show_progress=False)
    ds.extract(url, data_root=str(folders["levels"]), **common)  # the default name: "imagefolder"
    with pytest.raises(DiffstoreError, match="refusing to mix"):
        ds.extract(url, data_root=str(folders["ramps"]), **common)
    rows = ds.extract(url, data_root=str(folders["ramps"]), dataset_name="ramps", **common)
    assert rows[0]["dataset"] == "ramps"
    store = Store.open(url, "r")
    assert store.split("ramps", "train").class_names == ["down", "right"]
    assert store.split("imagefolder", "train").class_names == ["level100", "level128", "level156"]
    array = store.features(next(k for k in store.feature_keys() if k.dataset == "ramps"))
    assert "--dataset imagefolder --dataset-name ramps" in array.extract_hint()
    # a renamed split is loaded again by its recorded loader: the pixel baseline reads the folder
    out = ds.probe(url, dataset="ramps", baseline="pixels", data_root=str(folders["ramps"]), show_progress=False)
    assert {r["kind"] for r in out.results} == {"store", "pixels"}
    for bad, why in (("a/b", "not allowed"), ("digits", "name of the digits dataset")):
        with pytest.raises(DiffstoreError, match=why):
            ds.extract(url, data_root=str(folders["ramps"]), dataset_name=bad, **common)
    assert sorted(Store.open(url, "r").child_groups("datasets")) == ["imagefolder", "ramps"]


def test_bad_dataset_lists_are_refused_before_anything_runs(tmp_path, capsys):
    pipeline = load_pipeline()
    for text, why in (("a", "NAME=DIR"), (f"a={tmp_path}", "no train or test folder"),
                      (f"a b={tmp_path}", "not allowed")):
        with pytest.raises(SystemExit) as e:
            pipeline.main(["--datasets", text, "--out", str(tmp_path / "out")])
        assert e.value.code == 2 and why in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "out").exists()
