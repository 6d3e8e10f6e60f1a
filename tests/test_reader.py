"""The concurrent checked reader (store/reader.py): the bytes zarr reads, for every layout, codec and selection;
the same refusals; arrays written with an older codec read and resume with it."""

import json
from unittest.mock import patch

import boto3
import numpy as np
import pytest
from typer.testing import CliRunner

from diffstore.cli import app
from diffstore.errors import DiffstoreError
from diffstore.extract.repair import rebuild_metadata
from diffstore.store import Store, reader
from diffstore.store import store as store_module
from diffstore.store.codec import CODECS, DEFAULT, LEGACY, name_of
from faults import deleted_shard, flipped_byte, shard_file, truncated_shard

P = "features/d/test/m/noised/t1/b1/p2"
LAYOUTS = {  # name: (rows, row shape, shard rows, dtype); 512-byte float16 rows make 16-row chunks (SMALL_CHUNKS)
    "one chunk per shard, partial last shard": (45, (3, 2, 2), 16, "float16"),
    "chunks within shards, partial last chunk": (150, (64, 2, 2), 64, "float16"),
    "float32 storage": (45, (3, 2, 2), 16, "float32"),
}
SMALL_CHUNKS = 8192  # bytes: chunks of 16 rows of 512 bytes, 4 per shard of 64 rows


def selections(n: int) -> list:
    """Row slices (within a shard, across shards, empty, stepped), single rows, index arrays (sorted, unsorted with
    repeats, a list) and a boolean mask."""
    return [slice(None), slice(3, n - 5), slice(16, 32), slice(17, 18), slice(5, 5), slice(None, None, 3),
            slice(n - 5, 2, -2), 5, -1, np.array([3, 20, 21, n - 1]), np.array([n - 1, 3, 3, 20, 0]), [7],
            np.arange(n) % 2 == 1]


def values(n, shape, dtype, seed=0):
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(dtype)


def filled(url, layout: str, codec: str = DEFAULT):
    n, shape, shard_rows, dtype = LAYOUTS[layout]
    with patch.object(store_module, "CHUNK_BYTES", SMALL_CHUNKS):
        a = Store.open(str(url)).create(P, "fp", {}, shape, n, shard_rows, dtype, codec=codec)
    x = values(n, shape, dtype)
    for i in range(a.n_shards):
        a.write_shard(i, x[a.shard_slice(i)])
    return Store.open(str(url), "r").open_array(P), x


@pytest.fixture(params=list(LAYOUTS))
def layout(request):
    return request.param


@pytest.mark.parametrize("codec", list(CODECS))
def test_reads_return_the_bytes_zarr_reads(tmp_path, layout, codec):
    a, x = filled(tmp_path / "s.zarr", layout, codec)
    assert isinstance(a.reader(), reader.ShardReader) and a.codec == codec
    if a.shape[1] == 64:
        assert a.x.chunks[0] < a.shard_rows < a.n_rows and a.n_rows % a.shard_rows and a.n_rows % a.x.chunks[0]
    whole = a.x[:]  # zarr's own reader: what ShardedArray.read returned before
    for rows in selections(a.n_rows):
        want = whole[rows]  # (zarr itself takes no negative steps, unsorted or repeated rows)
        np.testing.assert_array_equal(a.read(rows), want, err_msg=str(rows))
        assert a.read(rows).dtype == a.dtype
        got32 = a.read(rows, dtype=np.float32)
        assert got32.dtype == np.float32 and np.array_equal(got32, want.astype(np.float32)), rows
    np.testing.assert_array_equal(a.read(), x)


def test_the_zarr_fallback_reads_the_same_bytes(tmp_path, layout, monkeypatch):
    a, _ = filled(tmp_path / "s.zarr", layout)
    fast = [(a.read(r), a.read(r, np.float32)) for r in selections(a.n_rows)]
    monkeypatch.setattr(reader.Layout, "of", classmethod(lambda cls, x: None))  # a layout the reader does not decode
    slow = Store.open(str(tmp_path / "s.zarr"), "r").open_array(P)
    assert isinstance(slow.reader(), reader.ZarrShards)
    for r, (f16, f32) in zip(selections(a.n_rows), fast):
        np.testing.assert_array_equal(slow.read(r), f16)
        np.testing.assert_array_equal(slow.read(r, np.float32), f32)


def test_widening_is_exact_for_every_float16():
    every = np.arange(2**16, dtype=np.uint16).view(np.float16)
    out = np.empty(every.shape, np.float32)
    reader.widen(out, every)
    np.testing.assert_array_equal(out, every.astype(np.float32))  # NaNs compare equal here


@pytest.mark.parametrize("fallback", [False, True], ids=["reader", "zarr fallback"])
def test_refusals_name_the_shard(tmp_path, monkeypatch, fallback):
    if fallback:
        monkeypatch.setattr(reader.Layout, "of", classmethod(lambda cls, x: None))
    url = tmp_path / "s.zarr"
    a, _ = filled(url, "chunks within shards, partial last chunk")
    flipped_byte(url, P, 1)
    truncated_shard(url, P, 0)
    a = Store.open(str(url), "r").open_array(P)
    for rows, shard in [(slice(None), 0), (slice(60, 70), 0), (np.array([100, 3]), 0), (5, 0), (slice(64, 128), 1)]:
        with pytest.raises(DiffstoreError, match=rf"shard {shard} \(rows .*\) fails its checksum .* diffstore repair"):
            a.read(rows)
    np.testing.assert_array_equal(a.read(slice(128, 150)), a.x[128:150])  # shard 2 is sound
    assert sorted(a.problems([0, 1, 2])) == [0, 1]
    deleted_shard(url, P, 2)  # its done flag stays: the rows are missing
    with pytest.raises(DiffstoreError, match=r"shard 2 \(rows 128-149\) is marked done but holds NaN rows"):
        a.read(slice(130, 131))


def test_a_nan_row_and_an_unfinished_shard_are_refused(tmp_path):
    a, _ = filled(tmp_path / "s.zarr", "one chunk per shard, partial last shard")
    w = Store.open(str(tmp_path / "s.zarr")).open_array(P)
    w.x[44] = np.nan  # the last row of the partial last shard, written after the shard was done
    with pytest.raises(DiffstoreError, match="shard 2 .* NaN rows"):
        a.read(np.array([33]))  # a NaN anywhere in a shard's rows refuses the shard
    w.invalidate([1])
    a = Store.open(str(tmp_path / "s.zarr"), "r").open_array(P)
    np.testing.assert_array_equal(a.read(slice(0, 16)), a.x[0:16])
    with pytest.raises(DiffstoreError, match=r"shard 1 \(rows 16-31\) is not done"):
        a.read(np.array([0, 20]))


def test_a_chunk_outside_its_object_and_a_bad_index_are_refused(tmp_path):
    url = tmp_path / "s.zarr"
    a, _ = filled(url, "chunks within shards, partial last chunk")
    f = shard_file(url, P, 1)
    raw = bytearray(f.read_bytes())
    raw[-5] ^= 1  # the index's last byte: its crc32c no longer matches
    f.write_bytes(bytes(raw))
    with pytest.raises(DiffstoreError, match=r"shard 1 .* fails its checksum .*its index"):
        a.read(slice(64, 65))


# --- codecs: recorded per array, kept by arrays written before ----------------------------------------------------
def info_codec(url) -> str:
    done = CliRunner().invoke(app, ["info", "--store", str(url), P])
    assert done.exit_code == 0, done.output
    return json.loads(done.stdout)[0]["codec"]


def test_a_new_array_records_its_codec_and_info_shows_it(tmp_path):
    a, _ = filled(tmp_path / "s.zarr", "one chunk per shard, partial last shard")
    assert a.attrs["codec"] == DEFAULT == name_of(a.x) == info_codec(tmp_path / "s.zarr")
    assert "codec" not in a.attrs["layout"] and "codec" not in a.attrs.get("recipe", {})
    with pytest.raises(DiffstoreError, match="unknown codec 'brotli'"):
        Store.open(str(tmp_path / "t.zarr")).create(P, "fp", {}, (3,), 4, 2, codec="brotli")
    assert not (tmp_path / "t.zarr").exists()


def older(url):
    """Make the array at P look written before codecs were recorded: zstd-1 chunks and no `codec` attribute."""
    meta = url / P / "zarr.json"
    doc = json.loads(meta.read_text())
    del doc["attributes"]["codec"]
    meta.write_text(json.dumps(doc))


def test_an_array_with_the_old_codec_reads_and_resumes_with_it(tmp_path):
    url = tmp_path / "s.zarr"
    n, shape, shard_rows, dtype = LAYOUTS["chunks within shards, partial last chunk"]
    x = values(n, shape, dtype)
    with patch.object(store_module, "CHUNK_BYTES", SMALL_CHUNKS):  # (x is re-made from the group's layout alike)
        a = Store.open(str(url)).create(P, "fp", {}, shape, n, shard_rows, codec=LEGACY)
        a.write_shard(0, x[a.shard_slice(0)])
        older(url)
        resumed = Store.open(str(url)).create(P, "fp", {}, shape, n, shard_rows)  # as extract calls it
        assert resumed.codec == LEGACY == name_of(resumed.x) == info_codec(url) and "codec" not in resumed.attrs
        resumed.write_shard(1, x[resumed.shard_slice(1)])
        rebuild_metadata(Store.open(str(url)), P)  # repair drops x's zarr.json: it is made again with the old codec
        again = Store.open(str(url)).create(P, "fp", {}, shape, n, shard_rows)
        assert name_of(again.x) == LEGACY
        again.write_shard(2, x[again.shard_slice(2)])
    final = Store.open(str(url), "r").open_array(P)
    np.testing.assert_array_equal(final.read(), x)
    assert final.problems(range(3)) == {}


# --- S3: the same bytes and refusals through concurrent GETs -------------------------------------------------------
def test_s3_reads_match_and_refuse(s3_env, tmp_path):
    url = "s3://team/reader.zarr"
    a, x = filled(url, "chunks within shards, partial last chunk")
    assert a.reader().local is None
    reader.set_concurrency(io=2)  # fewer GETs in flight than shards
    try:
        for rows in selections(a.n_rows):
            np.testing.assert_array_equal(a.read(rows), x[rows])
        np.testing.assert_array_equal(a.read(dtype=np.float32), x.astype(np.float32))
        s3 = boto3.client("s3")
        key = f"reader.zarr/{a.reader().key(1)}"
        raw = bytearray(s3.get_object(Bucket="team", Key=key)["Body"].read())
        raw[len(raw) // 3] ^= 0xFF
        s3.put_object(Bucket="team", Key=key, Body=bytes(raw))
        with pytest.raises(DiffstoreError, match=r"shard 1 \(rows 64-127\) fails its checksum"):
            a.read(slice(60, 128))
        s3.delete_object(Bucket="team", Key=f"reader.zarr/{a.reader().key(2)}")
        with pytest.raises(DiffstoreError, match=r"shard 2 .* NaN rows"):
            a.read(np.array([140]))
        assert sorted(a.problems([0, 1, 2])) == [1, 2]
    finally:
        reader.set_concurrency(io=reader.DEFAULT_IO)
