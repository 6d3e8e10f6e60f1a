"""`diffstore copy`, `ls` selectors, `du` and provenance: a store a team grows together (issue 22)."""

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import zarr
from typer.testing import CliRunner

from conftest import subset, tree_state
from diffstore.cli import app, main
from diffstore.datasets import load_split
from diffstore.errors import DiffstoreError
from diffstore.extract import extract_features, plan_extraction
from diffstore.models import load_model
from diffstore.store import Store
from diffstore.store.copy import copy
from diffstore.store.provenance import command_line, redact
from diffstore.store.verify import verify_findings
from faults import SHARD_LEVEL, deleted_shard

KEYS = dict(ts="10,300", blocks="2", pools="1,full")  # 2 t x 1 block x 2 pools = 4 arrays per split


def fill(url, model, split, noise_seed: int = 0, ts: str = KEYS["ts"]) -> dict:
    plan = plan_extraction(Store.open(url), model, split, t=ts, blocks=KEYS["blocks"], pools=KEYS["pools"],
                           shard_rows=16, noise_seed=noise_seed)
    return extract_features(plan, batch_size=16, show_progress=False)


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def run(monkeypatch, capsys, *args) -> tuple[int, str]:
    """(exit code, stdout + stderr) of `diffstore ARGS` through its entry point (a DiffstoreError exits 2)."""
    capsys.readouterr()
    monkeypatch.setattr("sys.argv", ["diffstore", *map(str, args)])
    with pytest.raises(SystemExit) as exit_:
        main()
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return exit_.value.code, out + " ".join(err.split())  # rich wraps long lines


def objects(root: Path) -> dict:
    """Store object -> sha256 of its bytes (a killed local write's *.partial temp files are not objects)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.endswith(".partial")}


@pytest.fixture(scope="module")
def src(model, tmp_path_factory) -> Path:
    """A store with digits train (48 rows) and test (40 rows) at 4 keys, shards of 16 rows (3 per array), a probe
    result and a CKA result computed from it."""
    url = tmp_path_factory.mktemp("copy") / "src.zarr"
    for name, n in (("train", 48), ("test", 40)):
        fill(str(url), model, subset(load_split("digits", name), n))
    invoke("probe", "--store", url, "--t", "10", "--blocks", "2", "--pools", "1", "--json")
    invoke("cka", "--store", url, "--by", "t", "--block", "2", "--pool", "1", "--split", "test", "--json", "-q")
    return url


def src_copy(src: Path, tmp_path: Path) -> Path:
    shutil.copytree(src, tmp_path / "src.zarr")
    return tmp_path / "src.zarr"


def test_copy_local_to_local_is_bit_identical_and_a_rerun_moves_nothing(src, tmp_path):
    rows = copy(str(src), str(tmp_path / "dst.zarr"), show_progress=False)
    assert objects(tmp_path / "dst.zarr") == objects(src)
    assert sum(r["shards"] for r in rows) == 8 * 3
    assert sum(r["bytes"] for r in rows) == sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    again = copy(str(src), str(tmp_path / "dst.zarr"), show_progress=False)
    assert sum(r["bytes"] for r in again) == 0
    assert {r["action"] for r in again if "features" in r["what"]} == {"up to date"}
    assert {r["action"] for r in again if r["what"].startswith("results/")} == {"DST has it (kept as it is)"}
    assert verify_findings(Store.open(str(tmp_path / "dst.zarr"), "r")) == ([], 8)


def test_copy_to_s3_and_back_is_bit_identical(src, s3_env, tmp_path):
    up = invoke("copy", src, "s3://team/copied.zarr", "-q", "--json")
    assert sum(r["shards"] for r in json.loads(up.stdout)) == 24
    assert len(json.loads(invoke("ls", "--store", "s3://team/copied.zarr", "--json").stdout)) == 8
    invoke("copy", "s3://team/copied.zarr", tmp_path / "back.zarr", "-q")
    assert objects(tmp_path / "back.zarr") == objects(src)


def test_only_the_done_shards_dst_lacks_move(src, tmp_path):
    dst = tmp_path / "dst.zarr"
    first = copy(str(src), str(dst), ["t=10"], show_progress=False)  # a subset, as an interrupted copy leaves
    assert sum(r["shards"] for r in first) == 4 * 3
    array = "features/digits/test/tiny-unet/noised/t300/b2/p1"
    assert Store.open(str(dst), "r").split("digits", "test").ids.size == 40
    rest = copy(str(src), str(dst), show_progress=False)
    assert sum(r["shards"] for r in rest) == 4 * 3  # the t=300 arrays only
    deleted_shard(dst, array, 1)
    (dst / array / "done" / "c" / "1").unlink()  # DST lacks one shard
    listed = {r["path"]: r for r in json.loads(invoke("ls", "--store", dst, "--json").stdout)}
    assert (listed[array]["rows_done"], listed[array]["shards_done"]) == (40 - 16, 2)
    one = copy(str(src), str(dst), show_progress=False)
    assert [(r["what"], r["shards"]) for r in one if r["shards"]] == [(array, 1)]
    assert objects(dst) == objects(src)


@pytest.mark.parametrize("stop_after", [1, 3, 7, 12, 20, 40, 70])
def test_stopped_after_any_write_a_rerun_finishes_bit_identical(src, tmp_path, monkeypatch, stop_after):
    """The copy dies after `stop_after` object writes (every write is whole, so this is kill -9 between writes,
    in-flight writes cancelled); a re-run completes DST with the same bytes as SRC."""
    real, calls = zarr.storage.LocalStore.set, []

    async def dying(self, key, value):
        if str(self.root).endswith("dst.zarr"):
            calls.append(key)
            if len(calls) > stop_after:
                raise OSError("killed")
        return await real(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", dying)
    with pytest.raises(OSError):
        copy(str(src), str(tmp_path / "dst.zarr"), show_progress=False, workers=4)
    monkeypatch.setattr(zarr.storage.LocalStore, "set", real)
    copy(str(src), str(tmp_path / "dst.zarr"), show_progress=False)
    assert objects(tmp_path / "dst.zarr") == objects(src)


def test_a_conflicting_fingerprint_is_refused_listing_what_differs_and_both_stores_stay(src, model, tmp_path,
                                                                                        monkeypatch, capsys):
    dst = tmp_path / "dst.zarr"
    fill(str(dst), model, subset(load_split("digits", "test"), 40), noise_seed=1)
    before = (tree_state(src), tree_state(dst))
    code, out = run(monkeypatch, capsys, "copy", src, dst, "-q")
    assert code == 2 and out.count("noise_seed: stored 1, requested 0") == 4 and "nothing was written" in out, out
    assert (tree_state(src), tree_state(dst)) == before


@pytest.mark.parametrize("fault", SHARD_LEVEL[:3], ids=lambda f: f.__name__)
def test_a_corrupt_src_is_refused_naming_repair_before_any_write(src, tmp_path, fault, monkeypatch, capsys):
    broken = src_copy(src, tmp_path)
    fault(broken, "features/digits/train/tiny-unet/noised/t10/b2/pfull", 1)
    before = tree_state(broken)
    code, out = run(monkeypatch, capsys, "copy", broken, tmp_path / "dst.zarr", "-q")
    assert code == 2 and "diffstore repair --store" in out and "shard 1" in out, out
    assert not (tmp_path / "dst.zarr").exists() and tree_state(broken) == before


def test_results_naming_the_copied_arrays_come_along(src, tmp_path):
    kinds = lambda url: sorted(p.split("/")[1] for p in Store.open(str(url), "r").result_paths())  # noqa: E731
    assert kinds(src) == ["cka", "probe"]
    copy(str(src), str(tmp_path / "a.zarr"), ["t=10/split=test"], show_progress=False)
    assert kinds(tmp_path / "a.zarr") == ["cka", "probe"]  # the probe used train and test, the CKA t=10 and 300
    copy(str(src), str(tmp_path / "b.zarr"), ["t=300/pool=full"], show_progress=False)
    assert not (tmp_path / "b.zarr" / "results").exists()


def test_dry_run_lists_the_bytes_and_writes_nothing(src, tmp_path):
    out = invoke("copy", src, tmp_path / "dst.zarr", "t=10", "--dry-run", "--json")
    assert out.exit_code == 0 and not (tmp_path / "dst.zarr").exists()
    planned = json.loads(out.stdout)
    done = copy(str(src), str(tmp_path / "dst.zarr"), ["t=10"], show_progress=False)
    assert planned == done and sum(r["bytes"] for r in planned) > 0


def test_a_selector_matching_nothing_and_a_split_prefix_are_refused(src, model, tmp_path, monkeypatch, capsys):
    code, out = run(monkeypatch, capsys, "copy", src, tmp_path / "dst.zarr", "t=999")
    assert code == 2 and "matches 't=999'" in out and not (tmp_path / "dst.zarr").exists()
    fill(str(tmp_path / "small.zarr"), model, subset(load_split("digits", "test"), 24), ts="50")
    before = tree_state(tmp_path / "small.zarr")
    code, out = run(monkeypatch, capsys, "copy", src, tmp_path / "small.zarr", "split=test")
    assert code == 2 and "DST's 24 sample ids are a prefix of SRC's 40" in out and "datasets/digits/test" in out, out
    assert tree_state(tmp_path / "small.zarr") == before


def test_unsafe_names_in_src_are_refused(src, tmp_path):
    from diffstore.store.copy import check_key

    for key in ("features/../../etc/x", "/abs/zarr.json", "features/a\x1b[31m/zarr.json", "features//x"):
        with pytest.raises(DiffstoreError, match="not a safe store path"):
            check_key(key)


def test_ls_takes_info_selectors_and_shows_rows_done(src, monkeypatch, capsys):
    rows = json.loads(invoke("ls", "t=10/split=test", "--store", src, "--json").stdout)
    assert [(r["t"], r["split"]) for r in rows] == [(10, "test")] * 2
    assert all(r["rows_done"] == r["rows"] == 40 for r in rows)
    both = json.loads(invoke("ls", "pool=full", "model=tiny-unet/t=300", "--store", src, "--json").stdout)
    assert len(both) == 4 + 4 - 2  # the union: 4 at pool=full, 4 at t=300, 2 of them both
    code, out = run(monkeypatch, capsys, "ls", "model=nobody", "--store", src)
    assert code == 2 and "matches 'model=nobody'" in out


def test_du_sums_equal_the_arrays_bytes(src):
    rows = json.loads(invoke("du", "--store", src, "--json").stdout)
    assert [(r["dataset"], r["split"], r["model"], r["arrays"]) for r in rows] == \
        [("digits", "test", "tiny-unet", 4), ("digits", "train", "tiny-unet", 4)]
    listed = json.loads(invoke("ls", "--store", src, "--json").stdout)
    on_disk = sum(f.stat().st_size for r in listed for f in (src / r["path"]).rglob("*") if f.is_file())
    assert sum(r["bytes"] for r in rows) == sum(r["bytes"] for r in listed) == on_disk
    by_t = json.loads(invoke("du", "--store", src, "--by", "t", "--json").stdout)
    assert [r["t"] for r in by_t] == [10, 300] and sum(r["bytes"] for r in by_t) == on_disk


def test_provenance_is_recorded_with_secrets_redacted(model, tiny_unet_dir, tmp_path, monkeypatch):
    argv = ["/venv/bin/diffstore", "extract", "--store", "s3://AKIAEXAMPLE:s3cr3tXYZ@team/f.zarr",
            "--storage-options", '{"key": "AKIAEXAMPLE", "secret": "s3cr3tXYZ", "client_kwargs": {"region": "x"}}',
            "--data-root", "https://host/data?X-Amz-Signature=s3cr3tXYZ&x=1"]
    monkeypatch.setattr("sys.argv", argv)
    fill(str(tmp_path / "p.zarr"), model, subset(load_split("digits", "test"), 40), ts="10")
    info = json.loads(invoke("info", "t=10/p=1", "--store", tmp_path / "p.zarr", "--json").stdout)[0]
    prov = info["provenance"]
    assert "s3cr3tXYZ" not in json.dumps(info) and "AKIAEXAMPLE" not in prov["command"]
    assert prov["command"].startswith("diffstore extract --store 's3://***@team/f.zarr'")
    assert '"region": "x"' in prov["command"] and "X-Amz-Signature=***" in prov["command"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True)
    assert prov["git_commit"] == head.stdout.strip()
    assert {"torch", "diffusers", "zarr"} <= set(prov["packages"]) and prov["diffstore"]
    assert prov["device"].startswith(("cpu: ", "cuda: ")) and prov["host"] and prov["user"]
    assert prov["started"] <= prov["time"] <= prov["finished"]  # the last shard written by this process
    assert info["model"]["source"]["given"] == str(tiny_unet_dir)  # the spec as passed (here a folder)
    shipped = load_model("default").source
    assert shipped["given"] == "default" and Path(shipped["folder"]).is_absolute()


def test_results_record_provenance_and_probe_list_prints_it(src):
    listed = json.loads(invoke("probe", "--store", src, "--list", "--json").stdout)["results"]
    assert listed and all(r["provenance"]["finished"] and r["provenance"]["command"] for r in listed)
    assert "linear" in invoke("probe", "--store", src, "--list").stdout  # the table ignores the record


def test_redact_and_command_line():
    assert redact("cannot open s3://KEY:SECRET@bucket/x") == "cannot open s3://***@bucket/x"
    assert redact("https://u@host/p?sig=abc&token=def&n=1") == "https://***@host/p?sig=***&token=***&n=1"
    line = command_line(["x/diffstore", "copy", "--storage-options={\"secret\": \"s\", \"anon\": false}", "a b"])
    assert line == "diffstore copy '--storage-options={\"anon\": false, \"secret\": \"***\"}' 'a b'"
    assert command_line(["diffstore", "--storage-options", "not json"]) == "diffstore --storage-options '***'"
    assert re.fullmatch(r"[0-9a-f]{40}", command_line.__globals__["git_commit"]() or "0" * 40)
