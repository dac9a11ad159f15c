"""Seconds per FOD training step (the transformers of both levels; the frozen backbone's tokens are
cached by the trainer, so they are not part of a step) for the ways the KL/entropy losses can run:

  fused      every query row through `ops.i2corr_training` (O(N) memory), blocks torch.compile'd
  fused-eager  the same without torch.compile
  subset     `--loss-queries` random query rows per level, materialised and `torch.compile`d
             statistics (deviation 6; the default before the fused branch)
  subset-eager  the same without torch.compile

Random tokens with the default config's shapes (EfficientNet-Lite0 hypercolumn channels 64 / 152 on
32×32 / 16×16 grids), batch 1, Adam as in `FODTask`. The median over `--steps` steps after
`--warmup` steps (compiling happens in the warm-up): wall seconds, and the process's CPU seconds
(steadier on a shared machine; equal to wall with one thread on an idle core).

    python bench/fod_train_step.py --modes fused subset --steps 10
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from fastad.models.fod import FODConfig, FODLevel, correlation_stats, CompiledWithFallback, I2CorrelationAttention, \
    fod_level_losses

MODES = ("fused", "fused-eager", "subset", "subset-eager")
CHANNELS = (64, 152)  # efficientnet_lite0 with hypercolumn tokens at strides 8 and 16


def build_levels(cfg: FODConfig, seed: int = 0) -> list[FODLevel]:
    torch.manual_seed(seed)
    return [FODLevel(c, d, cfg.grid(i), cfg) for i, (c, d) in enumerate(zip(CHANNELS, cfg.d_models))]


def step_seconds(mode: str, steps: int, warmup: int, loss_queries: int, batch: int) -> list[float]:
    cfg = FODConfig(loss_queries=0 if mode.startswith("fused") else loss_queries)
    levels = build_levels(cfg)
    if not mode.endswith("eager"):  # what FOD.compile_stats does
        fn = CompiledWithFallback(correlation_stats)
        for level in levels:
            for m in level.modules():
                if isinstance(m, I2CorrelationAttention):
                    m.stats_fn, m.compiled = fn, True
    opt = torch.optim.Adam([p for lv in levels for p in lv.parameters()], lr=cfg.lr)
    gen = torch.Generator().manual_seed(0)
    tokens = [torch.randn(batch, cfg.grid(i)[0] * cfg.grid(i)[1], c) for i, c in enumerate(CHANNELS)]
    times, cpu_times = [], []
    for it in range(warmup + steps):
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad()
        for level, x in zip(levels, tokens):
            rows = None
            if cfg.loss_queries and cfg.loss_queries < x.shape[1]:
                rows = torch.randperm(x.shape[1], generator=gen)[:cfg.loss_queries]
            fod_level_losses(x, level(x, rows), cfg).total.backward()
        opt.step()
        if it >= warmup:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    return times, cpu_times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--loss-queries", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args()
    for mode in args.modes:
        times, cpu_times = step_seconds(mode, args.steps, args.warmup, args.loss_queries, args.batch)
        print(json.dumps({"mode": mode, "batch": args.batch, "threads": torch.get_num_threads(),
                          "loss_queries": None if mode.startswith("fused") else args.loss_queries,
                          "median_s": round(statistics.median(times), 4),
                          "min_s": round(min(times), 4),
                          "median_cpu_s": round(statistics.median(cpu_times), 4),
                          "steps": len(times)}), flush=True)


if __name__ == "__main__":
    main()
