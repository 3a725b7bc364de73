"""Data-parallel training of one run (train.processes): real torch.distributed processes on gloo."""

import pytest
import torch

from cnnbench import data as datamod
from cnnbench.config import Experiment
from cnnbench.distributed import train_distributed
from cnnbench.train import train

EXP = {"data": {"dataset": "digits", "batch_size": 64, "val_fraction": 0.1, "limit_train": 1280},
       "model": {"name": "lenet5"}, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
       "train": {"epochs": 2}, "device": "cpu"}


def test_two_processes_train_what_one_process_trains_at_the_same_global_batch():
    """1,280 images: every batch of 64 splits 32/32, so DDP's averaged gradient is the one-process gradient
    and the weights agree up to the order floats are summed in."""
    one = Experiment.model_validate(EXP)
    two = Experiment.model_validate(EXP | {"train": {"epochs": 2, "processes": 2, "threads": 1}})
    split = datamod.split(datamod.load(one.data), one.data.val_fraction, one.data.limit_train)
    epochs = []
    a = train(one, 0, split, torch.device("cpu"))
    b = train_distributed(two, 0, split, torch.device("cpu"), on_epoch=epochs.append)
    assert b.status == "finished" and [r["epoch"] for r in epochs] == [1, 2]  # rank 0's records, as they came
    for (name, wa), wb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.allclose(wa, wb, atol=1e-4), name
    assert b.metrics["test_accuracy"] == pytest.approx(a.metrics["test_accuracy"], abs=0.006)
    assert b.metrics["train_throughput"] > 0 and len(b.history) == 2
    assert b.tags["cnnbench.data_parallel"] == "2 processes × 1 threads, DDP (gloo), 32 images per process per batch"


def test_data_parallel_settings_are_checked():
    with pytest.raises(ValueError, match="data-parallel training runs the eager model"):
        Experiment.model_validate(EXP | {"train": {"processes": 2, "compile": True}})
    with pytest.raises(ValueError, match="distillation and post-training techniques run in one process"):
        Experiment.model_validate(EXP | {"train": {"processes": 2}, "finetune": {"epochs": 1}})
    from cnnbench.devices import Unsupported
    from cnnbench.train import check_supported

    with pytest.raises(Unsupported, match="runs on the CPU \\(gloo\\) or CUDA \\(nccl\\), not on meta"):
        check_supported(Experiment.model_validate(EXP | {"train": {"processes": 2}}), torch.device("meta"))
    assert "processes" not in Experiment().identity()["train"]  # every earlier run keeps its fingerprint
