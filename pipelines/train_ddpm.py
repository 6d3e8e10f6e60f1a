"""Train a small DDPM (diffusers UNet2DModel, epsilon prediction, linear schedule, T = 1000) on a train split.

    python pipelines/train_ddpm.py    # the shipped default: digits -> diffstore/models/default
    python pipelines/train_ddpm.py --dataset fashion-mnist --data-root DIR --size 28 --out data/models/fashion-ddpm

Only the train split is ever read. Fixed seed; the saved folder is a plain diffusers model folder (config.json,
diffusion_pytorch_model.safetensors in float16, scheduler_config.json) plus train_record.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel

from diffstore.datasets import load_split
from diffstore.models import DEFAULT_DIR
from diffstore.preprocess import Preprocess
from diffstore.progress import progress, stderr


def build_unet(size: int, channels: int) -> UNet2DModel:
    """Three resolutions (size, size/2, size/4), attention at size/2: ~1.1M parameters."""
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=(32, 64, 64),
                       layers_per_block=1, norm_num_groups=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--channels", type=int, default=None, help="1 or 3; default: 3 for cifar10, else 1")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(DEFAULT_DIR))
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (does not change the result's recipe)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    channels = args.channels or (3 if args.dataset == "cifar10" else 1)
    split = load_split(args.dataset, "train", args.data_root)
    x_all = Preprocess(size=args.size, channels=channels)(split.load(np.arange(len(split))))
    stderr.print(f"training on {args.dataset}/train: {tuple(x_all.shape)}")

    unet = build_unet(args.size, channels)
    ema = build_unet(args.size, channels)
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    abar = sched.alphas_cumprod
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = max(1, min(100, args.steps // 10))
    lr_at = lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / args.steps))  # noqa: E731
    sched_lr = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    g = torch.Generator().manual_seed(args.seed)
    losses, t0 = [], time.time()
    with progress("step") as bar:
        task = bar.add_task("train", total=args.steps)
        for step in range(args.steps):
            idx = torch.randint(len(x_all), (args.batch_size,), generator=g)
            x0 = x_all[idx]
            t = torch.randint(1000, (args.batch_size,), generator=g)
            eps = torch.randn(x0.shape, generator=g)
            a = abar[t].view(-1, 1, 1, 1)
            loss = F.mse_loss(unet(a.sqrt() * x0 + (1 - a).sqrt() * eps, t).sample, eps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched_lr.step()
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), unet.parameters()):
                    pe.lerp_(p, 1 - args.ema)
            losses.append(loss.item())
            bar.update(task, advance=1, description=f"train loss {np.mean(losses[-100:]):.4f}")
            if (step + 1) % 100 == 0 and not stderr.is_terminal:
                stderr.log(f"step {step + 1}/{args.steps} loss {np.mean(losses[-100:]):.4f}")
    minutes = (time.time() - t0) / 60

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ema.half().save_pretrained(out, safe_serialization=True)
    sched.save_config(out)
    record = {"dataset": args.dataset, "split": "train", "n_train": len(split), "size": args.size, "channels": channels,
              "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "ema": args.ema, "seed": args.seed,
              "final_loss_last100": float(np.mean(losses[-100:])), "minutes": round(minutes, 2),
              "params": sum(p.numel() for p in unet.parameters()), "torch_threads": torch.get_num_threads()}
    (out / "train_record.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
