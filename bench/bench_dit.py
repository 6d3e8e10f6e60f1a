"""DiT cost: FLOPs per image to each transformer block of DiT-XL/2-256 and of its VAE encoder (counted), and
images/s of a small DiT full vs early exit (timed).

FLOPs are counted by torch.utils.flop_counter.FlopCounterMode on one meta-device forward (no weights, no memory),
the running total read by a hook on each block, as bench_adm.py does for ADM; only matmuls/convolutions/attention
are counted (2 FLOPs per multiply-add; the DiT paper's 118.6 Gflops for XL/2 count multiply-adds). The extractor
encodes each batch's latents once for all t of its unit (extract/pipeline.py): the VAE encoder's cost is per image,
the transformer's per (image, t).

Throughput: DiT-S/2's width and depth (384, 12 layers, 6 heads) on a 16x16 latent (64 tokens), seeded random
weights, CPU, micro-batch 16 (the extractor's): model.run (full forward) vs forward_blocks to layer 3 and 6, side
by side in interleaved rounds, best of 7 each.
"""

import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
from timing import best_of  # noqa: E402

from diffstore.extract import forward_blocks  # noqa: E402
from diffstore.models.dit import load_dit  # noqa: E402

XL = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28, sample_size=32,
          patch_size=2, num_embeds_ada_norm=1000)
SMALL = dict(XL, num_attention_heads=6, attention_head_dim=64, num_layers=12, sample_size=16)
ROUNDS = 7
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
              layers_per_block=2,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=256)


def flops_to_each_block() -> tuple[list[float], float, float]:
    from diffusers import AutoencoderKL, DiTTransformer2DModel

    with torch.device("meta"):
        net, vae = DiTTransformer2DModel(**XL), AutoencoderKL(**SD_VAE)
        x, t, y = torch.zeros(1, 4, 32, 32), torch.zeros(1, dtype=torch.long), torch.full((1,), 1000)
        images = torch.zeros(1, 3, 256, 256)
    counter, to_block = FlopCounterMode(display=False), []
    for block in net.transformer_blocks:
        block.register_forward_hook(lambda *_: to_block.append(counter.get_total_flops()))
    with counter, torch.no_grad():
        net(x, t, class_labels=y)
    total = counter.get_total_flops()
    with FlopCounterMode(display=False) as vae_counter, torch.no_grad():
        vae.encode(images)
    return to_block, total, vae_counter.get_total_flops()


def throughput() -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, DiTTransformer2DModel

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        DiTTransformer2DModel(**SMALL).save_pretrained(Path(tmp) / "transformer")
        AutoencoderKL(latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4,
                      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                      ).save_pretrained(Path(tmp) / "vae")  # not timed: the forward runs on latents
        DDIMScheduler().save_pretrained(Path(tmp) / "scheduler")
        model = load_dit(tmp, random_init=0)
    z, ids, n = torch.randn(16, 4, 16, 16), list(range(16)), 16
    t = torch.full((n,), 200)
    runs = {"full": lambda: model.run(z, t, None)}
    runs.update({b: (lambda b=b: forward_blocks(model, z, 200, ids, None, 0, 1, "noised", [b], ["full"]))
                 for b in (3, 6)})
    best = dict.fromkeys(runs, float("inf"))
    with torch.no_grad():
        for _ in range(ROUNDS):  # interleaved rounds: every variant sees the same machine load
            for k, fn in runs.items():
                best[k] = min(best[k], best_of(fn, 1))
    full, exits = best.pop("full"), best
    print(f"DiT-S/2 width, 16x16 latent, batch {n}, CPU threads {torch.get_num_threads()}: full forward "
          f"{n / full:.1f} img/s ({full * 1e3:.0f} ms)")
    for b, s in exits.items():
        print(f"  exit after layer{b} of 12: {n / s:.1f} img/s ({s * 1e3:.0f} ms), {full / s:.2f}x the full forward")


if __name__ == "__main__":
    to_block, total, vae = flops_to_each_block()
    print(f"DiT-XL/2-256, one image: transformer {total / 1e9:.1f} GFLOPs, "
          f"SD-VAE encoder at 256 px {vae / 1e9:.1f} GFLOPs")
    for b in (4, 8, 14, 20, 28):
        print(f"  to layer{b}: {to_block[b - 1] / 1e9:.1f} GFLOPs = {to_block[b - 1] / total:.0%} of the full forward")
    throughput()
