"""Benchmark: one training step of the shipped U-Net on CPU, float32 vs bfloat16 / channels-last.

The shipped recipe (depth 4, base width 8, 64 mm patches at 1 mm, batch 2, cross-entropy +
soft Dice, Adam) is timed in four numeric set-ups in the same process: float32 in the default
layout (the reference), bfloat16 autocast, channels-last 3D, and both (what `models.train`
uses on CPUs with native bfloat16). Prints the best step time of each and its speed-up over
float32. bfloat16 rows are skipped on CPUs without native bfloat16 (it is emulated there).

Run:  .venv/bin/python tests/benchmarks/bench_training_step.py [--steps 6] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from lesionwatch.models.device import cpu_supports_bfloat16
from lesionwatch.models.train import compute_loss
from lesionwatch.models.unet3d import UNet3D

__all__ = ["main"]


def _time_steps(bfloat16: bool, channels_last: bool, steps: int, patch: int) -> float:
    torch.manual_seed(0)
    model = UNet3D(1, 2, depth=4, base_width=8)
    inputs = torch.randn(2, 1, patch, patch, patch)
    targets = (torch.rand(2, patch, patch, patch) > 0.98).long()
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
        inputs = inputs.contiguous(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
            logits = model(inputs)
        loss = compute_loss(logits, targets, "dice_ce")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return min(times[1:])  # the first step pays one-off kernel selection


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--patch", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    native = cpu_supports_bfloat16()
    print(f"torch {torch.__version__}, {args.threads} threads, native bfloat16: {native}")
    reference = _time_steps(False, False, args.steps, args.patch)
    print(f"float32                     {reference:6.3f} s/step   1.00x")
    for name, bf16, channels_last in (
        ("bfloat16 autocast", True, False),
        ("channels-last 3D", False, True),
        ("bfloat16 + channels-last", True, True),
    ):
        if bf16 and not native:
            print(f"{name:27s} skipped (no native bfloat16 on this CPU)")
            continue
        seconds = _time_steps(bf16, channels_last, args.steps, args.patch)
        print(f"{name:27s} {seconds:6.3f} s/step   {reference / seconds:.2f}x")


if __name__ == "__main__":
    main()
