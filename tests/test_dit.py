"""DiT backend and transformer plugins on tiny models built here (no download): token maps, labels, identity,
extraction."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from diffstore.cli import app
from diffstore.datasets import load_split
from diffstore.errors import DiffstoreError
from diffstore.extract import extract_features, forward_blocks, plan_extraction
from diffstore.key import sha256_files
from diffstore.models import load_model
from diffstore.models.dit import load_dit
from diffstore.models.plugin import load_plugin
from diffstore.noise import noise
from diffstore.preprocess import Preprocess
from diffstore.store import Store

LATENT, PATCH, WIDTH, LAYERS, CLASSES = 8, 2, 16, 4, 10  # images 16x16 (2-level VAE), a 4x4 patch grid
GRID = LATENT // PATCH


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
    from diffusers import AutoencoderKL, DDIMScheduler, DiTTransformer2DModel

    root = tmp_path_factory.mktemp("tiny-dit")
    torch.manual_seed(4321)  # not a seed the random-init tests use
    DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=WIDTH // 2, in_channels=4, out_channels=8,
                          num_layers=LAYERS, sample_size=LATENT, patch_size=PATCH, num_embeds_ada_norm=CLASSES,
                          ).save_pretrained(root / "transformer")
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  norm_num_groups=4, sample_size=2 * LATENT).save_pretrained(root / "vae")
    DDIMScheduler(beta_schedule="linear").save_pretrained(root / "scheduler")  # facebook/DiT-XL-2-256 ships DDIM
    return root


@pytest.fixture(scope="module")
def dit(dit_folder):
    return load_dit(str(dit_folder))


def raw_parts(folder):
    """The checkpoint loaded by diffusers alone, with nothing of diffstore attached: the reference."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTTransformer2DModel

    return (DiTTransformer2DModel.from_pretrained(folder / "transformer").eval(),
            AutoencoderKL.from_pretrained(folder / "vae").eval(), DDIMScheduler.from_pretrained(folder / "scheduler"))


def block_tokens(net, run) -> dict[int, torch.Tensor]:
    """{depth: tokens [B, N, C]} of every transformer block during run()."""
    out = {}
    handles = [blk.register_forward_hook(lambda _m, _i, o, d=d: out.__setitem__(d, o))
               for d, blk in enumerate(net.transformer_blocks, start=1)]
    with torch.no_grad():
        run()
    for h in handles:
        h.remove()
    return out


def as_map(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Row-major patch tokens [B, h*w, C] -> [B, C, h, w] (written independently of tokens.py)."""
    return tokens.reshape(len(tokens), h, w, -1).permute(0, 3, 1, 2)


def images(n=2, seed=0):
    return torch.rand((n, 3, 2 * LATENT, 2 * LATENT), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_block_table_is_the_transformer_blocks_as_patch_grid_maps(dit):
    assert [b.name for b in dit.blocks] == [f"layer{d}" for d in range(1, LAYERS + 1)]
    assert [b.index for b in dit.blocks] == list(range(1, LAYERS + 1))  # b = depth, as in DiT/SiT/REPA sweeps
    assert [b.module for b in dit.blocks] == [f"transformer_blocks.{i}.feature_map" for i in range(LAYERS)]
    assert {(b.channels, b.height, b.width) for b in dit.blocks} == {(WIDTH, GRID, GRID)}
    assert (dit.image_size, dit.image_channels, dit.num_timesteps) == (2 * LATENT, 3, 1000)
    assert dit.blocks.resolve("layer3,1") == [1, 3]


def test_cli_blocks_lists_the_dit_table(dit, dit_folder):
    out = CliRunner().invoke(app, ["blocks", "--model", f"dit:{dit_folder}", "--json"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.stdout)
    assert [(r["b"], r["name"], r["module"], r["C"], r["H"], r["W"]) for r in rows] == \
        [(b.index, b.name, b.module, WIDTH, GRID, GRID) for b in dit.blocks]


def test_token_maps_leave_the_network_output_unchanged(dit, dit_folder):
    net, _, _ = raw_parts(dit_folder)
    x, t, null = torch.randn(3, 4, LATENT, LATENT), torch.tensor([0, 300, 999]), torch.full((3,), CLASSES)
    with torch.no_grad():
        assert torch.equal(dit.run(x, t, None).sample, net(x, t, class_labels=null).sample)
    assert dit.module.state_dict().keys() == net.state_dict().keys()


def test_extract_cli_stores_what_a_direct_forward_gives(dit_folder, idx_root, tmp_path):
    store = tmp_path / "dit.zarr"
    args = ["extract", "--store", str(store), "--dataset", "fashion-mnist", "--data-root",
            str(idx_root["fashion-mnist"]),
            "--split", "test", "--model", f"dit:{dit_folder}", "--t", "0,200", "--blocks", "layer1,layer3",
            "--pools", "1,full", "--dtype", "float32", "--shard-rows", "16", "-q"]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    s = Store.open(str(store))
    keys = s.feature_keys()
    assert len(keys) == 2 * 2 * 2 and all(k.model == "tiny-dit0" for k in keys)
    split = load_split("fashion-mnist", "test", str(idx_root["fashion-mnist"]))
    rows = np.arange(16)  # the first shard: one full micro-batch, so the direct forward has the same shapes
    x = Preprocess(size=2 * LATENT, channels=3)(split.load(rows))
    net, vae, sched = raw_parts(dit_folder)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor
    abar = float(sched.alphas_cumprod[200])
    x_t = abar ** 0.5 * z + (1 - abar) ** 0.5 * noise(0, split.ids[rows], 200, 0, tuple(z.shape[1:]))
    tokens = block_tokens(net, lambda: net(x_t, torch.full((16,), 200), class_labels=torch.full((16,), CLASSES)))
    for depth in (1, 3):
        full = s.features(next(k for k in keys if (k.t, k.block, k.pool) == (200, depth, "full")))
        assert full.complete and full.read().shape == (len(split), WIDTH, GRID, GRID)
        np.testing.assert_array_equal(full.read()[:16], as_map(tokens[depth], GRID, GRID).numpy())
        pooled = s.features(next(k for k in keys if (k.t, k.block, k.pool) == (200, depth, "1")))
        np.testing.assert_allclose(pooled.read()[:16, :, 0, 0], tokens[depth].mean(1).numpy(), rtol=1e-5, atol=1e-6)


def test_extract_cli_random_init_with_dataset_labels(dit_folder, idx_root, tmp_path):
    root = str(idx_root["fashion-mnist"])
    args = ["extract", "--store", str(tmp_path / "r.zarr"), "--dataset", "fashion-mnist", "--data-root", root,
            "--split", "test", "--model", f"dit:{dit_folder}", "--random-init", "3", "--class-label", "dataset",
            "--t", "100", "--blocks", "layer2", "--pools", "full", "--dtype", "float32", "-q"]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    (key,) = Store.open(str(tmp_path / "r.zarr")).feature_keys()
    assert key.model == "tiny-dit0.labels-dataset.random-init-s3"
    stored = Store.open(str(tmp_path / "r.zarr")).features(key).read()[:16]
    split = load_split("fashion-mnist", "test", root)
    x = Preprocess(size=2 * LATENT, channels=3)(split.load(np.arange(16)))

    def layer2(model):
        return forward_blocks(model, model.encode(x), 100, split.ids[:16], split.labels[:16], 0, 1, "noised", [2],
                              ["full"])[(2, "full")].numpy()

    np.testing.assert_array_equal(stored, layer2(load_model(f"dit:{dit_folder}", random_init=3, class_label="dataset")))
    assert not np.allclose(stored, layer2(load_model(f"dit:{dit_folder}", class_label="dataset")), atol=1e-3)


def test_early_exit_runs_no_block_after_the_deepest(dit):
    ran = []  # modules that started
    handles = [m.register_forward_pre_hook(lambda *_a, n=n: ran.append(n))
               for n, m in dit.module.named_modules() if n in {"proj_out_1", "proj_out_2"}
               or (n.startswith("transformer_blocks.") and n.count(".") == 1)]
    try:
        feats = forward_blocks(dit, dit.encode(images(2)), 50, [0, 1], None, 0, 1, "noised", [2], ["full"])
    finally:
        for h in handles:
            h.remove()
    assert feats[(2, "full")].shape == (2, WIDTH, GRID, GRID)
    assert ran == ["transformer_blocks.0", "transformer_blocks.1"]


def test_null_class_by_default_and_labels_on_request(dit_folder, dit):
    z = dit.encode(images(2))

    def layer2(model, labels=None):
        return forward_blocks(model, z, 100, [0, 1], labels, 0, 1, "noised", [2], ["full"])[(2, "full")]

    three, dataset = load_dit(str(dit_folder), class_label=3), load_model(f"dit:{dit_folder}", class_label="dataset")
    assert dit.config["labels"] == {"policy": "null", "class_label": CLASSES}
    assert torch.equal(layer2(three), layer2(dataset, np.array([3, 3])))  # a constant label = that label per image
    assert not torch.equal(layer2(dit), layer2(three))
    assert torch.equal(layer2(dit), layer2(load_dit(str(dit_folder), class_label=CLASSES)))  # the null class, named
    assert len({dit.fingerprint, three.fingerprint, dataset.fingerprint}) == 3
    assert len({dit.name, three.name, dataset.name}) == 3
    with pytest.raises(DiffstoreError, match="class indices 0..9"):
        layer2(dataset, np.array([3, 10]))
    with pytest.raises(DiffstoreError, match="--class-label"):
        layer2(dataset)
    with pytest.raises(DiffstoreError, match="null class 10"):
        load_dit(str(dit_folder), class_label=11)
    with pytest.raises(DiffstoreError, match="class index"):
        load_model(f"dit:{dit_folder}", class_label="cat")


def test_identity_hashes_transformer_and_vae_weights(dit, dit_folder):
    files = [dit_folder / p / "diffusion_pytorch_model.safetensors" for p in ("transformer", "vae")]
    assert dit.weights_sha256 == sha256_files(files)
    assert dit.config["transformer"]["num_layers"] == LAYERS and dit.config["vae"]["latent_channels"] == 4


def test_random_init_gives_a_different_model_key(dit, dit_folder):
    r0, r0_again, r1 = (load_dit(str(dit_folder), random_init=s) for s in (0, 0, 1))
    assert r0.name == "tiny-dit0.random-init-s0" and r0.weights_sha256 == "random-init:0"
    assert r0.fingerprint == r0_again.fingerprint and len({dit.fingerprint, r0.fingerprint, r1.fingerprint}) == 3
    z = r0.encode(images(1))
    a, b, c = (forward_blocks(m, z, 10, [0], None, 0, 1, "noised", [1], ["full"])[(1, "full")]
               for m in (r0, r0_again, r1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert r0.blocks.to_list() == dit.blocks.to_list()


class Payload:
    """Unpickling this would touch a file: what a malicious .bin checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def bin_copy(dit_folder, folder, state=None):
    """The pipeline with the transformer's weights as a torch.save .bin file (as the hub's DiT repos ship them)."""
    shutil.copytree(dit_folder, folder)
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    from safetensors.torch import load_file

    weights = (state if state is not None
               else load_file(dit_folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    torch.save(weights, folder / "transformer" / "diffusion_pytorch_model.bin")
    return folder


def test_bin_weights_load_as_plain_tensors_and_key_their_bytes(dit, dit_folder, tmp_path):
    folder = bin_copy(dit_folder, tmp_path / "bin")
    from_bin = load_dit(str(folder))
    files = [folder / "transformer" / "diffusion_pytorch_model.bin",
             folder / "vae" / "diffusion_pytorch_model.safetensors"]
    assert from_bin.weights_sha256 == sha256_files(files) != dit.weights_sha256
    z = dit.encode(images(2))
    a, b = (forward_blocks(m, z, 30, [0, 1], None, 0, 1, "noised", [4], ["full"])[(4, "full")] for m in (dit, from_bin))
    assert torch.equal(a, b)


def test_pickled_code_in_a_bin_checkpoint_never_runs(dit_folder, tmp_path):
    marker = tmp_path / "pwned"
    folder = bin_copy(dit_folder, tmp_path / "evil", state={"pos_embed.proj.weight": Payload(marker)})
    with pytest.raises(DiffstoreError, match="could not load DiT"):
        load_dit(str(folder))
    assert not marker.exists()


def test_incomplete_folder_names_the_missing_parts(tmp_path):
    (tmp_path / "partial" / "transformer").mkdir(parents=True)
    with pytest.raises(DiffstoreError, match="missing vae/, scheduler/"):
        load_dit(str(tmp_path / "partial"))


# A SiT/REPA-style checkpoint through the py: plugin contract (tests/plugins/tiny_sit.py).

@pytest.fixture(scope="module")
def sit_spec(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sit")
    shutil.copy(Path(__file__).parent / "plugins" / "tiny_sit.py", folder)
    spec = f"{folder / 'tiny_sit.py'}:factory"
    save_file(load_plugin(spec, random_init=7).module.state_dict(), folder / "tiny_sit.safetensors")
    return spec


def test_sit_plugin_extracts_its_blocks_on_its_own_interpolant(sit_spec, tmp_path):
    model = load_model(f"py:{sit_spec}")
    assert [(b.name, b.channels, b.height) for b in model.blocks] == [(f"layer{d}", 32, 4) for d in range(1, 5)]
    digits = load_split("digits", "test")
    store = Store.open(str(tmp_path / "sit.zarr"), mode="a")
    plan = plan_extraction(store, model, digits, t="500", blocks="layer2", pools="full", dtype="float32",
                           shard_rows=16)
    extract_features(plan, batch_size=16, show_progress=False)
    stored = store.features(store.feature_keys()[0]).read()[:16]
    # The network on SiT's own input: x_s = (1 - s) x_0 + s eps at s = 500 / 1000, its layer-2 tokens as maps.
    x0 = plan.preprocess(digits.load(np.arange(16)))
    x_s = 0.5 * x0 + 0.5 * noise(0, digits.ids[:16], 500, 0, tuple(x0.shape[1:]))
    net, out = model.module, {}
    h = net.blocks[1].register_forward_hook(lambda _m, _i, o: out.__setitem__("tokens", o))
    with torch.no_grad():
        net(x_s, torch.full((16,), 0.5))
    h.remove()
    np.testing.assert_allclose(stored, as_map(out["tokens"], 4, 4).numpy(), rtol=1e-4, atol=1e-5)
