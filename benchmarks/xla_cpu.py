"""XLA on the CPU vs eager CPU: LeNet-5 training throughput through cnnbench's loop, same process.

A correctness path here, not a speed claim: the CPU PJRT runtime stands in for a TPU so the XLA code
(lazy graphs cut per step, no host reads in the step, compile time reported apart) is exercised for
real. Needs torch_xla (the .venv-xla environment of .ci/run, see README: TPU / XLA):

    PJRT_DEVICE=CPU .venv-xla/bin/python benchmarks/xla_cpu.py [--limit-train 10000] [--epochs 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from cnnbench import data as datamod
from cnnbench import devices
from cnnbench.config import Experiment
from cnnbench.train import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--limit-train", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    os.environ.setdefault("PJRT_DEVICE", "CPU")

    exp = Experiment.model_validate({
        "data": {"dataset": "mnist", "batch_size": 128, "val_fraction": 0.1, "limit_train": args.limit_train},
        "model": {"name": args.model}, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "train": {"epochs": args.epochs}})
    split = datamod.split(datamod.load(exp.data, args.data_dir), 0.1, args.limit_train)
    targets = {"cpu": torch.device("cpu"), "xla": devices.resolve("xla")}
    print(f"torch {torch.__version__}, torch_xla {devices.describe(targets['xla'])['torch_xla']}, "
          f"{torch.get_num_threads()} threads; {args.model}, {len(split.train_idx)} images × {args.epochs} epochs\n")
    tput, comp, acc = ({k: [] for k in targets} for _ in range(3))
    for r in range(args.rounds):
        for name, device in targets.items():
            m = train(exp, r, split, device).metrics
            tput[name].append(m["train_throughput"])
            comp[name].append(m["compile_time_s"])
            acc[name].append(m["test_accuracy"])
            print(f"round {r} {name}: {m['train_throughput']:7.0f} img/s steady, compile {m['compile_time_s']:.1f} s, "
                  f"train {m['train_time_s']:.1f} s, test acc {100 * m['test_accuracy']:.2f}%", flush=True)
    ratios = [x / c for x, c in zip(tput["xla"], tput["cpu"])]
    print(f"\nxla / cpu steady-state throughput: median {statistics.median(ratios):.2f}× "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f}); compile on xla: median {statistics.median(comp['xla']):.1f} s; "
          f"test acc cpu {100 * statistics.mean(acc['cpu']):.2f}% vs xla {100 * statistics.mean(acc['xla']):.2f}%")


if __name__ == "__main__":
    main()
