"""RepFusion's two stages, from the store alone (the U-Net is never loaded here):

    distill    policy + distillation: pi(t|x) picks a grid point per image, the student (randomly
               initialised) regresses the stored teacher target z(t) of that image and view; the policy is
               rewarded by the frozen decoder g (policy.py). No labels reach the student.
    finetune   supervised training of the distilled student, and, in the same report, of a randomly
               initialised student with the same seed, epochs, data order and views (the no-distillation
               baseline); test accuracy of both.

Images come from the dataset loader through the same preprocessing and view bank as the targets (recorded in
the targets' attrs); targets are standardised per (t, channel) so every t regresses on one scale. Weights
are stored inside the store as one flat float32 row per run (safe: no pickle), next to the JSON result.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Categorical

from ..datasets import load_split
from ..device import pick_device
from ..errors import DiffstoreError
from ..key import fingerprint
from ..preprocess import Preprocess
from ..progress import progress
from ..store import Store
from .config import DistillConfig, FinetuneConfig
from .losses import NEEDS_MAP, Distiller
from .policy import TimePolicy, entropy_weight, fit_decoder, mean_distribution, reinforce_loss, reward
from .students import build_student
from .targets import View, open_targets, target_paths, view_images

KIND = "repfusion"  # results/repfusion/{name}


# --- data: the student's images, aligned row for row with the stored targets ---------------------------------

def load_images(attrs: dict, split: str | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """([V, N, C, S, S] float16 images per view of the targets' bank, labels [N]); split=None is the targets'
    own split (checked against the stored ids), another split gets the identity view only."""
    d = attrs["dataset"]
    data = load_split(d["name"], split or d["loader_split"], d["root"], limit=None if split else d["limit"])
    if split is None and data.ids_sha256() != d["ids_sha256"]:
        raise DiffstoreError(f"the {d['name']}/{d['split']} split loaded now has other sample ids than the targets "
                             f"were computed on; pass the same data root ({d['root']}) or recompute the targets")
    pre = Preprocess(**attrs["preprocess"])
    views = [View(**v) for v in attrs["views"]] if split is None else [View()]
    rows = np.arange(len(data))
    return torch.stack([view_images(data, rows, pre, v).half() for v in views]), data.labels


def batches(n: int, batch_size: int, gen: torch.Generator):
    return torch.randperm(n, generator=gen).split(batch_size)


# --- weights inside the store ------------------------------------------------------------------------------

def save_weights(store: Store, path: str, modules: dict[str, nn.Module], attrs: dict) -> None:
    tensors = [(f"{m}.{k}", v) for m, mod in modules.items() for k, v in mod.state_dict().items()]
    flat = torch.cat([v.detach().float().cpu().flatten() for _, v in tensors]).numpy()
    index, offset = [], 0
    for name, v in tensors:
        index.append([name, list(v.shape), str(v.dtype).removeprefix("torch."), offset])
        offset += v.numel()
    arr = store.create(path, fingerprint([attrs, index]), {**attrs, "tensors": index}, (len(flat),), 1, 1, "float32")
    if not arr.complete:
        arr.write_shard(0, flat[None])


def load_weights(store: Store, path: str, modules: dict[str, nn.Module]) -> None:
    arr = store.open_array(path)
    flat = torch.from_numpy(arr.read(0))
    states: dict[str, dict] = {m: {} for m in modules}
    for name, shape, dtype, offset in arr.attrs["tensors"]:
        m, k = name.split(".", 1)
        if m in states:
            states[m][k] = flat[offset:offset + int(np.prod(shape))].reshape(shape).to(getattr(torch, dtype))
    for m, mod in modules.items():
        mod.load_state_dict(states[m])


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


def run_results(store: Store, stage: str) -> list[dict]:
    return sorted((r for r in store.results(KIND) if r.get("stage") == stage), key=lambda r: r["created"])


# --- stage 1: policy + distillation --------------------------------------------------------------------------

@dataclass
class TargetBank:
    """The stored targets in RAM (float16: Fashion-MNIST x 20 t is ~1 GB), standardised per (t, channel) on read
    so every t regresses on one scale."""

    z: torch.Tensor  # [N, V, K, C]
    mean: torch.Tensor  # [K, C]
    std: torch.Tensor  # [K, C]
    maps: torch.Tensor | None  # [N, V, K, C, H, W], for the losses that need them
    device: torch.device

    @classmethod
    def load(cls, store: Store, arr, with_maps: bool, device) -> "TargetBank":
        z = torch.from_numpy(arr.read())
        per_t = [z[:, :, i].float() for i in range(z.shape[2])]
        mean = torch.stack([zt.mean((0, 1)) for zt in per_t])
        std = torch.stack([zt.std((0, 1)) for zt in per_t]).clamp_min(1e-6)
        maps = None
        if with_maps:
            base = arr.path.rsplit("/", 1)[0]
            if f"{base}/map" not in target_paths(store, "map"):
                raise DiffstoreError(f"this loss needs the teacher's spatial maps, and {base} has none: "
                                     "run `diffstore repfusion targets --maps` with the same options")
            maps = torch.from_numpy(open_targets(store, f"{base}/map").read())
        return cls(z, mean, std, maps, device)

    def vectors(self, rows, v, t_index) -> torch.Tensor:
        return ((self.z[rows, v, t_index].float() - self.mean[t_index]) / self.std[t_index]).to(self.device)

    def spatial(self, rows, v, t_index) -> torch.Tensor | None:
        return None if self.maps is None else self.maps[rows, v, t_index].float().to(self.device)


def fit_reward_decoder(bank: TargetBank, y: torch.Tensor, num_classes: int, steps: int, gen: torch.Generator, device):
    """g fitted on random (sample, view, t) targets, and the reward's landscape: mean -CE and accuracy of g
    at each t (identity view, training images)."""
    n, n_views, k, c = bank.z.shape

    def batches():
        for _ in range(steps):
            rows = torch.randint(n, (512,), generator=gen)
            v, t_index = torch.randint(n_views, (512,), generator=gen), torch.randint(k, (512,), generator=gen)
            yield bank.vectors(rows, v, t_index), y[rows].to(device)

    g = fit_decoder(batches(), c, num_classes, device=device)
    reward_by_t, acc_by_t = [], []
    for i in range(k):
        zi = bank.vectors(torch.arange(n), torch.zeros(n, dtype=torch.long), torch.full((n,), i))
        reward_by_t.append(reward(g, zi, y.to(device)).mean().item())
        with torch.no_grad():
            acc_by_t.append((g(zi).argmax(1).cpu() == y).float().mean().item())
    return g, reward_by_t, acc_by_t


def distill(cfg: DistillConfig, show_progress: bool = True) -> dict:
    store = Store.open(cfg.store, "a")
    arr = open_targets(store, cfg.targets)
    attrs, base = arr.attrs, arr.path.rsplit("/", 1)[0]
    run = cfg.run_name(attrs["fingerprint"])
    done = [r for r in run_results(store, "distill") if r["run"] == run]
    if done and store.open_array(done[-1]["weights"]).complete:
        return {**done[-1], "cached": True}
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    started = time.perf_counter()
    bank = TargetBank.load(store, arr, with_maps=cfg.loss in NEEDS_MAP, device=device)
    n, n_views, k, c = bank.z.shape
    y = torch.from_numpy(store.split(attrs["dataset"]["name"], attrs["dataset"]["split"]).labels[:n])  # its rows
    num_classes = len(attrs["dataset"]["class_names"])
    images, _ = load_images(attrs)
    g, reward_by_t, decoder_acc = fit_reward_decoder(bank, y, num_classes, cfg.decoder_steps, gen, device)

    in_channels = images.shape[2]
    student = build_student(cfg.student, num_classes, in_channels, cfg.width).to(device)
    distiller = Distiller(cfg.loss, student.feature_channels, c).to(device)
    policy = TimePolicy(in_channels, k).to(device)
    steps = cfg.epochs * -(-n // cfg.batch_size)
    opt = torch.optim.SGD([*student.parameters(), *distiller.parameters()], lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=steps, pct_start=0.15)
    policy_opt = torch.optim.Adam(policy.parameters(), lr=cfg.policy_lr)
    history, step = [], 0
    with progress("step", disable=not show_progress) as bar:
        task = bar.add_task(f"distill {cfg.student}/{cfg.loss} on {base}", total=steps)
        for epoch in range(cfg.epochs):
            sums = np.zeros(4)  # images, distill loss, reward, policy entropy (sums over the epoch)
            for rows in batches(n, cfg.batch_size, gen):
                v = torch.randint(n_views, (len(rows),), generator=gen)
                x = images[v, rows].float().to(device)
                logits = policy(x)
                t_index = Categorical(logits=logits).sample().cpu()
                zb = bank.vectors(rows, v, t_index)
                r = reward(g, zb, y[rows].to(device))
                lam = entropy_weight(step, steps, cfg.entropy)
                policy_loss = reinforce_loss(logits, t_index.to(device), r, lam, cfg.baseline)
                policy_opt.zero_grad()
                policy_loss.backward()
                policy_opt.step()
                loss = distiller(student.features(x), zb, bank.spatial(rows, v, t_index))
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                entropy = Categorical(logits=logits.detach()).entropy().sum().item()
                sums += [len(rows), loss.item() * len(rows), r.sum().item(), entropy]
                bar.advance(task)
            mean = sums[1:] / sums[0]
            history.append({"epoch": epoch + 1, "distill_loss": float(mean[0]), "reward": float(mean[1]),
                            "policy_entropy": float(mean[2])})

    dist = mean_distribution(policy, images[0].float().to(device)).cpu().tolist()
    ts = attrs["t_grid"]
    weights = f"repfusion/runs/{run}"
    save_weights(store, weights, {"student": student, "distiller": distiller, "policy": policy},
                 {"run": run, "targets": base, "targets_fingerprint": attrs["fingerprint"], "seed": cfg.seed})
    result = {"stage": "distill", "run": run, "targets": base, "targets_fingerprint": attrs["fingerprint"],
              "weights": weights, "config": {f: v for f, v in dataclasses.asdict(cfg).items() if f != "store"},
              "student_channels": student.feature_channels, "teacher_channels": c, "in_channels": in_channels,
              "num_classes": num_classes, "t_grid": ts, "distribution": dist,
              "expected_t": float(np.dot(dist, ts)), "mode_t": ts[int(np.argmax(dist))],
              "reward_by_t": reward_by_t, "decoder_acc_by_t": decoder_acc, "history": history,
              "seconds": time.perf_counter() - started, "device": str(device), "created": now()}
    store.put_result(KIND, run, result)
    return result


# --- stage 2: supervised fine-tuning, with the no-distillation baseline -------------------------------------

def supervised(student: nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: FinetuneConfig, device,
               desc: str, show_progress: bool) -> list[dict]:
    """Cross-entropy training over random views of the bank; the data order and views depend only on cfg.seed."""
    gen = torch.Generator().manual_seed(cfg.seed)
    n_views, n = images.shape[:2]
    steps = cfg.epochs * -(-n // cfg.batch_size)
    opt = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=steps, pct_start=0.15)
    history = []
    student.train()
    with progress("step", disable=not show_progress) as bar:
        task = bar.add_task(desc, total=steps)
        for epoch in range(cfg.epochs):
            total, correct, loss_sum = 0, 0, 0.0
            for rows in batches(n, cfg.batch_size, gen):
                v = torch.randint(n_views, (len(rows),), generator=gen)
                x, yb = images[v, rows].float().to(device), labels[rows].to(device)
                logits = student(x)
                loss = F.cross_entropy(logits, yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total += len(rows)
                correct += int((logits.argmax(1) == yb).sum())
                loss_sum += loss.item() * len(rows)
                bar.advance(task)
            history.append({"epoch": epoch + 1, "loss": loss_sum / total, "train_acc": correct / total})
    return history


@torch.no_grad()
def accuracy(student: nn.Module, images: torch.Tensor, labels: torch.Tensor, device, batch_size: int = 512) -> float:
    student.eval()
    correct = sum(int((student(x.float().to(device)).argmax(1).cpu() == yb).sum())
                  for x, yb in zip(images.split(batch_size), labels.split(batch_size)))
    return correct / len(labels)


def finetune(cfg: FinetuneConfig, show_progress: bool = True) -> dict:
    store = Store.open(cfg.store, "a")
    runs = run_results(store, "distill")
    matching = [r for r in runs if cfg.run in (None, r["run"])]
    if not matching:
        known = f" (runs: {', '.join(r['run'] for r in runs)})" if runs else ""
        raise DiffstoreError(f"no distill run {cfg.run or ''} in {store.url}{known}: run "
                             "`diffstore repfusion train` first")
    trained = matching[-1]
    attrs = store.open_array(f"{trained['targets']}/pooled").attrs
    device = pick_device(cfg.device)
    started = time.perf_counter()
    images, _ = load_images(attrs)
    labels = torch.from_numpy(store.split(attrs["dataset"]["name"], attrs["dataset"]["split"]).labels[:len(images[0])])
    test_images, test_labels = load_images(attrs, "test")
    test_images, test_labels = test_images[0], torch.from_numpy(test_labels)
    tc = trained["config"]
    results = {}
    for name in ("distilled", "scratch"):
        torch.manual_seed(cfg.seed)  # the same initialisation draw for both; distilled then loads its weights
        student = build_student(tc["student"], trained["num_classes"], trained["in_channels"], tc["width"])
        if name == "distilled":
            load_weights(store, trained["weights"], {"student": student})
        student.to(device)
        history = supervised(student, images, labels, cfg, device, f"finetune {name} on {trained['targets']}",
                             show_progress)
        results[name] = {"test_acc": accuracy(student, test_images, test_labels, device), "history": history}
    result = {"stage": "finetune", "run": trained["run"], "targets": trained["targets"], "student": tc["student"],
              "loss": tc["loss"], "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "store"},
              "distilled_acc": results["distilled"]["test_acc"], "scratch_acc": results["scratch"]["test_acc"],
              "gain": results["distilled"]["test_acc"] - results["scratch"]["test_acc"],
              "n_train": len(labels), "n_test": len(test_labels),
              "history": {name: r["history"] for name, r in results.items()},
              "seconds": time.perf_counter() - started, "device": str(device), "created": now()}
    store.put_result(KIND, f"{trained['run']}.finetune", result)
    return result
