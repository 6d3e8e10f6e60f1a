"""py: plugin backend: the factory contract, identity, extraction, and every refusal naming what is wrong."""

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import install_plugin, subset
from diffstore.cka import cka
from diffstore.datasets import load_split
from diffstore.errors import DiffstoreError
from diffstore.extract import extract_features, forward_blocks, plan_extraction
from diffstore.key import sha256_files
from diffstore.models import load_model
from diffstore.models.diffusers_unet import load_unet2d
from diffstore.models.plugin import load_plugin
from diffstore.noise import add_noise, noise
from diffstore.preprocess import Preprocess
from diffstore.store import Store


def x_batch(n, channels, size):
    return torch.rand((n, channels, size, size), generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_unet_plugin_equals_the_diffusers_adapter(unet_spec, tmp_path):
    plugin = load_model(f"py:{unet_spec}")
    plugin.module.save_pretrained(tmp_path / "native")
    native = load_unet2d(str(tmp_path / "native"))
    assert plugin.blocks.to_list() == native.blocks.to_list()
    assert plugin.blocks.mid == native.blocks.mid and plugin.num_timesteps == 1000
    x0, blocks = x_batch(3, 1, 8), [b.index for b in plugin.blocks]
    a = forward_blocks(plugin, x0, 90, [0, 1, 2], None, 0, 1, "noised", blocks, ["full"])
    b = forward_blocks(native, x0, 90, [0, 1, 2], None, 0, 1, "noised", blocks, ["full"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_weights_loaded_by_the_factory_are_the_fingerprinted_files(unet_spec):
    loaded, seeded = load_plugin(unet_spec), load_plugin(unet_spec, random_init=7)
    assert loaded.weights_sha256 == sha256_files([Path(unet_spec.rsplit(":", 1)[0]).with_suffix(".safetensors")])
    x, t = x_batch(2, 1, 8), torch.tensor([5, 500])
    assert torch.equal(loaded.run(x, t, None), seeded.run(x, t, None))  # the file holds exactly those weights
    assert loaded.name == "tiny_unet.factory"


def test_editing_the_plugin_file_changes_the_fingerprint(tmp_path):
    unet_spec = install_plugin("tiny_unet", tmp_path)
    before = load_plugin(unet_spec).fingerprint
    file = Path(unet_spec.rsplit(":", 1)[0])
    file.write_text(file.read_text() + "\n# the code is the architecture\n")
    assert load_plugin(unet_spec).fingerprint != before


def direct_block(model, split, t: int, block: int) -> np.ndarray:
    """One block's map, pool 2, from a plain forward with a hook (noise added here), not through the extractor."""
    x = Preprocess(model.image_size, model.image_channels)(split.load(np.arange(len(split))))
    if t > 0:
        x = add_noise(x, noise(0, split.ids, t, 0, tuple(x.shape[1:])), float(model.alphas_cumprod[t]))
    out = {}
    handle = model.module.get_submodule(model.blocks[block].module).register_forward_hook(
        lambda _m, _i, o: out.setdefault("map", o))
    try:
        with torch.no_grad():
            model.run(x, torch.full((len(x),), t), None)
    finally:
        handle.remove()
    return F.adaptive_avg_pool2d(out["map"], 2).numpy()


def test_non_diffusion_cnn_extracts_at_t0_and_compares_by_cka(resnet_spec, unet_spec, tmp_path):
    resnet, unet = load_plugin(resnet_spec), load_plugin(unet_spec)
    assert [(b.name, b.channels, b.height) for b in resnet.blocks] == [("stem", 8, 16), ("layer1", 8, 16),
                                                                      ("layer2", 16, 8), ("layer3", 32, 4)]
    assert resnet.num_timesteps == 1
    split = subset(load_split("digits", "test"), 40)
    store = Store.open(str(tmp_path / "f.zarr"), mode="a")
    with pytest.raises(DiffstoreError, match=r"\[0, 0\]"):
        plan_extraction(store, resnet, split, t="1", blocks="all", pools="1")
    for model, t, blocks in ((resnet, "0", "layer2,layer3"), (unet, "50", "mid")):
        extract_features(plan_extraction(store, model, split, t=t, blocks=blocks, pools="2"), show_progress=False)
    arrays = {(k.model, k.block): store.features(k).read() for k in store.feature_keys()}
    assert set(arrays) == {("tiny_resnet.factory", 3), ("tiny_resnet.factory", 4),
                           ("tiny_unet.factory", unet.blocks.mid)}
    layer2, layer3 = arrays[("tiny_resnet.factory", 3)], arrays[("tiny_resnet.factory", 4)]
    mid = arrays[("tiny_unet.factory", unet.blocks.mid)]
    # the stored CKA values are those of the networks' own forwards (float16 storage: 1e-3)
    direct3, direct_mid = direct_block(resnet, split, 0, 4), direct_block(unet, split, 50, unet.blocks.mid)
    assert cka(layer3, mid) == pytest.approx(cka(direct3, direct_mid), abs=1e-3)
    assert cka(layer2, layer3) == pytest.approx(cka(direct_block(resnet, split, 0, 3), direct3), abs=1e-3)
    assert cka(layer3, mid) < 0.95 and abs(cka(layer3, mid) - cka(layer2, layer3)) > 0.01  # distinct values


def write_plugin(tmp_path, body: str, name="bad.py") -> str:
    (tmp_path / name).write_text(textwrap.dedent("""
        import torch
        net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Flatten())
        GOOD = dict(module=net, blocks=["0"], alphas_cumprod=[1.0], image_size=8, image_channels=1, weight_files=[],
                    run=lambda x, t, labels: net(x))
    """) + textwrap.dedent(body))
    return f"{tmp_path / name}:factory"


@pytest.mark.parametrize("body, random_init, message", [
    ("def other(): pass", None, "no function 'factory'.*other"),
    ("def factory(): return {k: v for k, v in GOOD.items() if k not in ('blocks', 'image_size')}", None,
     "without blocks, image_size"),
    ("def factory(): return dict(GOOD, weights_files=[])", None, r"weights_files \(did you mean weight_files\?\)"),
    ("def factory(): return GOOD", None, "'weight_files' is empty"),
    ("def factory(): return dict(GOOD, weight_files=['nowhere.pt'])", None, "weight files not found: nowhere.pt"),
    ("def factory(): return dict(GOOD, blocks=['conv9'])", 0, "'conv9', which is not a submodule"),
    ("def factory(): return dict(GOOD, blocks=['0', '1'])", 0, r"\[B, C, H, W\]"),  # Flatten's output is 2-D
    ("def factory(): return dict(GOOD, image_channels=3)", 0, "dummy forward on a \\[1, 3, 8, 8\\] input failed"),
    ("def factory(): return dict(GOOD, alphas_cumprod=[1.0, 0.0])", 0, "in \\(0, 1\\]"),
    ("def factory(): return dict(GOOD, config={'x': object()})", 0, "plain JSON"),
    ("def factory(): return GOOD", 0, "--random-init needs factory\\(random_init=None\\)"),
    ("def factory(): raise OSError('checkpoint is corrupt')", None,
     "factory .* failed: OSError: checkpoint is corrupt"),
    ("import not_a_module\ndef factory(): pass", None, "failed to import: ModuleNotFoundError"),
])
def test_bad_plugin_names_what_is_wrong(tmp_path, body, random_init, message):
    if random_init is not None and "random_init" not in message:
        body = body.replace("def factory()", "def factory(random_init=None)")
    with pytest.raises(DiffstoreError, match=message):
        load_plugin(write_plugin(tmp_path, body), random_init=random_init)


def test_random_init_factory_with_no_weight_files_loads(tmp_path):
    model = load_plugin(write_plugin(tmp_path, "def factory(random_init=None): return GOOD"), random_init=3)
    assert [b.name for b in model.blocks] == ["0"] and model.weights_sha256 == "random-init:3"


@pytest.mark.parametrize("spec, message",
                         [("nowhere.py:factory", "not found"), ("model.py", "py:path/to/file.py:factory")])
def test_bad_plugin_spec_names_the_expected_form(spec, message):
    with pytest.raises(DiffstoreError, match=message):
        load_model(f"py:{spec}")


def test_cli_blocks_lists_the_plugin_table(resnet_spec):
    from typer.testing import CliRunner

    from diffstore.cli import app

    out = CliRunner().invoke(app, ["blocks", "--model", f"py:{resnet_spec}", "--json"])
    assert out.exit_code == 0, out.output
    assert [(r["name"], r["C"], r["H"]) for r in json.loads(out.stdout)] == [("stem", 8, 16), ("layer1", 8, 16),
                                                                              ("layer2", 16, 8), ("layer3", 32, 4)]
