"""Every backend through `load_model`: the random-init control, and the shipped default model against it."""

import numpy as np
import pytest
import torch
from scipy.stats import binomtest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from conftest import ADM_SPECS, subset
from diffstore.datasets import load_split
from diffstore.extract import extract_features, plan_extraction
from diffstore.models import load_model
from diffstore.preprocess import Preprocess
from diffstore.store import Store


def backend_spec(request, backend: str) -> tuple[str, dict]:
    """(spec, load_model options) of a tiny model of each backend."""
    if backend == "diffusers":
        return str(request.getfixturevalue("tiny_unet_dir")), {}
    if backend == "plugin":
        return "py:" + request.getfixturevalue("unet_spec"), {}
    if backend == "sd":
        return f"sd:{request.getfixturevalue('sd_folder')}", {}
    if not ADM_SPECS.is_dir():
        pytest.skip("guided-diffusion specs (shared/specs/adm) not present")
    tiny = ADM_SPECS / "tiny"
    return f"adm:{tiny / 'tiny-uncond.safetensors'}", {"adm_config": str(tiny / "tiny-uncond.json")}


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.module.parameters()])


@pytest.mark.parametrize("backend", ["diffusers", "plugin", "sd", "adm"])
def test_random_init_twin_is_seeded_named_after_the_model_and_keyed_apart(request, backend):
    spec, kw = backend_spec(request, backend)
    trained = load_model(spec, **kw)
    r1, r1_again, r2 = (load_model(spec, random_init=s, **kw) for s in (1, 1, 2))
    assert r1.name == f"{trained.name}.random-init-s1" == r1_again.name and r2.name.endswith(".random-init-s2")
    assert r1.weights_sha256 == "random-init:1" and trained.weights_sha256 != r1.weights_sha256
    assert len({trained.fingerprint, r1.fingerprint, r2.fingerprint}) == 3 and r1.fingerprint == r1_again.fingerprint
    assert r1.blocks.to_list() == trained.blocks.to_list()  # same architecture
    w_trained, w1, w1_again, w2 = map(flat_params, (trained, r1, r1_again, r2))
    assert torch.equal(w1, w1_again) and not torch.equal(w1, w2) and not torch.equal(w1, w_trained)


def test_shipped_model_features_beat_its_random_init_twin_and_pixels(tmp_path):
    """README's claim about the embedded default model, measured with a converged linear probe (logistic
    regression on standardised features) at t=50, mid block, pool 2: 720 digits train rows, all 360 test rows.
    Each comparison is an exact sign test on the test images one side gets right and the other wrong
    (measured: 21 vs 6 over the twin, 15 vs 2 over pixels)."""
    train, test = subset(load_split("digits", "train"), 720), load_split("digits", "test")
    store = Store.open(str(tmp_path / "s.zarr"))
    correct = {}
    for random_init in (None, 0):
        model = load_model("default", random_init=random_init)
        x = {}
        for split in (train, test):
            plan = plan_extraction(store, model, split, t="50", blocks="mid", pools="2")
            extract_features(plan, batch_size=256, show_progress=False)
            x[split.split] = next(iter(plan.arrays.values())).read().reshape(len(split), -1).astype(np.float32)
        correct[model.name] = probe(x["train"], train.labels, x["test"], test.labels)
    pixels = {s.split: Preprocess(16, 1)(s.load(np.arange(len(s)))).flatten(1).numpy() for s in (train, test)}
    correct["pixels"] = probe(pixels["train"], train.labels, pixels["test"], test.labels)
    ours = correct.pop("digits-ddpm")
    assert set(correct) == {"digits-ddpm.random-init-s0", "pixels"}
    for name, other in correct.items():
        wins, losses = int((ours & ~other).sum()), int((~ours & other).sum())
        assert ours.mean() > other.mean() and binomtest(wins, wins + losses, alternative="greater").pvalue < 0.05, \
            (name, ours.mean(), other.mean(), wins, losses)


def probe(x_train, y_train, x_test, y_test) -> np.ndarray:
    """Per test sample: does a converged logistic-regression probe classify it right?"""
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    return clf.fit(x_train, y_train).predict(x_test) == y_test
