"""Comparison networks through the py: plugin path (examples/plugins/resnet50.py, vit.py) and the recipe that draws
diffusion blocks against them (pipelines/cka_networks.py): block tables, state_dict names and shapes as torchvision's
and timm's, strict weight files that round-trip, and a cross-model CKA matrix from the store."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import diffstore as ds
from diffstore.cka import cka
from diffstore.datasets import load_split
from diffstore.errors import DiffstoreError
from diffstore.key import sha256_files
from diffstore.models import load_model
from diffstore.models.plugin import import_file
from diffstore.preprocess import Preprocess
from diffstore.store import Store

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "examples" / "plugins"
RESNET, VIT_SMALL = f"py:{PLUGINS}/resnet50.py:factory", f"py:{PLUGINS}/vit.py:small"
SIZE = 32  # small inputs keep the tests fast; the architectures are the full ones
N = 64  # digits test samples the recipe test extracts

# Names and shapes read in the sources: torchvision/models/resnet.py (pytorch/vision f50e776b: conv1/bn1 stem,
# layerI.J Bottleneck conv1-3/bn1-3 with the stride on conv2, downsample = Sequential(conv1x1, BatchNorm), fc) and
# timm/models/vision_transformer.py + timm/layers/{attention,mlp,patch_embed}.py (huggingface/pytorch-image-models
# aa4b5850: cls_token, pos_embed, patch_embed.proj, blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2},
# norm, head). Parameter counts: torchvision's documented num_params of resnet50 (25557032) and vit_b_16
# (86567656, the same ViT-B/16 architecture as timm's vit_base_patch16_224).
TORCHVISION_RESNET50 = {
    "conv1.weight": (64, 3, 7, 7), "bn1.running_var": (64,), "layer1.0.downsample.0.weight": (256, 64, 1, 1),
    "layer1.2.conv1.weight": (64, 256, 1, 1), "layer2.0.conv2.weight": (128, 128, 3, 3),
    "layer3.5.bn3.weight": (1024,), "layer4.0.downsample.1.running_mean": (2048,),
    "layer4.2.conv3.weight": (2048, 512, 1, 1), "layer4.2.bn2.num_batches_tracked": (), "fc.weight": (1000, 2048),
    "fc.bias": (1000,),
}
TIMM_VIT_BASE = {
    "cls_token": (1, 1, 768), "pos_embed": (1, 197, 768), "patch_embed.proj.weight": (768, 3, 16, 16),
    "patch_embed.proj.bias": (768,), "blocks.0.norm1.weight": (768,), "blocks.0.attn.qkv.weight": (2304, 768),
    "blocks.0.attn.qkv.bias": (2304,), "blocks.5.attn.proj.weight": (768, 768), "blocks.7.norm2.bias": (768,),
    "blocks.11.mlp.fc1.weight": (3072, 768), "blocks.11.mlp.fc2.weight": (768, 3072), "norm.weight": (768,),
    "head.weight": (1000, 768), "head.bias": (1000,),
}


def plugin(network: str, seed=None, **env):
    """load_model(network) with the plugin's settings given as environment variables, as a user gives them."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, str(v))
        return load_model(network, random_init=seed)


@pytest.fixture(scope="module")
def resnet():
    return plugin(RESNET, 0, DIFFSTORE_RESNET50_SIZE=SIZE)


@pytest.fixture(scope="module")
def vit():
    return plugin(VIT_SMALL, 0, DIFFSTORE_VIT_SIZE=SIZE)


def images(n=4, size=SIZE):
    return torch.rand((n, 3, size, size), generator=torch.Generator().manual_seed(1)) * 2 - 1


def outputs(model, paths: list[str], x: torch.Tensor) -> dict:
    """The outputs of the modules at `paths` in one forward of `model` on images x (hooks removed after)."""
    out = {}
    handles = [model.module.get_submodule(p).register_forward_hook(lambda _m, _i, o, p=p: out.setdefault(p, o))
               for p in paths]
    try:
        with torch.no_grad():
            model.run(x, torch.zeros(len(x), dtype=torch.long), None)
    finally:
        for h in handles:
            h.remove()
    return out


def shapes(module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_resnet50_blocks_are_the_stem_and_16_bottlenecks_with_torchvisions_strides(resnet):
    stages = [("layer1", 3, 256, SIZE // 4), ("layer2", 4, 512, SIZE // 8), ("layer3", 6, 1024, SIZE // 16),
              ("layer4", 3, 2048, SIZE // 32)]
    expected = [("stem", 64, SIZE // 4)] + [(f"{s}.{j}", c, h) for s, n, c, h in stages for j in range(n)]
    assert [(b.name, b.channels, b.height) for b in resnet.blocks] == expected
    assert [b.index for b in resnet.blocks] == list(range(1, 18)) and resnet.num_timesteps == 1
    convs = [(name, m) for name, m in resnet.module.named_modules() if isinstance(m, torch.nn.Conv2d)]
    strided = [name for name, m in convs if m.stride == (2, 2)]
    assert strided == ["conv1", "layer2.0.conv2", "layer2.0.downsample.0", "layer3.0.conv2", "layer3.0.downsample.0",
                       "layer4.0.conv2", "layer4.0.downsample.0"]  # ResNet v1.5: the stride on the 3x3, as torchvision


def test_vit_layers_are_token_maps_over_the_patch_grid(vit):
    assert [(b.name, b.channels, b.height, b.width) for b in vit.blocks] == \
        [(f"layer{i}", 384, SIZE // 16, SIZE // 16) for i in range(1, 13)]
    seen = outputs(vit, ["blocks.4", "blocks.4.feature_map"], images())
    tokens, grid = seen["blocks.4"], SIZE // 16
    assert tokens.shape == (4, 1 + grid * grid, 384)  # the class token, then the patches in row-major order
    assert torch.equal(seen["blocks.4.feature_map"][:, :, 1, 0], tokens[:, 1 + grid])  # (row 1, col 0): patch `grid`


def test_state_dict_names_and_shapes_are_torchvisions_and_timms(resnet, vit):
    ours = shapes(resnet.module)
    assert {k: ours.get(k) for k in TORCHVISION_RESNET50} == TORCHVISION_RESNET50
    assert len(ours) == 320 and sum(p.numel() for p in resnet.module.parameters()) == 25_557_032
    assert not any(k.startswith(("layer1.1.downsample", "layer2.1.downsample")) for k in ours)
    vit_file = import_file(PLUGINS / "vit.py")
    with torch.device("meta"):  # ViT-B/16 without allocating it
        base = vit_file.maker(768, 12)({"pos_embed": torch.empty(1, 197, 768), "head.weight": torch.empty(1000, 768)})
    ours = shapes(base)
    assert {k: ours.get(k) for k in TIMM_VIT_BASE} == TIMM_VIT_BASE
    assert len(ours) == 152 and sum(p.numel() for p in base.parameters()) == 86_567_656
    small = shapes(vit.module)  # the same names at width 384; the TokenMap children add no state
    assert set(small) == set(ours) and small["blocks.3.attn.qkv.weight"] == (1152, 384)


def test_vit_attention_is_standard_multi_head_attention_with_qkv_as_in_proj():
    attention = import_file(PLUGINS / "vit.py").Attention(48, 6)
    reference = torch.nn.MultiheadAttention(48, 6, batch_first=True)
    reference.in_proj_weight.data, reference.in_proj_bias.data = attention.qkv.weight.data, attention.qkv.bias.data
    reference.out_proj.weight.data, reference.out_proj.bias.data = attention.proj.weight.data, attention.proj.bias.data
    x = torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(attention(x), reference(x, x, x, need_weights=False)[0], atol=1e-5, rtol=1e-5)


def test_run_normalises_images_as_the_networks_were_trained(resnet, vit):
    x, t = images(), torch.zeros(4, dtype=torch.long)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    with torch.no_grad():
        normalised = ((x + 1) / 2 - mean[:, None, None]) / std[:, None, None]
        assert torch.equal(resnet.run(x, t, None), resnet.module(normalised))
        assert torch.allclose(vit.run(x, t, None), vit.module(x), atol=1e-4)  # inception: mean = std = 0.5 is [-1, 1]
    # the normalisation is in the config, hence in the fingerprint (plugin.py hashes the config)
    assert vit.config["plugin"]["normalisation"] == "inception" and vit.config["plugin"]["std"] == [0.5] * 3
    assert resnet.config["plugin"]["mean"] == [0.485, 0.456, 0.406] and resnet.config["image_size"] == SIZE
    with pytest.raises(DiffstoreError, match="normalisation 'imagenett' is unknown: use inception or imagenet"):
        plugin(VIT_SMALL, 0, DIFFSTORE_VIT_NORM="imagenett")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_saved_resnet_state_dict_loads_strictly_and_gives_identical_features(resnet, tmp_path, suffix):
    file = tmp_path / f"resnet50{suffix}"
    state = resnet.module.state_dict()
    save_file(state, file) if suffix == ".safetensors" else torch.save(state, file)
    loaded = plugin(RESNET, DIFFSTORE_RESNET50_SIZE=SIZE, DIFFSTORE_RESNET50_WEIGHTS=file)
    assert loaded.name == "resnet50.factory" and loaded.weights_sha256 == sha256_files([file])
    x, t = images(), torch.zeros(4, dtype=torch.long)
    with torch.no_grad():
        assert torch.equal(loaded.run(x, t, None), resnet.run(x, t, None))


def test_weight_file_mismatches_are_named_and_pre_041_files_load(resnet, tmp_path):
    state = resnet.module.state_dict()
    # torchvision's 2017 files lack num_batches_tracked; a half-precision copy loads as float32
    old = {k: v.half() if v.is_floating_point() else v for k, v in state.items() if not k.endswith("batches_tracked")}
    torch.save(old, tmp_path / "old.pth")
    loaded = plugin(RESNET, DIFFSTORE_RESNET50_SIZE=SIZE, DIFFSTORE_RESNET50_WEIGHTS=tmp_path / "old.pth")
    assert loaded.module.layer4[2].bn3.num_batches_tracked.item() == 0
    assert loaded.module.fc.weight.dtype == torch.float32
    assert torch.equal(loaded.module.layer3[1].conv2.weight, resnet.module.layer3[1].conv2.weight.half().float())
    renamed = dict(state)
    renamed["layer4.2.conv3.weights"] = renamed.pop("layer4.2.conv3.weight")
    torch.save(renamed, tmp_path / "renamed.pth")
    with pytest.raises(DiffstoreError, match=r"missing keys: layer4\.2\.conv3\.weight; unexpected keys: "
                                             r"layer4\.2\.conv3\.weights"):
        plugin(RESNET, DIFFSTORE_RESNET50_WEIGHTS=tmp_path / "renamed.pth")
    with pytest.raises(DiffstoreError, match=r"DIFFSTORE_RESNET50_WEIGHTS=FILE.*--random-init"):
        plugin(RESNET)
    torch.save({"model": state}, tmp_path / "wrapped.pth")
    with pytest.raises(DiffstoreError, match="plain state_dict"):
        plugin(RESNET, DIFFSTORE_RESNET50_WEIGHTS=tmp_path / "wrapped.pth")


def test_a_headless_vit_file_loads_and_its_position_embedding_is_resampled_to_the_grid(vit, tmp_path):
    state = {k: v for k, v in vit.module.state_dict().items() if not k.startswith("head.")}  # DINO/MAE files
    save_file(state, tmp_path / "dino.safetensors")
    loaded = plugin(VIT_SMALL, DIFFSTORE_VIT_SIZE=SIZE, DIFFSTORE_VIT_WEIGHTS=tmp_path / "dino.safetensors")
    assert isinstance(loaded.module.head, torch.nn.Identity) and loaded.config["plugin"]["num_classes"] == 0
    last = "blocks.11.feature_map"
    assert torch.equal(outputs(loaded, [last], images())[last], outputs(vit, [last], images())[last])
    pos = vit.module.position(SIZE // 16)  # 14 x 14 trained grid -> 2 x 2, the class token's entry kept
    assert pos.shape == (1, 5, 384) and torch.equal(pos[:, 0], vit.module.pos_embed[:, 0])


def stored(store: Store, model: str) -> dict:
    return {k.block: store.features(k).read(slice(0, N)) for k in store.feature_keys() if k.model == model}


def test_recipe_extracts_both_models_and_draws_the_cross_model_matrix(tmp_path):
    recipe = import_file(ROOT / "pipelines" / "cka_networks.py")
    url = str(tmp_path / "s.zarr")
    result = recipe.main(["--store", url, "--out", str(tmp_path / "out"), "--image-size", str(SIZE),
                          "--limit", str(N), "--quiet"])
    payload = json.loads(Path(result["json"]).read_text())
    m = np.array(payload["matrix"], dtype=float)
    assert m.shape == (15, 17) == tuple(result["shape"]) and Path(result["png"]).stat().st_size > 10_000
    assert np.all((m > -0.1) & (m < 1.1)) and payload["method"] == "unbiased" and payload["n"] == N
    assert "RANDOM weights (seed 0)" in payload["title"]
    assert [c["block_name"] for c in payload["cols"]][:3] == ["stem", "layer1.0", "layer1.1"]

    net = "resnet50-32px.random-init-s0"
    keys = ",".join(f"model={net}/b={b}/p=1" for b in (1, 9, 17))
    same = ds.cka(url, a=keys, b=keys, limit=N, save=False, show_progress=False).values
    assert np.allclose(np.diag(same), 1.0, atol=1e-9)
    # A cell equals CKA of the plugin's own forward (hooks, not the extractor), pooled here (float16 storage: 1e-3)
    model = plugin(RESNET, 0, DIFFSTORE_RESNET50_SIZE=SIZE)
    store = Store.open(url, mode="r")
    assert np.array_equal(store.split("digits", "test").ids, load_split("digits", "test").ids)  # the whole order
    x = Preprocess(SIZE, 3)(load_split("digits", "test").load(np.arange(N)))
    direct = {n: F.adaptive_avg_pool2d(o, 1).numpy() for n, o in outputs(model, ["layer2.0", "layer4.2"], x).items()}
    arrays = stored(store, net)
    np.testing.assert_allclose(arrays[5].astype(np.float32), direct["layer2.0"], rtol=2e-3, atol=2e-3)
    assert cka(arrays[5], arrays[17]) == pytest.approx(cka(direct["layer2.0"], direct["layer4.2"]), abs=1e-3)
