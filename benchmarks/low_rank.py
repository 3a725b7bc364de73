"""Inference latency and size of the MNIST net, dense vs low-rank factorized, measured side by side in
one process (machines are noisy: only ratios measured together mean anything).

Latency does not depend on the weights' values, so the nets are freshly initialized (seed 0) and
factorized by rank ratio exactly as ``suites/low_rank.yaml`` does (energy-based ranks depend on trained
weights: see that suite's report for them). Each round times every contender's p50 over ``--repeats``
forward passes at batch 1 and 64 (after warm-up), in turn; the table gives the median over rounds of
each contender's p50 and of its speed-up over the dense net in the same round, with the range of that
ratio over rounds — and the dense net against a second copy of itself, the noise floor (A/A).

    python benchmarks/low_rank.py [--rounds 7] [--repeats 30] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics

import torch

from cnnbench import measure
from cnnbench.config import ModelConfig
from cnnbench.models import build
from cnnbench.techniques.low_rank import factorize


def contenders() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    dense = build(ModelConfig(name="mnist_net"), in_channels=1, num_classes=10, image_size=28).eval()
    out = {"dense": dense, "dense (A/A)": copy.deepcopy(dense)}
    for name, ratio, conv in (("rank 0.5", 0.5, "channel"), ("rank 0.25", 0.25, "channel"),
                              ("rank 0.1", 0.1, "channel"), ("rank 0.25 spatial", 0.25, "spatial")):
        model = copy.deepcopy(dense)
        factorize(model, rank_ratio=ratio, conv=conv)
        out[name] = model.eval()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    models = contenders()
    p50 = {(n, bs): [] for n in models for bs in (1, 64)}
    for _ in range(args.rounds):
        for bs in (1, 64):
            for name, model in models.items():
                p50[(name, bs)].append(measure.latency_ms(model, (1, 28, 28), bs, cpu, args.repeats, warmup=5)[0])
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds × {args.repeats} repeats")
    print(f"{'contender':<20} {'params':>10} {'size KiB':>9} {'bs1 p50 ms':>11} {'speed-up bs1 [range]':>22} "
          f"{'bs64 p50 ms':>12} {'speed-up bs64 [range]':>23}")
    for name, model in models.items():
        cells = []
        for bs in (1, 64):
            ratios = [d / m for d, m in zip(p50[("dense", bs)], p50[(name, bs)])]
            cells += [f"{statistics.median(p50[(name, bs)]):>11.3f}" if bs == 1 else f"{statistics.median(p50[(name, bs)]):>12.3f}",
                      f"{statistics.median(ratios):>6.2f}× [{min(ratios):.2f}–{max(ratios):.2f}]".rjust(22 if bs == 1 else 23)]
        params = sum(p.numel() for p in model.parameters())
        print(f"{name:<20} {params:>10,} {measure.model_size_bytes(model) / 1024:>9.1f} " + " ".join(cells))


if __name__ == "__main__":
    main()
