"""Model measurements that do not depend on training: FLOPs (and, with the compression issue,
latency, size on disk and non-zero parameter counts)."""

from __future__ import annotations

import copy

import torch
from torch.utils.flop_counter import FlopCounterMode


def flops_per_sample(model: torch.nn.Module, input_shape: tuple[int, ...], backward: bool = False) -> float:
    """FLOPs of one sample's forward pass (``backward=True``: forward + backward, i.e. a training
    step without the optimizer), counted once by ``torch.utils.flop_counter`` on a CPU copy of the
    model with a batch of 2 (batch norm in training mode needs more than one sample)."""
    probe = copy.deepcopy(model).to("cpu").float()
    probe.train(backward)
    x = torch.zeros(2, *input_shape)
    counter = FlopCounterMode(display=False)
    with counter:
        if backward:
            probe(x).sum().backward()
        else:
            with torch.no_grad():
                probe(x)
    return counter.get_total_flops() / 2
