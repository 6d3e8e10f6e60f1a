"""Shared fixtures: small datasets cut from the real files in ../shared/datasets
(skipped where that folder is absent)."""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import shutil
import subprocess
import sys
import tarfile
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffstore.datasets import CIFAR10_CLASSES

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"
IDX_SAMPLES = {"train": 50, "test": 30}
CIFAR_PER_CLASS = 2  # 20 images per split


def shared_path(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"needs the real sample data at {path}")
    return path


# The files that take longest (pytest --durations), run first: under xdist (--dist loadfile) each goes to a worker
# at the start and the short files fill in around them, instead of one long file ending the run alone.
SLOW_FIRST = ["test_distributed.py", "test_readme.py", "test_s3.py", "test_extract.py", "test_fusion.py",
              "test_probe.py", "test_adm.py", "test_api.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order


@pytest.fixture(scope="session", autouse=True)
def one_thread_per_xdist_worker():
    """Under pytest-xdist (`-n`), one torch/OpenMP thread per worker (the workers already fill the cores), restored
    after; inherited by the processes the tests start."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        yield
        return
    import torch

    before, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(before)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS")
    else:
        os.environ["OMP_NUM_THREADS"] = env


@pytest.fixture(autouse=True)
def sigint_handler_restored():
    """diffstore.cli.main ignores Ctrl-C once its command has finished (it is the process's last act): a test that
    runs it in this process gets pytest's handler back."""
    import signal

    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)


@pytest.fixture(scope="session")
def shared_data():
    """name -> the real file or folder under ../shared/datasets (the test is skipped where it is absent)."""
    return shared_path


def copy_idx_head(src: Path, dst: Path, n: int) -> None:
    """Write the first n records of a real IDX .gz file as a smaller valid one (the header's count rewritten)."""
    with gzip.open(src) as f:
        magic = f.read(4)
        dims = [int.from_bytes(f.read(4), "big") for _ in range(magic[3])]
        data = f.read(n * math.prod(dims[1:]))
    with gzip.open(dst, "wb") as f:
        f.write(magic + b"".join(d.to_bytes(4, "big") for d in [n, *dims[1:]]) + data)


@pytest.fixture(scope="session")
def idx_root(tmp_path_factory):
    """name -> a directory with the four IDX .gz files holding the first 50 train / 30 test records."""
    roots = {}
    for name in ("mnist", "fashion-mnist"):
        src = shared_path(name)
        roots[name] = tmp_path_factory.mktemp(name)
        for split, prefix in (("train", "train"), ("test", "t10k")):
            for kind in ("images-idx3", "labels-idx1"):
                file = f"{prefix}-{kind}-ubyte.gz"
                copy_idx_head(src / file, roots[name] / file, IDX_SAMPLES[split])
    return roots


@pytest.fixture(scope="session")
def cifar_jpg_root(tmp_path_factory):
    """root/{train,test}/<class>/*.jpg with the first 2 JPEGs per class, streamed out of the real archive."""
    archive = shared_path("cifar10-jpg.tar.gz")
    root = tmp_path_factory.mktemp("cifar10-jpg")
    counts = {(split, c): 0 for split in ("train", "test") for c in CIFAR10_CLASSES}
    with tarfile.open(archive, "r|gz") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) == 3 and counts.get(parts[:2], CIFAR_PER_CLASS) < CIFAR_PER_CLASS:
                dst = root.joinpath(*parts)
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(tar.extractfile(member).read())
                counts[parts[:2]] += 1
                if min(counts.values()) == CIFAR_PER_CLASS:
                    break
    return root


@pytest.fixture(scope="session")
def cifar_bin_root(cifar_jpg_root, tmp_path_factory):
    """The same pixels in CIFAR-10's binary-batch format under root/cifar-10-batches-bin/ (built with PIL directly)."""
    bin_dir = tmp_path_factory.mktemp("cifar10-bin") / "cifar-10-batches-bin"
    bin_dir.mkdir()
    batches = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}
    for split, names in batches.items():
        paths = sorted((cifar_jpg_root / split).glob("*/*.jpg"))
        labels = np.array([CIFAR10_CLASSES.index(p.parent.name) for p in paths], dtype=np.uint8)
        chw = np.stack([np.asarray(Image.open(p).convert("RGB")).transpose(2, 0, 1).reshape(-1) for p in paths])
        records = np.concatenate([labels[:, None], chw], axis=1)
        for name, part in zip(names, np.array_split(records, len(names))):
            (bin_dir / name).write_bytes(part.tobytes())
    (bin_dir / "batches.meta.txt").write_text("\n".join(CIFAR10_CLASSES) + "\n\n")
    return bin_dir.parent


@pytest.fixture(scope="session")
def imagefolder_root(cifar_jpg_root, tmp_path_factory):
    """train/cat/{a.jpg, b.png (grey, 40x30)}, train/dog/{broken.jpg (truncated), c.jpg}, test/bird/x.jpg."""
    root = tmp_path_factory.mktemp("imagefolder")
    jpgs = sorted((cifar_jpg_root / "train").glob("*/*.jpg"))
    for d in ("train/cat", "train/dog", "test/bird"):
        (root / d).mkdir(parents=True)
    (root / "train/cat/a.jpg").write_bytes(jpgs[0].read_bytes())
    Image.open(jpgs[1]).convert("L").resize((40, 30)).save(root / "train/cat/b.png")
    (root / "train/dog/broken.jpg").write_bytes(jpgs[2].read_bytes()[:300])
    (root / "train/dog/c.jpg").write_bytes(jpgs[3].read_bytes())
    (root / "test/bird/x.jpg").write_bytes(jpgs[4].read_bytes())
    return root


# --- models, splits and stores for extraction tests --------------------------------------------------


def build_tiny_unet(size: int = 16, channels: int = 1, widths: tuple = (16, 32, 32), attention: bool = True,
                    seed: int = 0):
    """A small seeded diffusers UNet2DModel; with `attention` its second level has attention, as the default model."""
    import torch
    from diffusers import UNet2DModel

    down, up = ["DownBlock2D"] * len(widths), ["UpBlock2D"] * len(widths)
    if attention:
        down[1], up[-2] = "AttnDownBlock2D", "AttnUpBlock2D"
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=widths,
                       layers_per_block=1, norm_num_groups=widths[0] // 2, down_block_types=tuple(down),
                       up_block_types=tuple(up))


def save_tiny_unet(folder: Path, **kw) -> Path:
    """A diffusers model folder (config.json + safetensors + scheduler config), as a user would pass it."""
    from diffusers import DDPMScheduler

    build_tiny_unet(**kw).save_pretrained(folder, safe_serialization=True)
    DDPMScheduler(num_train_timesteps=1000).save_config(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_unet_dir(tmp_path_factory) -> Path:
    return save_tiny_unet(tmp_path_factory.mktemp("models") / "tiny-unet")


@pytest.fixture(scope="session")
def model(tiny_unet_dir):
    """The tiny U-Net loaded as a DiffusionModel (15 blocks, mid = 8, 16x16 grey)."""
    from diffstore.models import load_model

    return load_model(str(tiny_unet_dir))


def subset(split, n: int):
    """The first n samples of a split (same ids, labels and loader)."""
    return split.take(split.ids[:n])


@pytest.fixture(scope="session")
def digits100():
    """100 digits test rows: 6 full micro-batches of 16 and a padded last one of 4."""
    from diffstore.datasets import load_split

    return subset(load_split("digits", "test"), 100)


def digests(store) -> dict:
    """Array path -> sha256 of its done flags and the values of its done shards (every array of a store)."""
    out = {}
    for a in store.arrays():
        mask, h = a.done_mask(), hashlib.sha256()
        h.update(mask.tobytes())
        for i in np.flatnonzero(mask):
            h.update(a.read(a.shard_slice(int(i))).tobytes())
        out[a.path] = h.hexdigest()
    return out


def feature_array(store, key, recipe, row_shape=(3, 2, 2), n: int = 40, shard_rows: int = 16, rows=None, block=None):
    """A feature array created without a model (the store's own bookkeeping only); `rows` [n, *row_shape] are
    written shard by shard when given; `block` is the BlockInfo dict readers label plots with."""
    attrs = {"key": key.to_dict(), "recipe": recipe.to_dict()} | ({"block": block} if block else {})
    array = store.create(key.path, recipe.fingerprint(key), attrs, row_shape, n, shard_rows)
    for i in range(array.n_shards if rows is not None else 0):
        array.write_shard(i, rows[array.shard_slice(i)])
    return array


def tree_state(root: Path) -> dict:
    """Relative path -> (sha256 of its bytes, mtime_ns) for every file under root; directories map to None."""
    return {str(p.relative_to(root)): None if p.is_dir()
            else (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


PLUGINS = Path(__file__).parent / "plugins"


def install_plugin(name: str, folder: Path, seed: int = 7) -> str:
    """Copy an example plugin (tests/plugins) into `folder` and write its weights file from its own seeded
    random init; returns the spec FILE.py:factory."""
    from safetensors.torch import save_file

    from diffstore.models.plugin import load_plugin

    shutil.copy(PLUGINS / f"{name}.py", folder)
    spec = f"{folder / name}.py:factory"
    save_file(load_plugin(spec, random_init=seed).module.state_dict(), folder / f"{name}.safetensors")
    return spec


@pytest.fixture(scope="session")
def unet_spec(tmp_path_factory):
    return install_plugin("tiny_unet", tmp_path_factory.mktemp("unet-plugin"))


@pytest.fixture(scope="session")
def resnet_spec(tmp_path_factory):
    return install_plugin("tiny_resnet", tmp_path_factory.mktemp("resnet-plugin"))


SD_LATENT = 8  # the tiny SD UNet's sample_size; its VAE has 2 levels, so images are 16x16


def write_clip_tokenizer(folder: Path) -> None:
    """A real CLIP BPE tokenizer from a minimal vocab.json + merges.txt (letters, digits, one merge chain)."""
    import json
    import string

    chars = string.ascii_lowercase + string.digits
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(chars) + [c + "</w>" for c in chars] + ["th", "the</w>"]
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\nt h\nth e</w>\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 16}))


def save_tiny_sd(root: Path, **unet_kw) -> Path:
    """A tiny Stable Diffusion pipeline folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/), seeded weights;
    unet_kw override UNet2DConditionModel arguments (e.g. SDXL's added conditioning)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(1234)  # not a seed the random-init tests use
    UNet2DConditionModel(**{**dict(
        sample_size=SD_LATENT, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8), **unet_kw}).save_pretrained(root / "unet")
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
        sample_size=2 * SD_LATENT,
    ).save_pretrained(root / "vae")
    CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 vocab_size=1000, max_position_embeddings=16)).save_pretrained(root / "text_encoder")
    write_clip_tokenizer(root / "tokenizer")
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(root / "scheduler")
    return root


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


ADM_SPECS = Path(__file__).resolve().parents[2] / "shared" / "specs" / "adm"  # next to the checkout


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`), restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def s3_env():
    """A real S3-compatible server (moto's server mode) on 127.0.0.1 with a bucket 'team'.

    Returns the environment that points boto3/s3fs at it (credentials and endpoint come from the
    environment, as they would on a team's workers); it is also applied to this process.
    """
    import os
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3").create_bucket(Bucket="team")
    yield {**os.environ, **env}
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


# --- diffstore commands in fresh processes, without re-importing torch each time ----------------------

PRELOAD = ["torch", "diffusers.models.unets.unet_2d", "distributed", "typer", "sklearn.linear_model",
           "matplotlib.pyplot"]


@cache
def forkserver():
    """This test process's multiprocessing forkserver, started once with torch, diffusers and distributed imported
    (~10 s here). Every process it forks (a diffstore command, a dask worker) is fresh, with its own state,
    environment and exit code, but starts in a fraction of a second instead of importing those again."""
    import multiprocessing
    from multiprocessing import forkserver as server

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    server.ensure_running()  # now, with this list (a later set_forkserver_preload, e.g. dask's, changes nothing)
    return ctx


def command_main(argv, code, cwd, env, out, err):
    """Body of a forked command: `diffstore ARGV...` (or `python -c CODE`) in `cwd` with exactly `env`, stdout and
    stderr into files; SystemExit gives the exit code, an uncaught exception a traceback and exit 1, as python does."""
    import atexit

    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(file, fd)
        os.close(file)
    sys.argv = ["diffstore", *argv] if code is None else ["-c"]
    try:
        if code is None:
            from diffstore.cli import main

            main()
        else:
            exec(compile(code, "<string>", "exec"), {"__name__": "__main__"})
    finally:
        atexit._run_exitfuncs()  # what the interpreter runs at exit (multiprocessing then exits the process)


class Command:
    """`diffstore ARGS...` (or `python -c CODE`) as its own process, forked from the preloaded forkserver; Popen-like:
    .pid, .send_signal, .wait, .returncode, and .stdout / .stderr once it has exited."""

    def __init__(self, args, cwd=".", env=None, code=None):
        import tempfile

        self.args, self.dir = list(args), Path(tempfile.mkdtemp(prefix="diffstore-command-"))
        self.out, self.err = str(self.dir / "stdout"), str(self.dir / "stderr")
        env = dict(os.environ if env is None else env)
        self.process = forkserver().Process(target=command_main,
                                            args=(self.args, code, str(Path(cwd).resolve()), env, self.out, self.err))
        self.process.start()
        self.pid = self.process.pid

    def send_signal(self, sig):
        os.kill(self.pid, sig)

    def wait(self, timeout=600) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.process.kill()
            raise subprocess.TimeoutExpired(["diffstore", *self.args], timeout)
        self.returncode = self.process.exitcode
        self.stdout, self.stderr = (Path(f).read_text() for f in (self.out, self.err))
        shutil.rmtree(self.dir)
        return self.returncode


def run_command(args, cwd=".", env=None, code=None, timeout=600) -> Command:
    """Run a diffstore command (or Python code) in a fresh forked process to completion; see Command."""
    command = Command(args, cwd, env, code)
    command.wait(timeout)
    return command
