"""A shared store is data, never code; no name, attribute, link or corrupt chunk can brick it (issue 21).

One test per row of the issue's table (rows 1-8 here, row 9, Ctrl-C, in test_interrupt.py), each of which failed on
the main of 5d5a2d8; and the issue's "done when": payloads planted in a store's attributes while every command that
opens a store runs, with nothing run, imported, unpickled, read or fetched. The cases live in tests/hostile.py, which
bench/bench_faults.py runs too.
"""

import hashlib
import os
import shutil

import pytest
from hostile import ARRAY, LIMIT, Bed, api, attempt, bad_inputs, cli, crafted
from payloads import MARKER, Guard, edit_attrs, name_payloads, plant

from conftest import tree_state
from faults import flipped_byte

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bed(tmp_path_factory) -> Bed:
    return Bed.build(tmp_path_factory.mktemp("bed"))


def copy(bed: Bed, tmp_path, name: str = "s.zarr"):
    shutil.copytree(bed.store, tmp_path / name)
    return tmp_path / name


def hashes(store) -> dict:
    """Array path -> sha256 of its first 64 rows (what every store here has done)."""
    from diffstore.store import Store

    s = Store.open(str(store), mode="r")
    return {p: hashlib.sha256(s.open_array(p).read(slice(0, 64)).tobytes()).hexdigest() for p in s.array_paths()}


def clean(r, code: int = 0) -> bool:
    return r.returncode == code and "Traceback" not in r.stderr + r.stdout


@pytest.fixture
def planted(bed, tmp_path, monkeypatch):
    """A copy of the bed's store whose every array names a payload (hostile.plant), the working directory beside
    it (relative py: specs resolve there), the hub offline."""
    store = copy(bed, tmp_path, "team.zarr")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return plant(store, tmp_path / MARKER)


# --- done when: nothing read from a store is executed, imported, downloaded, unpickled or decoded ----------------
def test_no_command_runs_or_fetches_what_a_store_names(planted, tmp_path, unet_spec):
    s, copied = str(planted.store), str(tmp_path / "copied.zarr")
    st = ["--store", s]
    commands = [["ls", *st], ["du", *st], ["info", *st, "t=10/b=2"], ["verify", *st],  # verify 1: shard 0 lost,
                ["probe", *st, *LIMIT, "-q"], ["cka", *st, "--by", "block", "--split", "test", "--t", "10", *LIMIT,
                                               "-q"],  # so probe and cka refuse (2)
                ["repair", *st, "-q", "--model", f"py:{unet_spec}"],  # another model: refused by its fingerprint
                ["repair", *st, "-q"], ["repair", *st, "-q", "--model", "default"],  # the model that wrote them
                ["verify", *st, "--json"], ["probe", *st, *LIMIT, "-q", "--grid"],
                ["cka", *st, "--by", "t", "--split", "test", "--block", "2", *LIMIT, "-q"],
                ["finetune", *st, "--t", "10", "--block", "mid", "--pool", "1", *LIMIT, "--steps",
                 "2", "--lrs", "0.001", "--weight-decays", "0", "--min-steps", "1", "--eval-every", "1", "-q"],
                ["copy", s, copied, "-q"], ["ls", "--store", copied], ["verify", "--store", copied],
                ["repfusion", "targets", *st, "--split", "test", "--t-grid", "0:100:50", "--views", "none", "-q"],
                ["repfusion", "train", *st, "--epochs", "1", "--decoder-steps", "2", "--batch-size", "32", "-q"],
                ["repfusion", "analyze", *st, "--tsne-ts", "1", "--tsne-points", "20", "--out",
                 str(tmp_path / "plots"), "-q"],
                ["rm", *st, "split=train", "--yes"], ["ls", *st]]
    codes = []
    for args in commands:
        with Guard(planted) as guard:
            r = cli(*args)
        codes.append(r.returncode)
        assert guard.events == [] and not planted.ran(), (args, guard.events)
        assert r.returncode in (0, 1, 2) and "Traceback" not in r.stderr, (args, r.stderr)
        if args[:2] == ["repfusion", "targets"]:  # the targets' attributes name the payloads too
            assert name_payloads(planted, "targets")
        if args[:2] == ["repfusion", "analyze"]:  # (before rm: the API reads what is stored)
            reads_through_the_api(planted)
    assert codes == [0, 0, 0, 1, 2, 2, 2] + [0] * 14, codes  # refused while incomplete; then repaired, read, copied


def reads_through_the_api(planted):
    import diffstore as ds

    s = str(planted.store)

    def reads():
        store = ds.open(s)
        for key in store.keys():
            store.features(key, limit=64).to_xarray()
        ds.probe(s, limit=64, show_progress=False)
        ds.cka(s, by="block", t=10, split="test", limit=64, show_progress=False)

    with Guard(planted) as guard:
        r = api(reads)
    assert r.returncode == 0 and guard.events == [] and not planted.ran(), (r.stderr, guard.events)


def test_the_payloads_are_live(planted):
    """(So that a marker never written means nothing ran them, not that they could not run.)"""
    import pickle
    import runpy

    runpy.run_path(str(planted.store / "evil" / "plugin.py"))
    assert planted.marker.read_text() == "imported"
    planted.marker.unlink()
    pickle.loads((planted.store / "evil" / "pickled" / "diffusion_pytorch_model.bin").read_bytes())
    assert planted.marker.read_text() == "unpickled"


# --- row 1: repair takes the model from the command line, checks its fingerprint first ------------------------
def test_repair_never_imports_a_py_spec_planted_in_the_store(planted):
    r = cli("repair", "--store", planted.store, "-q")  # what the audit ran; the shipped model (the default --model)
    assert not planted.ran()  # wrote these arrays, so they are repaired with it, whatever their attributes say
    assert clean(r) and cli("verify", "--store", planted.store).returncode == 0, r.stderr


# --- row 2: names are validated at the key; a folder named by hand cannot brick the store ---------------------
SMALL = ["--split", "test", "--limit", "64", "--t", "10", "--blocks", "2", "--pools", "1", "--shard-rows", "16", "-q"]


def test_a_name_that_is_no_path_segment_is_refused_and_one_made_by_hand_bricks_nothing(bed, tmp_path):
    import diffstore as ds

    store = copy(bed, tmp_path)
    before = tree_state(store)
    for name in ("a/b", "x.random-init-sabc", "m[/x]", "..", ""):
        r = cli("extract", "--store", store, *SMALL, "--model-name", name)
        assert clean(r, 2) and "--model-name" in r.stderr and tree_state(store) == before, (name, r.stderr)
    made = store / "features/digits/test/a/b"  # what `--model-name a/b` wrote before names were checked
    shutil.copytree(store / "features/digits/test/digits-ddpm", made)
    from diffstore.store import Store

    listed = Store.open(str(store), mode="r")
    listed.feature_keys()
    bad = listed.invalid
    assert len(bad) == 4 and all(p.startswith("features/digits/test/a/b/") for p in bad), bad
    r = cli("ls", "--store", store, "--json")
    assert clean(r) and r.stdout.count('"path"') == 8 and all(f"{p} is not a feature key" in " ".join(
        r.stderr.split()) for p in bad), r.stderr
    assert len(ds.open(str(store)).keys()) == 8
    assert clean(cli("cka", "--store", store, "--by", "block", "--split", "test", "--t", "10", *LIMIT, "-q"))
    assert clean(cli("rm", "--store", store, *bad, "--yes")) and not made.exists()


# --- row 3: repair rebuilds --limit arrays, and arrays of every backend, bit-identical --------------------------
def test_repair_rebuilds_a_limit_array_bit_identical(bed, tmp_path):
    store = copy(bed, tmp_path)
    want = hashes(store)
    flipped_byte(store, ARRAY, 1)
    (store / ARRAY / "x" / "zarr.json").write_text("{ truncated")  # broken metadata too: rebuilt from the layout
    r = cli("repair", "--store", store, "-q")
    assert clean(r) and hashes(store) == want, r.stderr


@pytest.mark.parametrize("backend", ["py", "sd"])
def test_repair_takes_the_model_as_extract_does_for_every_backend(backend, tmp_path, request):
    if backend == "py":
        model = ["--model", f"py:{request.getfixturevalue('unet_spec')}"]
    else:
        model = ["--model", f"sd:{request.getfixturevalue('sd_folder')}", "--prompt", "a photo"]
    store = tmp_path / "s.zarr"
    assert clean(cli("extract", "--store", store, *model, *SMALL))
    [path] = [str(p.parent.parent.relative_to(store)) for p in store.glob("features/**/done/zarr.json")]
    want = hashes(store)
    flipped_byte(store, path, 1)
    if backend == "sd":  # the prompt is part of the model: another one is refused before anything is touched
        before = tree_state(store)
        r = cli("repair", "--store", store, *model[:2], "--prompt", "a dog", "-q")
        assert clean(r, 2) and "another model" in r.stderr and tree_state(store) == before, r.stderr
    r = cli("repair", "--store", store, *model, "-q")
    assert clean(r) and hashes(store) == want, r.stderr


# --- row 4: a corrupt split is found, refused, repaired, or removed ---------------------------------------------
def test_a_corrupt_split_is_found_refused_repaired_and_removable(bed, tmp_path):
    import diffstore as ds

    store = copy(bed, tmp_path)
    split = store / "datasets/digits/test"

    def corrupt():
        chunk = next(p for p in (split / "ids" / "c").rglob("*") if p.is_file())
        chunk.write_bytes(chunk.read_bytes()[:-3] + b"\xff\xff\xff")

    corrupt()
    r = cli("verify", "--store", store, "--json")
    assert clean(r, 1) and '"array": "datasets/digits/test"' in r.stdout, r.stdout
    for args in (["probe", *LIMIT, "-q"], ["cka", "--by", "block", "--split", "test", "--t", "10", *LIMIT, "-q"]):
        r = cli(*args[:1], "--store", store, *args[1:])
        assert clean(r, 2) and "datasets/digits/test" in r.stderr and "diffstore repair" in r.stderr, r.stderr
    assert api(lambda: ds.open(str(store)).labels("test")).returncode == 2
    assert clean(cli("repair", "--store", store, "-q")) and clean(cli("verify", "--store", store))
    corrupt()
    r = cli("rm", "--store", store, "datasets/digits/test", "--yes")
    assert clean(r) and not split.exists() and not (store / "features/digits/test").exists(), r.stderr  # pruned
    assert clean(cli("verify", "--store", store))


# --- row 5: messages are text, never markup; credentials never printed -------------------------------------------
def test_messages_are_text_never_markup_and_credentials_are_redacted(bed, tmp_path):
    r = cli("ls", "--store", tmp_path / "foo[/x].zarr")
    assert clean(r, 2) and f"{tmp_path}/foo[/x].zarr" in r.stderr, r.stderr
    store = copy(bed, tmp_path)
    before = tree_state(store)
    r = cli("extract", "--store", store, *SMALL, "--model-name", "m[/x]:factory:")
    assert clean(r, 2) and "'m[/x]:factory:'" in r.stderr and tree_state(store) == before, r.stderr
    edit_attrs(store / ARRAY, lambda attrs: attrs["block"].update(name="[/oops] :factory:"))
    r = cli("ls", "--store", store)
    assert clean(r) and "[/oops] :factory:" in r.stdout, r.stdout
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_EC2_METADATA_DISABLED": "true", "AWS_MAX_ATTEMPTS": "1"}
    r = cli("ls", "--store", "s3://AKIAKEY:SECRETSECRET@bucket/x.zarr", env={**os.environ, **env})
    assert clean(r, 2) and "s3://***@bucket" in r.stderr and "SECRETSECRET" not in r.stderr + r.stdout, r.stderr


# --- rows 6, 7, 8: crafted attributes, links, and every bad input of the audit, each refused cleanly ----------
def failures(rows: list[dict]) -> list[dict]:
    return [r for r in rows if not r["clean"]]


def test_crafted_attributes_are_checked_before_use(bed):
    rows = [attempt(case, bed.work) for case in crafted(bed, attribute_mb=10) if "link" not in case.name]
    assert len(rows) == 10 and not failures(rows), failures(rows)


def test_links_inside_a_store_are_never_followed_for_writes_or_deletes(bed):
    rows = [attempt(case, bed.work) for case in crafted(bed) if "link" in case.name]
    assert len(rows) == 3 and not failures(rows), failures(rows)


def test_every_bad_input_of_the_audit_is_refused_cleanly(bed):
    rows = [attempt(case, bed.work) for case in bad_inputs(bed)]
    assert len(rows) >= 33 and not failures(rows), failures(rows)
