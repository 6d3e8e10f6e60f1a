"""ADM U-Net cost: FLOPs per image to each block of ADM-256 (counted), and images/s full vs early exit.

FLOPs are counted by torch.utils.flop_counter.FlopCounterMode on one meta-device forward (no weights, no
memory): the running total is read by a hook on each block, so "to block b" is everything computed before
that block's output exists. Only the ops FlopCounterMode knows are counted (convolutions, linear layers,
matmuls/einsums of attention: 2 FLOPs per multiply-add); norms and elementwise ops are not.

Throughput: a small config (the tiny-uncond conformance architecture, seeded random weights) on CPU at batch
1, 4, 16, 64, full forward vs early exit after the middle block (a forward hook raises, as the extractor
does). With a GPU: ADM-256 in fp16 (the reference's use_fp16), full vs early exit after block 24.
"""

import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffstore.models.adm import adm_block_table, build_adm, load_adm

SMALL = {"image_size": 32, "num_channels": 32, "num_res_blocks": 2, "channel_mult": "1,2,2,2",
         "attention_resolutions": "16,8", "num_head_channels": 16, "learn_sigma": True, "resblock_updown": True}
BATCHES = (1, 4, 16, 64)


class StopForward(Exception):
    pass


def flops_to_each_block(config: str | dict) -> tuple[list[tuple], float]:
    net, table = build_adm(config, device="meta"), adm_block_table(config)
    size = net.cfg.image_size
    x, t = torch.zeros(1, 3, size, size, device="meta"), torch.zeros(1, dtype=torch.long, device="meta")
    y = torch.zeros(1, dtype=torch.long, device="meta") if net.cfg.num_classes else None
    counter, rows = FlopCounterMode(display=False), []
    for b in table:
        net.get_submodule(b.module).register_forward_hook(
            lambda *_, b=b: rows.append((b, counter.get_total_flops())))
    with torch.no_grad(), counter:
        net(x, t, y)
    return rows, counter.get_total_flops()


def images_per_s(model, x, t, stop_after: str | None, min_seconds: float = 0.5) -> float:
    """Best-of-3+ timing over repeated forwards (the machine is shared: the best run is the least disturbed)."""
    handle = None
    if stop_after is not None:
        def stop(*_):
            raise StopForward

        handle = model.module.get_submodule(stop_after).register_forward_hook(stop)

    def once():
        try:
            model.run(x, t, None)
        except StopForward:
            pass
        if x.is_cuda:
            torch.cuda.synchronize()

    try:
        with torch.no_grad():
            once()  # warm-up
            best, spent, runs = float("inf"), 0.0, 0
            while spent < min_seconds or runs < 3:
                start = time.perf_counter()
                once()
                elapsed = time.perf_counter() - start
                best, spent, runs = min(best, elapsed), spent + elapsed, runs + 1
    finally:
        if handle is not None:
            handle.remove()
    return x.shape[0] / best


def throughput_table(model, device, stop_block: int, batches, title: str):
    stop = model.blocks[stop_block]
    rows, total = flops_to_each_block(model.config["flags"])
    share = dict((b.index, flops) for b, flops in rows)[stop_block] / total
    print(f"\n{title}: images/s, full forward vs early exit after block {stop_block} ({stop.module}); "
          f"{total / 1e9:.2f} GFLOPs/image, the exit needs {100 * share:.1f}% of them "
          f"(ideal speed-up {1 / share:.2f}x)")
    print(f"{'batch':>6} {'full':>10} {'exit':>10} {'speed-up':>9}")
    for batch in batches:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 3, model.image_size, model.image_size, generator=gen).to(device)
        t = torch.full((batch,), 90, dtype=torch.long, device=device)
        full, early = images_per_s(model, x, t, None), images_per_s(model, x, t, stop.module)
        print(f"{batch:>6} {full:>10.1f} {early:>10.1f} {early / full:>8.2f}x")
        print(f"  batch {batch} done", file=sys.stderr)


def main():
    rows, total = flops_to_each_block("256-uncond")
    print("ADM-256 (256x256_diffusion_uncond), GFLOPs per image to each block "
          "(FlopCounterMode, meta forward, conv/linear/matmul only)")
    print(f"{'b':>3} {'module':<17} {'C':>5} {'HxW':>8} {'GFLOPs':>9} {'% of full':>9}")
    for b, flops in rows:
        print(f"{b.index:>3} {b.module:<17} {b.channels:>5} {f'{b.height}x{b.width}':>8} "
              f"{flops / 1e9:>9.1f} {100 * flops / total:>8.1f}%")
    print(f"{'':>3} {'full (+ out)':<17} {'':>5} {'':>8} {total / 1e9:>9.1f} {100.0:>8.1f}%")

    torch.set_num_threads(1)  # per-core numbers: stable on a shared machine, comparable between machines
    model = load_adm(None, SMALL, random_init=0)
    throughput_table(model, "cpu", model.blocks.mid, BATCHES,
                     "CPU (1 thread), small ADM (tiny-uncond architecture, 32x32)")

    if torch.cuda.is_available():
        model = load_adm(None, "256-uncond", random_init=0)
        model.module.convert_to_fp16()
        model.to(torch.device("cuda"))
        throughput_table(model, "cuda", 24, BATCHES, f"{torch.cuda.get_device_name()} fp16, ADM-256 at 256x256")


if __name__ == "__main__":
    main()
