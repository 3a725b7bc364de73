"""Training throughput of cnnbench's loop vs a hand-written loop and vs the conventional DataLoader loop.

LeNet-5 on real MNIST, batch 128, on the CPU (or ``--device cuda``), in one process with alternating rounds
(machines are noisy: only ratios measured side by side mean anything). Every contender trains the same
number of images per round, timed around the training steps only, the device synchronized before the clock
stops. Prints medians and the min–max spread.

    python benchmarks/throughput.py [--rounds 5] [--images 12800] [--data-dir ../shared/data] [--device cuda]

Targets (issue 2): cnnbench ≥ 0.97× the hand-written loop; ≥ 2.2× the DataLoader loop.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from cnnbench import data as datamod
from cnnbench.config import Experiment
from cnnbench.models import MODELS
from cnnbench.train import train


def cnnbench_loop(exp: Experiment, split, seed: int, device: torch.device) -> float:
    result = train(exp, seed, split, device)
    return result.metrics["train_throughput"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hand_loop(ds, train_idx, images: int, bs: int, seed: int, device: torch.device) -> float:
    """What a careful person writes: slice in-memory uint8 tensors (resident on the device), normalize per batch."""
    torch.manual_seed(seed)
    model = MODELS.create("lenet5").to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    mean, std = (t.to(device) for t in ds.mean_std)
    x_all, y_all = ds.train_x.to(device), ds.train_y.to(device)
    idx = train_idx[torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(seed))][:images].to(device)
    model.train()
    _sync(device)
    t0 = time.perf_counter()
    for lo in range(0, images, bs):
        bi = idx[lo : lo + bs]
        xb = (x_all[bi].float() / 255 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
        loss = F.cross_entropy(model(xb), y_all[bi])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    return images / (time.perf_counter() - t0)


def dataloader_loop(root: str, images: int, bs: int, seed: int, device: torch.device) -> float:
    """The conventional tutorial loop: torchvision MNIST + ToTensor + Normalize + DataLoader."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    dataset = datasets.MNIST(root, train=True, download=False, transform=tf)
    loader = DataLoader(dataset, batch_size=bs, shuffle=True, generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    model = MODELS.create("lenet5").to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    seen = 0
    _sync(device)
    t0 = time.perf_counter()
    for xb, yb in loader:
        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(yb)
        if seen >= images:
            break
    _sync(device)
    return seen / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--images", type=int, default=12_800, help="training images per contender per round")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--data-dir", default=None, help="default: $CNNBENCH_DATA_DIR or ./data")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    args = ap.parse_args()
    device = torch.device(args.device)

    root = str(datamod.data_dir(args.data_dir))
    exp = Experiment.model_validate({
        "data": {"dataset": "mnist", "batch_size": args.batch_size, "limit_train": args.images},
        "model": {"name": "lenet5"},
        "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
        "train": {"epochs": 1},
        "device": args.device,
    })
    split = datamod.split(datamod.load(exp.data, root), exp.data.val_fraction, exp.data.limit_train)
    full_split = datamod.split(split.data, exp.data.val_fraction)
    contenders = {
        "cnnbench": lambda s: cnnbench_loop(exp, split, s, device),
        "hand-written": lambda s: hand_loop(split.data, full_split.train_idx, args.images, args.batch_size, s, device),
        "DataLoader": lambda s: dataloader_loop(root, args.images, args.batch_size, s, device),
    }
    for fn in contenders.values():  # warm-up: imports, allocator, oneDNN primitives
        fn(100)
    rates: dict[str, list[float]] = {k: [] for k in contenders}
    for r in range(args.rounds):
        order = list(contenders) if r % 2 == 0 else list(reversed(contenders))  # alternate the order too
        for name in order:
            rates[name].append(contenders[name](r))

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"LeNet-5, MNIST, batch {args.batch_size}, {where}, {torch.get_num_threads()} threads, "
          f"{args.images} images × {args.rounds} rounds (torch {torch.__version__})")
    for name, values in rates.items():
        print(f"  {name:<13} median {statistics.median(values):8,.0f} img/s   (min {min(values):,.0f}, max {max(values):,.0f})")
    for other, target in (("hand-written", 0.97), ("DataLoader", 2.2)):
        ratios = [a / b for a, b in zip(rates["cnnbench"], rates[other])]
        print(f"  cnnbench / {other:<13} median {statistics.median(ratios):.3f}×  "
              f"(per-round min {min(ratios):.3f}, max {max(ratios):.3f}; target ≥ {target}×)")


if __name__ == "__main__":
    main()
