"""Training throughput and test accuracy of low-precision / memory-format / compile settings vs fp32.

The MNIST net (or --model) on real MNIST, trained with cnnbench's own loop for --epochs on
--limit-train images, each setting from the same initial weights and data order, in one process
and in alternating rounds (only ratios measured side by side mean anything on a noisy machine).
Throughput is steady state (compile time excluded and printed on its own). Prints per setting the
median throughput over rounds, its min–max, the ratio to fp32 per round, and test accuracy.

    python benchmarks/precision.py [--model mnist_net] [--limit-train 60000] [--epochs 1] [--rounds 1]
        [--settings fp32,bf16+cl] [--device cpu] [--data-dir ../shared/data]

Target (issue 5): bf16 + channels_last ≥ 1.8× fp32 training throughput, test accuracy within 0.3 pp.
That presumes native bf16 (AMX / AVX-512-BF16 or a GPU); the script prints the CPU's flags so a
result from an AVX2-only CPU, which emulates bf16, can be read for what it is.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from cnnbench import data as datamod
from cnnbench import devices
from cnnbench.config import Experiment
from cnnbench.train import train

SETTINGS = {  # name → train section
    "fp32": {},
    "bf16": {"precision": "bf16"},
    "fp16": {"precision": "fp16"},
    "cl": {"channels_last": True},
    "bf16+cl": {"precision": "bf16", "channels_last": True},
    "bf16+cl+compile": {"precision": "bf16", "channels_last": True, "compile": True},
    "compile": {"compile": True},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mnist_net")
    ap.add_argument("--limit-train", type=int, default=None, help="training images (default: all 54,000 after validation)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--settings", default="fp32,bf16+cl")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()

    names = args.settings.split(",")
    device = devices.resolve(args.device)
    base = {"data": {"dataset": "mnist", "batch_size": 128, "val_fraction": 0.1, "limit_train": args.limit_train},
            "model": {"name": args.model}, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
            "train": {"epochs": args.epochs}}
    exps = {n: Experiment.model_validate(base | {"train": base["train"] | SETTINGS[n]}) for n in names}
    ds = datamod.load(exps[names[0]].data, args.data_dir)
    split = datamod.split(ds, 0.1, args.limit_train)
    print(f"device: {devices.describe(device)['device_name']}; CPU flags: {devices.cpu_flags()}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{args.model}, {len(split.train_idx)} training images × {args.epochs} epoch(s), batch 128, {args.rounds} round(s)\n")

    tput = {n: [] for n in names}
    acc = {n: [] for n in names}
    comp = {n: [] for n in names}
    for r in range(args.rounds):
        for n in names:
            try:
                res = train(exps[n], r, split, device)
            except devices.Unsupported as e:
                print(f"{n}: skipped: {e}")
                names.remove(n)
                continue
            tput[n].append(res.metrics["train_throughput"])
            acc[n].append(res.metrics["test_accuracy"])
            comp[n].append(res.metrics["compile_time_s"])
            print(f"round {r} {n:>16}: {tput[n][-1]:8.0f} img/s  test acc {100 * acc[n][-1]:.2f}%  "
                  f"compile {comp[n][-1]:.1f} s", flush=True)

    ref = names[0]
    print(f"\n{'setting':>16} {'img/s (median)':>15} {'min–max':>15} {'× ' + ref:>14} {'test acc':>9} {'Δ acc pp':>9} {'compile s':>10}")
    for n in names:
        ratios = [a / b for a, b in zip(tput[n], tput[ref])]
        print(f"{n:>16} {statistics.median(tput[n]):15.0f} {min(tput[n]):7.0f}–{max(tput[n]):<7.0f} "
              f"{statistics.median(ratios):13.2f}× {100 * statistics.mean(acc[n]):8.2f}% "
              f"{100 * (statistics.mean(acc[n]) - statistics.mean(acc[ref])):+9.2f} {statistics.median(comp[n]):10.1f}")


if __name__ == "__main__":
    main()
