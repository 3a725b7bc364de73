"""Low-rank factorization (techniques/low_rank.py): the SVD factor pairs reproduce the layers they
replace at full rank, ranks are chosen as specified, and ``factorize`` rewrites real models in place
(nested Sequentials, a residual block, torch.export) — all with real torch."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from cnnbench.techniques import low_rank as lr
from tests.conftest import REPO


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def lenet() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10),
    ).eval()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_importing_the_module_does_not_import_torch():
    code = "import cnnbench.techniques.low_rank, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ───────────────────────────── choose_rank ─────────────────────────────


S = [3.0, 2.0, 1.0, 0.5]  # squares 9, 4, 1, 0.25: total 14.25; cumulative 0.632, 0.912, 0.982, 1


@pytest.mark.parametrize(("kwargs", "rank"), [
    ({"energy": 0.9}, 2), ({"energy": 0.6}, 1), ({"energy": 0.95}, 3), ({"energy": 0.99}, 4), ({"energy": 1.0}, 4),
    ({"rank_ratio": 0.5}, 2), ({"rank_ratio": 0.01}, 1), ({"rank_ratio": 0.51}, 3), ({"rank_ratio": 1.0}, 4),
])
def test_choose_rank_by_hand(kwargs, rank):
    assert lr.choose_rank(S, **kwargs) == rank
    assert lr.choose_rank(torch.tensor(S, dtype=torch.float64), **kwargs) == rank  # a tensor, as factorize passes


def test_choose_rank_edge_cases():
    assert lr.choose_rank([0.0, 0.0, 0.0], energy=0.5) == 1  # a zero matrix
    assert lr.choose_rank([1.0] * 100, rank_ratio=0.07) == 7  # 0.07 * 100 is 7.000000000000001 in floats
    assert lr.energy_kept(S, 2) == pytest.approx(13 / 14.25)


# ───────────────────────────── exact at full rank ─────────────────────────────


@pytest.mark.parametrize("bias", [True, False])
def test_linear_pair_is_exact_at_full_rank_and_truncates_below(bias):
    torch.manual_seed(0)
    layer = nn.Linear(20, 12, bias=bias)
    x = torch.randn(8, 20)
    pair = lr.factor_linear(layer, 12)
    assert [m.weight.shape for m in pair] == [(12, 20), (12, 12)]
    assert pair[0].bias is None and (pair[1].bias is not None) == bias
    assert max_diff(pair(x), layer(x)) < 1e-4
    assert max_diff(lr.factor_linear(layer, 3)(x), layer(x)) > 1e-2  # truncation loses something


def test_channel_conv_pair_is_exact_at_full_rank():
    torch.manual_seed(0)
    layer = nn.Conv2d(5, 7, 3, stride=2, padding=1, bias=True)
    x = torch.randn(2, 5, 11, 11)
    pair = lr.factor_conv(layer, 7, "channel")  # full rank: min(7, 5·3·3)
    first, second = pair
    assert (first.kernel_size, first.stride, first.padding, first.bias) == ((3, 3), (2, 2), (1, 1), None)
    assert (second.kernel_size, second.in_channels, second.out_channels) == ((1, 1), 7, 7)
    assert max_diff(pair(x), layer(x)) < 1e-4
    assert max_diff(lr.factor_conv(layer, 2, "channel")(x), layer(x)) > 1e-2


@pytest.mark.parametrize("kwargs", [
    {"kernel_size": 3, "stride": 1, "padding": 1},
    {"kernel_size": 3, "stride": 2, "padding": 1, "bias": False},
    {"kernel_size": 5, "stride": 2, "padding": 2},
    {"kernel_size": 5, "stride": (2, 1), "padding": (1, 2), "dilation": (1, 2)},
    {"kernel_size": (3, 5), "padding": "same", "dilation": 2},
    {"kernel_size": 3, "padding": 1, "padding_mode": "reflect"},
])
def test_spatial_conv_pair_is_exact_at_full_rank(kwargs):
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 6, **kwargs)
    kh, kw = layer.kernel_size
    x = torch.randn(2, 4, 13, 12)
    full = min(4 * kh, 6 * kw)
    first, second = pair = lr.factor_conv(layer, full, "spatial")
    assert (first.kernel_size, second.kernel_size) == ((kh, 1), (1, kw))
    assert (first.stride, second.stride) == ((layer.stride[0], 1), (1, layer.stride[1]))
    assert pair(x).shape == layer(x).shape
    assert max_diff(pair(x), layer(x)) < 1e-4
    with pytest.raises(ValueError, match="rank"):
        lr.factor_conv(layer, full + 1, "spatial")


def test_spatial_falls_back_to_channel_for_one_wide_kernels_and_keeps_dtype():
    torch.manual_seed(0)
    layer = nn.Conv2d(8, 4, (1, 3), padding=(0, 1)).double()
    pair = lr.factor_conv(layer, 4, "spatial")
    assert [m.kernel_size for m in pair] == [(1, 3), (1, 1)]  # the channel scheme
    assert all(p.dtype == torch.float64 for p in pair.parameters())
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    assert max_diff(pair(x), layer(x)) < 1e-10


# ───────────────────────────── factorize ─────────────────────────────


def test_factorize_lenet_at_a_quarter_rank():
    model, x = lenet(), torch.randn(4, 1, 32, 32)
    before, out_before = n_params(model), model(x)
    records = lr.factorize(model, rank_ratio=0.25)
    assert {n: (r["kind"], r["rank"], r["full_rank"]) for n, r in records.items()} == {
        "0": ("conv_channel", 2, 6), "3": ("conv_channel", 4, 16),
        "7": ("linear", 30, 120), "9": ("linear", 21, 84), "11": ("linear", 3, 10),
    }
    assert all(isinstance(model[int(n)], nn.Sequential) for n in records)
    assert n_params(model) == (2 * 31 + 6) + (4 * 166 + 16) + (30 * 520 + 120) + (21 * 204 + 84) + (3 * 94 + 10)  # r·(m+n) + bias
    assert n_params(model) < before / 2.5
    out = model(x)
    assert out.shape == out_before.shape
    totals = lr.summary(records)
    assert totals["params_before"] == before  # the LeNet has no other parameters
    assert totals["params_after"] == n_params(model)  # the predicted counts are the real ones
    assert totals["layers_factorized"] == 5 and totals["layers_kept"] == 0
    assert 0 < totals["energy_kept_mean"] < 1
    assert all(0 < r["energy_kept"] < 1 for r in records.values())


def test_factorize_keeps_layers_whose_pair_would_not_be_smaller():
    model = lenet()
    fc2 = model[9]
    records = lr.factorize(model, rank_ratio=0.6)  # fc2 120→84: rank 51 needs 51·204 + 84 > 120·84 + 84
    assert records["9"]["kind"] == "kept" and "10488" in records["9"]["reason"]
    assert records["9"]["params_after"] == records["9"]["params_before"] == 10164
    assert model[9] is fc2
    assert [r["kind"] for n, r in records.items() if n != "9"] == ["conv_channel", "conv_channel", "linear", "linear"]
    assert lr.summary({"9": records["9"]})["layers_factorized"] == 0
    assert math.isnan(lr.summary({"9": records["9"]})["energy_kept_mean"])


def test_energy_finds_the_rank_of_an_exact_rank_two_layer():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(24, 2))
    v, _ = torch.linalg.qr(torch.randn(32, 2))
    model = nn.Sequential(nn.Linear(32, 24), nn.ReLU())
    with torch.no_grad():
        model[0].weight.copy_(u @ torch.diag(torch.tensor([3.0, 2.0])) @ v.T)  # energy at rank 1: 9/13
    x = torch.randn(16, 32)
    expected = model(x)
    records = lr.factorize(model, energy=0.999)
    assert records["0"]["kind"] == "linear" and records["0"]["rank"] == 2
    assert records["0"]["energy_kept"] == pytest.approx(1.0)
    assert max_diff(model(x), expected) < 1e-5


class Block(nn.Module):
    """A residual block with its own forward: two 3×3 convs and a 1×1 projection on the skip."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.skip(x))


def test_factorize_inside_a_residual_block_keeps_mode_and_frozen_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, groups=1), Block(16, 32, 2), nn.Conv2d(32, 32, 3, groups=4),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    model[1].conv1.weight.requires_grad_(False)
    x = torch.randn(2, 3, 16, 16)
    records = lr.factorize(model, rank_ratio=0.25, conv="spatial")
    assert {n: r["kind"] for n, r in records.items()} == {
        "0": "conv_spatial", "1.conv1": "conv_spatial", "1.conv2": "conv_spatial", "1.skip": "conv_channel",
        "2": "kept", "5": "linear",
    }
    assert "grouped" in records["2"]["reason"] and records["2"]["rank"] is None
    block = model[1]
    assert isinstance(block.conv1, nn.Sequential) and [m.kernel_size for m in block.conv1] == [(3, 1), (1, 3)]
    assert not any(m.training for m in model.modules())
    assert [p.requires_grad for p in block.conv1.parameters()] == [False, False]
    assert all(p.requires_grad for p in block.conv2.parameters())
    out = model(x)
    assert out.shape == (2, 10)
    out.sum().backward()
    assert block.conv2[0].weight.grad is not None and block.conv1[0].weight.grad is None


def test_factorize_keeps_train_mode():
    model = lenet().train()
    lr.factorize(model, rank_ratio=0.25)
    assert all(m.training for m in model.modules())


def test_factorized_model_exports_with_torch_export():
    model, x = lenet(), torch.randn(2, 1, 32, 32)
    lr.factorize(model, rank_ratio=0.5, conv="spatial")
    exported = torch.export.export(model.eval(), (x,), strict=True)
    assert max_diff(exported.module()(x), model(x)) < 1e-5


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"rank_ratio": 0.5, "conv": "depthwise"}, "conv must be"),
    ({}, "exactly one of rank_ratio and energy"),
    ({"rank_ratio": 0.5, "energy": 0.9}, "exactly one of rank_ratio and energy"),
    ({"rank_ratio": 0.0}, r"rank_ratio must be in \(0, 1\]"),
    ({"rank_ratio": 1.5}, r"rank_ratio must be in \(0, 1\]"),
    ({"energy": -0.1}, r"energy must be in \(0, 1\]"),
    ({"energy": float("nan")}, r"energy must be in \(0, 1\]"),
])
def test_bad_arguments_raise_before_touching_the_model(kwargs, match):
    model = lenet()
    with pytest.raises(ValueError, match=match):
        lr.factorize(model, **kwargs)
    assert isinstance(model[0], nn.Conv2d) and isinstance(model[7], nn.Linear)
    if "conv" not in kwargs:
        with pytest.raises(ValueError, match=match):
            lr.choose_rank(S, **kwargs)


def test_bad_rank_or_scheme_for_a_single_layer():
    with pytest.raises(ValueError, match="rank must be in"):
        lr.factor_linear(nn.Linear(4, 3), 0)
    with pytest.raises(ValueError, match="conv must be"):
        lr.factor_conv(nn.Conv2d(2, 2, 3), 1, "tucker")
    with pytest.raises(ValueError, match="grouped"):
        lr.factor_conv(nn.Conv2d(4, 4, 3, groups=2), 1)


# ───────────────────────────── as a technique of a suite ─────────────────────────────

LOW_RANK_SUITE = """\
name: lowrank
question: How much smaller is a factorized net, and what does it cost?
base:
  data: {dataset: synthetic, batch_size: 64, eval_batch_size: 64, val_fraction: 0.25, synthetic: {train_size: 256, test_size: 128, image_size: 28}}
  model: {name: lenet5}
  optimizer: {name: sgd, lr: 0.05, momentum: 0.9}
  train: {epochs: 2}
  device: cpu
  inference: {repeats: 2, warmup: 1}
variants:
  dense: {}
  same_epochs: {low_rank: {rank_ratio: 1.0, finetune_epochs: 1}}
  r25: {low_rank: {rank_ratio: 0.25}}
  e90_ft: {low_rank: {energy: 0.9, conv: spatial, finetune_epochs: 1}}
  r25_int8: {low_rank: {rank_ratio: 0.25}, quantize: {method: static, calibration_batches: 2}, inference: {compile: never}}
baseline: dense
seeds: 1
"""


def test_low_rank_schema_refuses_bad_blocks_with_the_line_and_fix(tmp_path):
    from cnnbench.config import SuiteError, load_suite
    from cnnbench.registries import all_registries

    path = tmp_path / "lr.yaml"
    path.write_text(LOW_RANK_SUITE)
    for override, expected in [("variants.r25.low_rank.energy=0.9", "give exactly one of rank_ratio"),
                               ("variants.r25.low_rank.rank_ratio=1.5", "less than or equal to 1"),
                               ("variants.r25.low_rank.conv=diagonal", "'channel' or 'spatial'"),
                               ("variants.dense.low_rank={rank_ratio: 0.5}", "cannot be its source itself")]:
        with pytest.raises(SuiteError) as e:
            load_suite(path, [override], registries=all_registries())
        assert any(expected in str(p) and p.where.startswith(("--set", str(path))) for p in e.value.problems), \
            (override, e.value.problems)


def test_validate_counts_only_the_fine_tuning_epochs_of_low_rank_variants(tmp_path):
    from cnnbench.config import load_suite
    from cnnbench.plan_summary import trained_epochs
    from cnnbench.registries import all_registries

    path = tmp_path / "lr.yaml"
    path.write_text(LOW_RANK_SUITE)
    suite = load_suite(path, registries=all_registries())
    assert {v: trained_epochs(e) for v, e in suite.experiments.items()} == \
        {"dense": 2, "same_epochs": 1, "r25": 0, "e90_ft": 1, "r25_int8": 0}


@pytest.mark.slow
def test_a_low_rank_suite_factorizes_the_trained_baseline_and_records_what_it_saved(cli, workdir):
    import json

    import mlflow

    from tests.conftest import write_suite

    result = cli("run", write_suite(workdir / "lr.yaml", LOW_RANK_SUITE), "-q")
    assert result.exit_code == 0, result.output
    assert "5 finished" in result.output
    client = mlflow.MlflowClient("sqlite:///mlflow.db")
    exp = client.get_experiment_by_name("lowrank")
    runs = {r.info.run_name.split("/")[0]: r for r in client.search_runs([exp.experiment_id],
                                                                          "tags.`cnnbench.role` = 'run'")}
    dense, same, r25, e90, int8 = (runs[v].data for v in ("dense", "same_epochs", "r25", "e90_ft", "r25_int8"))
    # the control changes no layer (full rank never saves parameters) but fine-tunes one epoch like e90_ft
    assert same.metrics["params"] == dense.metrics["params"] and same.metrics["low_rank_layers"] == 0
    assert same.metrics["epochs_completed"] == 1 and e90.metrics["epochs_completed"] == 1
    assert r25.metrics["params"] < 0.5 * dense.metrics["params"]
    assert r25.metrics["low_rank_params_after"] < r25.metrics["low_rank_params_before"]
    assert r25.metrics["model_size_bytes"] < 0.5 * dense.metrics["model_size_bytes"]
    assert 0 < r25.metrics["low_rank_energy_kept"] < 1 and "test_accuracy" in r25.metrics
    assert "low-rank SVD (rank 0.25 of full" in r25.tags["cnnbench.compression"]
    assert "k×1 → r → 1×k" in e90.tags["cnnbench.compression"]
    # chained with int8: factorized first, then quantized (the description says both, in that order)
    how = int8.tags["cnnbench.compression"]
    assert how.index("low-rank") < how.index("quantize static")
    assert int8.metrics["model_size_bytes"] < r25.metrics["model_size_bytes"]
    layers = json.loads(Path(client.download_artifacts(runs["r25"].info.run_id, "low_rank.json",
                                                       str(workdir))).read_text())
    assert {rec["kind"] for rec in layers.values()} == {"linear", "conv_channel"}
    report = (workdir / "reports" / "lowrank.md").read_text()
    assert "low-rank SVD" in report and "lowrank_size.png" in report
