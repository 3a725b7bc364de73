"""Inference latency, size and test accuracy of the MNIST net: fp32 vs int8 (dynamic, static) vs channel
pruning, measured side by side in one process (machines are noisy: only ratios measured together mean
anything).

Trains the MNIST net once (real MNIST, 1 epoch, SGD 0.05 momentum 0.9 — the quantization suite's
baseline), then builds every contender from those weights and times them in alternating rounds:
each round measures every contender's p50 over ``--repeats`` forward passes (after warm-up, compiled
models already compiled), and the table gives the median over rounds of each contender's p50 and of
its ratio to fp32 eager in the same round.

    python benchmarks/compression.py [--rounds 5] [--repeats 30] [--limit-train N] [--data-dir ../shared/data]

Targets (issue 6): static int8 ≥ 3.9× smaller and ≥ 2× faster at batch 64 than fp32, test accuracy within
0.3 pp.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch

from cnnbench import data as datamod
from cnnbench import measure
from cnnbench.config import DataConfig, Experiment
from cnnbench.evaluation import test_metrics
from cnnbench.posttraining import calibration_batches
from cnnbench.techniques import prune as pr
from cnnbench.techniques import quantize as qz
from cnnbench.train import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--limit-train", type=int, default=None)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    exp = Experiment.model_validate({
        "data": {"dataset": "mnist", "batch_size": 64, "val_fraction": 0.1, "limit_train": args.limit_train},
        "model": {"name": "mnist_net"}, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "train": {"epochs": 1}, "device": "cpu"})
    split = datamod.split(datamod.load(DataConfig.model_validate(exp.data.model_dump()), args.data_dir),
                          exp.data.val_fraction, exp.data.limit_train)
    fp32 = train(exp, 0, split, cpu).model.eval()
    example = calibration_batches(split, 64, 1, 0)[0]
    calib = calibration_batches(split, 64, 32, 0)
    static = qz.quantize_ptq(copy.deepcopy(fp32), "static", example, calib)
    dynamic = qz.quantize_ptq(copy.deepcopy(fp32), "dynamic", example)
    slim = pr.prune_channels(copy.deepcopy(fp32), 0.5).eval()  # no fine-tuning: latency and size only
    contenders = {  # name → (what runs, what is deployed, compiled?)
        "fp32 eager": (fp32, fp32, False),
        "fp32 compiled": (qz.compiled(copy.deepcopy(fp32)), fp32, True),
        "int8 dynamic (compiled)": (qz.compiled(dynamic), dynamic, True),
        "int8 static (compiled)": (qz.compiled(static), static, True),
        "int8 static (eager graph)": (static, static, False),
        "channels 50% eager": (slim, slim, False),
    }
    shape = split.data.shape
    results: dict[str, dict[int, list[float]]] = {n: {1: [], 64: []} for n in contenders}
    with qz.inductor_freezing():
        accuracy = {n: test_metrics(run, split.data, exp.data.eval_batch_size, cpu)[0]["test_accuracy"] for n, (run, _, _) in contenders.items()}
        for _ in range(args.rounds):
            for name, (run, _, _) in contenders.items():
                for bs in (1, 64):
                    warm = 3 if results[name][bs] else 10
                    results[name][bs].append(measure.latency_ms(run, shape, bs, cpu, args.repeats, warm)[0])
    base = {bs: results["fp32 eager"][bs] for bs in (1, 64)}
    size0 = measure.model_size_bytes(fp32)
    print(f"MNIST net, {torch.get_num_threads()} threads, {args.rounds} rounds × {args.repeats} repeats; "
          f"fp32 test accuracy {accuracy['fp32 eager']:.2%}")
    print(f"{'contender':<28}{'test acc':>9}{'Δ pp':>7}{'size KiB':>10}{'×smaller':>9}"
          f"{'bs1 ms':>8}{'×fp32':>7}{'bs64 ms':>9}{'×fp32':>7}")
    for name, (_, deployed, _) in contenders.items():
        size = measure.model_size_bytes(deployed)
        row = f"{name:<28}{accuracy[name]:>9.2%}{100 * (accuracy[name] - accuracy['fp32 eager']):>+7.2f}"
        row += f"{size / 1024:>10.1f}{size0 / size:>9.2f}"
        for bs in (1, 64):
            speed = statistics.median(b / m for b, m in zip(base[bs], results[name][bs]))
            row += f"{statistics.median(results[name][bs]):>{8 if bs == 1 else 9}.2f}{speed:>7.2f}"
        print(row)


if __name__ == "__main__":
    main()
