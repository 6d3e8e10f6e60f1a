"""A store a team grows together: a split is its whole order and runs fill row ranges of it; a split an older
version stored as a prefix grows in place; --dry-run writes nothing; a re-run with nothing to do loads no torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import digests, tree_state
from diffstore.datasets import load_split
from diffstore.errors import DiffstoreError
from diffstore.extract import extract_features, plan_extraction
from diffstore.store import Store

ARGS = dict(t="10,50", blocks="2,mid", pools="1", shard_rows=16)  # 4 arrays of the digits test split (360 rows)


@pytest.fixture(scope="module")
def split():
    return load_split("digits", "test")


def fill(url, model, split, **kw) -> dict:
    plan = plan_extraction(Store.open(str(url)), model, split, **(ARGS | kw))
    return extract_features(plan, batch_size=32, show_progress=False)


@pytest.fixture(scope="module")
def whole(tmp_path_factory, model, split) -> dict:
    """One uninterrupted run over the whole split: what every way of filling it must equal."""
    url = tmp_path_factory.mktemp("whole") / "s.zarr"
    fill(url, model, split)
    return digests(Store.open(str(url), "r"))


def test_a_limit_run_then_a_full_run_computes_only_the_missing_shards(tmp_path, model, split, whole):
    url = tmp_path / "s.zarr"
    first = fill(url, model, split, limit="100")
    assert first["tasks_run"] == 2 * 7  # 2 t x the 7 shards of 16 rows holding rows 0-99
    a = Store.open(str(url), "r").arrays()[0]
    assert a.n_rows == 360 and a.done_rows() == 112 and a.done_prefix() == 112
    second = fill(url, model, split)
    assert second["tasks_run"] == 2 * (23 - 7)  # the rest of the 23 shards, nothing twice
    assert digests(Store.open(str(url), "r")) == whole


def test_two_processes_filling_row_halves_at_once_equal_one_run(tmp_path, tiny_unet_dir, whole):
    url = str(tmp_path / "s.zarr")
    common = ["extract", "--store", url, "--model", str(tiny_unet_dir), "--split", "test", "--t", "10,50",
              "--blocks", "2,mid", "--pools", "1", "--shard-rows", "16", "-q"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "diffstore.cli", *common, "--rows", rows], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rows in ("0:176", "176:360")]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    assert digests(Store.open(url, "r")) == whole


def test_a_split_an_older_version_stored_as_a_prefix_grows_in_place(tmp_path, model, split, whole):
    url = tmp_path / "s.zarr"
    fill(url, model, split.head(100))  # what --limit 100 wrote before: 100 ids, 100-row arrays, limit in the key
    old = Store.open(str(url), "r")
    assert old.arrays()[0].n_rows == 100 and old.arrays()[0].attrs["dataset"]["source"]["limit"] == 100
    summary = fill(url, model, split)
    assert summary["tasks_run"] == 2 * (23 - 6)  # the 6 whole old shards are kept; the partial 7th is redone
    grown = Store.open(str(url), "r")
    assert grown.split("digits", "test").ids.tolist() == split.ids.tolist()
    assert digests(grown) == whole  # values and fingerprints as if it had been extracted whole


def test_a_split_holding_other_ids_is_still_refused(tmp_path, model, split):
    url = tmp_path / "s.zarr"
    fill(url, model, split.take(split.ids[10:60]))
    before = tree_state(url)
    with pytest.raises(DiffstoreError, match="other sample ids"):
        fill(url, model, split)
    assert tree_state(url) == before


@pytest.mark.parametrize("kw, match", [
    (dict(limit="361"), r"holds 360 rows; rows \[0, 361\) reach past its end"),
    (dict(rows="100:50"), "A:B of rows with A < B"),
    (dict(rows="0:400"), "reach past its end"),
    (dict(limit="train=10,train=20"), "each split at most once"),
    (dict(limit="10", rows="0:10"), "pass one of them"),
    (dict(limit="ten"), "number of rows"),
])
def test_bad_row_ranges_are_refused_before_anything_is_written(tmp_path, model, split, kw, match):
    with pytest.raises(DiffstoreError, match=match):
        fill(tmp_path / "s.zarr", model, split, **kw)
    assert not (tmp_path / "s.zarr").exists()


def test_dry_run_writes_nothing_and_counts_what_a_run_would_do(tmp_path, model, split):
    from diffstore.extract.estimate import dry_run

    url = tmp_path / "s.zarr"
    fill(url, model, split, limit="100")
    before, stored_before = tree_state(url), sum(a.nbytes_stored() for a in Store.open(str(url), "r").arrays())
    plan = plan_extraction(Store.open(str(url)), model, split, **{**ARGS, "t": "10,50,90"}, dry_run=True)
    report = dry_run(plan)
    assert tree_state(url) == before
    assert report["to_create"] == 2 and report["tasks"] == 2 * 16 + 23  # t=10, 50 resume; t=90 is new
    assert {r["status"] for r in report["arrays"]} == {"create", "resume"} and report["seconds"] > 0
    fill(url, model, split, t="10,50,90")
    written = sum(a.nbytes_stored() for a in Store.open(str(url), "r").arrays()) - stored_before
    assert 0.5 < report["bytes"] / written < 1.5  # raw bytes x the codec's ratio (bench_team measures it closely)


def test_a_rerun_with_nothing_to_do_answers_without_torch(tmp_path, tiny_unet_dir):
    url = str(tmp_path / "s.zarr")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "DIFFSTORE_CACHE": str(tmp_path)}
    args = ["extract", "--store", url, "--model", str(tiny_unet_dir), "--split", "test", "--t", "10",
            "--blocks", "mid", "--pools", "1", "--limit", "32", "-q", "--json"]
    code = ("import sys, json\nfrom diffstore.cli import main\nsys.argv = ['diffstore', *json.loads(sys.argv[1])]\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)\n")
    import json

    def run(*more, whole=False):
        done = subprocess.run([sys.executable, "-c", code, json.dumps(args + list(more))], env=env,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        rows = json.loads(done.stdout)
        return rows if whole else rows[0]["status"], done.stderr.strip().splitlines()[-1]

    assert run() == ("extracted", "TORCH")
    assert run() == ("already stored", "NO-TORCH")
    quick, how = run("--dry-run", whole=True)  # --dry-run too: the same answer as the full path's, without torch
    assert how == "NO-TORCH" and quick[0]["tasks"] == 0 and quick[0]["bytes"] == 0
    weights = next(Path(tiny_unet_dir).glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))  # "changed": check again
    assert run("--dry-run", whole=True) == (quick, "TORCH")  # the full path, which remembers the new identity
    assert run() == ("already stored", "NO-TORCH")
