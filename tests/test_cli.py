"""The command line's contract, through its real entry point (`diffstore = diffstore.cli:main`): results on
stdout, errors on stderr with exit code 2 and the store untouched, `verify` exits 1 naming the problem, `info`."""

import json
import re
import sys

import numpy as np
import pytest

from conftest import feature_array, tree_state
from diffstore.cli import main
from diffstore.key import FeatureKey, Recipe
from diffstore.store import Store

KEY = FeatureKey("digits", "test", "m", "noised", 90, 5, "2")
RECIPE = Recipe("mfp", "dfp", 0, 1, "float32", "float16")


def run(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `diffstore ARGS`."""
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["diffstore", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


@pytest.fixture
def store_dir(tmp_path):
    """A store with one complete array (3 shards of 16 rows over 40)."""
    rows = np.random.default_rng(0).normal(size=(40, 3, 2, 2))
    feature_array(Store.open(str(tmp_path / "s.zarr")), KEY, RECIPE, (3, 2, 2), 40, 16, rows=rows)
    return tmp_path / "s.zarr"


@pytest.mark.parametrize("args, message", [
    (["extract", "--blocks", "2,nope"], "unknown block"),
    (["extract", "--t", "1000"], r"t must be in \[0, 999\]"),
    (["extract", "--pools", "8"], "larger than block"),
    (["extract", "--shard-rows", "7", "--t", "20"], r"positive multiple of the micro-batch \(16\)"),
    (["extract", "--dataset", "nope"], "nope"),
    (["info", "t=77"], "no array .* matches 't=77'"),
    (["info", "time=90"], "time"),
])
def test_bad_input_exits_2_with_the_message_on_stderr_only(monkeypatch, capsys, store_dir, tiny_unet_dir, args,
                                                           message):
    if args[0] == "extract":
        args = [*args, "--model", str(tiny_unet_dir), "--split", "test", "-q"]
    before = tree_state(store_dir)
    code, out, err = run(monkeypatch, capsys, *args, "--store", str(store_dir))
    assert code == 2 and out == "", out
    assert err.startswith("error:") and "Traceback" not in err
    assert re.search(message, " ".join(err.split())), err  # rich wraps long lines
    assert tree_state(store_dir) == before


def test_verify_exits_0_on_a_sound_store_and_1_naming_a_nan_row_in_a_done_shard(monkeypatch, capsys, store_dir):
    code, out, _ = run(monkeypatch, capsys, "verify", "--store", str(store_dir), "--json")
    assert code == 0 and json.loads(out) == [{"arrays checked": 1, "status": "ok"}]
    Store.open(str(store_dir)).features(KEY).x[20] = np.nan  # shard 1 is marked done
    code, out, err = run(monkeypatch, capsys, "verify", "--store", str(store_dir), "--json")
    assert code == 1 and err == ""
    [problem] = json.loads(out)
    assert problem["array"] == KEY.path and problem["shards"] == [1]
    assert "shard 1 is marked done but holds NaN rows" in problem["problem"]
    assert "diffstore repair" in problem["problem"]


def test_info_prints_the_full_key_fingerprint_and_recipe(monkeypatch, capsys, store_dir):
    code, out, err = run(monkeypatch, capsys, "info", "--store", str(store_dir), "t=90/b=5/p=2")
    assert code == 0 and err == ""
    [row] = json.loads(out)
    assert row["path"] == KEY.path and row["key"] == KEY.to_dict() and row["recipe"] == RECIPE.to_dict()
    assert row["fingerprint"] == RECIPE.fingerprint(KEY)
    assert row["shape"] == [40, 3, 2, 2] and (row["shards_done"], row["n_shards"]) == (3, 3) and row["bytes_stored"] > 0
