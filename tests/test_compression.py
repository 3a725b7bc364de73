"""Compression: quantization, pruning, distillation, checkpoints and inference metrics —
each on a tiny model with real torchao / torch.nn.utils.prune, and end to end through the runner
into a real SQLite MLflow store."""

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from cnnbench import measure
from cnnbench.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from cnnbench.config import SuiteError, load_suite
from cnnbench.models import MODELS
from cnnbench.registries import all_registries
from cnnbench.techniques import prune as pr
from cnnbench.techniques import quantize as qz
from cnnbench.techniques.distill import distillation_loss
from tests.conftest import write_suite


def lenet(seed: int = 0, size: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS.create("lenet5", in_channels=1, num_classes=10, image_size=size).eval()


# ───────────────────────────── measurements ─────────────────────────────


def test_static_int8_size_counts_the_int8_tensors_not_the_dead_fp32_copies():
    model = lenet(size=28)  # 61,706 parameters: per-tensor overheads of the file are small next to them
    x = torch.randn(32, 1, 28, 28)
    converted = qz.quantize_ptq(copy.deepcopy(model), "static", x[:8], [x[i:i + 8] for i in range(0, 32, 8)])
    deployed = measure.deployed_tensors(converted)
    conv_linear = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    int8 = [t for t in deployed.values() if t.dtype == torch.int8]
    assert len(int8) == len(conv_linear)  # static: every Conv2d and Linear weight is int8
    assert not any(t.dtype == torch.float32 and t.dim() > 1 for t in deployed.values())  # no fp32 weight matrix
    fp32_size = measure.model_size_bytes(model)
    int8_size = measure.model_size_bytes(converted)
    # convert_pt2e leaves the fp32 weights on the module: its state dict is bigger than the fp32 model's
    assert measure.serialized_size(converted.state_dict()) > fp32_size
    assert fp32_size / int8_size > 3.3, (fp32_size, int8_size)
    # the int8 graph computes nearly what the fp32 model does
    with torch.no_grad():
        assert (converted(x).argmax(1) == model(x).argmax(1)).float().mean() > 0.9


def test_dynamic_quantizes_only_linear_layers():
    model = lenet()
    converted = qz.quantize_ptq(copy.deepcopy(model), "dynamic", torch.randn(4, 1, 16, 16))
    int8_shapes = sorted(tuple(t.shape) for t in measure.deployed_tensors(converted).values() if t.dtype == torch.int8)
    linear_shapes = sorted(tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear))
    assert int8_shapes == linear_shapes


def test_latency_and_counts():
    model = lenet()
    p50, p95 = measure.latency_ms(model, (1, 16, 16), 8, torch.device("cpu"), repeats=5, warmup=1)
    assert 0 < p50 <= p95
    with torch.no_grad():
        model[1].weight[:, :10] = 0
    params, nonzero = measure.param_counts(model)
    assert params == sum(p.numel() for p in model.parameters()) and nonzero <= params - 10 * model[1].weight.shape[0]


# ───────────────────────────── checkpoints ─────────────────────────────


class Payload:  # a pickled object a weights_only load must refuse
    pass


def test_checkpoint_round_trip_is_atomic_and_a_pickled_object_is_refused(tmp_path):
    model = lenet()
    path = save_checkpoint(model.state_dict(), tmp_path / "ck" / "model.pt")
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temp file left behind
    state = load_checkpoint(path)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    bad = tmp_path / "bad.pt"
    torch.save({"weight": torch.zeros(2), "extra": Payload()}, bad)
    with pytest.raises(CheckpointError, match="refused: it holds pickled Python objects"):
        load_checkpoint(bad)
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_checkpoint(tmp_path / "list.pt")


# ───────────────────────────── pruning ─────────────────────────────


@pytest.mark.parametrize("method", ["l1_unstructured", "random_unstructured", "global_unstructured"])
def test_pruned_masks_are_permanent_and_sparsity_matches_the_amount(method):
    model = lenet()
    pr.apply_masks(model, method, 0.5)
    pr.make_permanent(model)
    keys = set(model.state_dict())
    assert not any(k.endswith(("weight_orig", "weight_mask")) for k in keys)
    assert all(not m._forward_pre_hooks for m in model.modules())
    sp = pr.sparsity(model)
    assert sp["global"] == pytest.approx(0.5, abs=0.01)
    if method != "global_unstructured":  # per layer: each layer loses its share
        assert all(v == pytest.approx(0.5, abs=0.02) for v in sp.values())
    params, nonzero = measure.param_counts(model)
    weights = sum(m.weight.numel() for _, m in pr.prunable(model))
    assert params - nonzero >= round(0.49 * weights)


def test_a_pruned_model_fine_tunes_with_its_masks_on():
    """During fine-tuning the masks stay on, so each weight is computed (not a leaf): the training
    loop's FLOP probe used to deep-copy the model and failed on every fine-tuned pruning variant."""
    from cnnbench import data as datamod
    from cnnbench.config import Experiment
    from cnnbench.train import train

    exp = Experiment.model_validate({"data": {"dataset": "synthetic", "batch_size": 64,
                                              "synthetic": {"train_size": 256, "test_size": 64, "image_size": 16}},
                                     "train": {"epochs": 1}, "device": "cpu"})
    model = lenet().train()
    pr.apply_masks(model, "l1_unstructured", 0.5)
    before = pr.sparsity(model)["global"]
    result = train(exp, 0, datamod.split(datamod.load(exp.data), 0.1), torch.device("cpu"), model=model)
    assert result.status == "finished" and result.metrics["train_gflops"] > 0
    assert pr.sparsity(model)["global"] == pytest.approx(before)  # the masks held through the update


def test_iterative_steps_reach_the_amount_and_ln_structured_zeroes_whole_filters():
    model = lenet()
    for _ in range(3):
        pr.apply_masks(model, "l1_unstructured", pr.step_amount(0.9, 3))
    pr.make_permanent(model)
    assert pr.sparsity(model)["global"] == pytest.approx(0.9, abs=0.01)
    model = lenet()
    pr.apply_masks(model, "ln_structured", 0.5)
    pr.make_permanent(model)
    conv = model[0][0]
    zero_filters = (conv.weight.flatten(1).abs().sum(1) == 0).sum().item()
    assert zero_filters == 3  # half of 6


def test_channel_pruning_rebuilds_smaller_layers_that_compute_the_same_function():
    model = lenet(size=28)
    ref = copy.deepcopy(model)
    x = torch.randn(4, 1, 28, 28)
    small = pr.prune_channels(copy.deepcopy(model), 0.5)
    convs = [m for m in small.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [3, 8] and convs[1].in_channels == 3
    assert measure.param_counts(small)[0] < measure.param_counts(model)[0]
    # the same network with the removed filters (and their biases) zeroed gives the same outputs; a filter's
    # L1 norm counts only the input channels that survived the layer before
    alive = torch.arange(1)
    for conv, kept in zip([m for m in ref.modules() if isinstance(m, nn.Conv2d)], convs):
        norms = conv.weight.detach()[:, alive].abs().flatten(1).sum(1)
        order = norms.argsort()
        drop, alive = order[: conv.out_channels - kept.out_channels], order[conv.out_channels - kept.out_channels:].sort().values
        with torch.no_grad():
            conv.weight[drop] = 0
            conv.bias[drop] = 0
    with torch.no_grad():
        assert torch.allclose(small(x), ref(x), atol=1e-5)
    with pytest.raises(ValueError, match="sequential conv nets"):
        pr.prune_channels(MODELS.create("resnet", in_channels=1, num_classes=10, image_size=28, depth=8), 0.5)


# ───────────────────────────── distillation ─────────────────────────────


def test_distillation_loss_mixes_soft_and_hard_targets_and_freezes_the_teacher():
    teacher, student = lenet(1), lenet(2).train()
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    hard_only = distillation_loss(teacher, 4.0, 0.0)
    logits = student(x)
    assert torch.allclose(hard_only(logits, y, x), nn.functional.cross_entropy(logits, y))
    loss = distillation_loss(teacher, 4.0, 1.0)(logits, y, x)
    same = distillation_loss(teacher, 4.0, 1.0)(teacher(x), y, x)  # the teacher itself: KL 0
    assert loss > 0 and same.abs() < 1e-5
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())


# ───────────────────────────── suites: validation ─────────────────────────────


COMPRESSION_SUITE = """\
name: comp
question: Does compressing a tiny net on synthetic blobs cost accuracy?
base:
  data: {dataset: synthetic, batch_size: 64, eval_batch_size: 64, val_fraction: 0.25, synthetic: {train_size: 256, test_size: 128, image_size: 28}}
  model: {name: lenet5}
  optimizer: {name: sgd, lr: 0.05, momentum: 0.9}
  train: {epochs: 2}
  device: cpu
  inference: {repeats: 2, warmup: 1}
variants:
  fp32: {}
  static: {quantize: {method: static, calibration_batches: 2}, inference: {compile: never}}
  qat: {quantize: {method: qat, qat_epochs: 1}, inference: {compile: never}}
  pruned: {prune: {method: l1_unstructured, amount: 0.5}}
  channels: {prune: {method: channel, amount: 0.5, finetune_epochs: 1}}
  distilled: {model: {name: simple_cnn, kwargs: {width: 4, depth: 2}}, distill: {teacher: fp32, temperature: 4}}
baseline: fp32
seeds: 2
"""


def load(path, *overrides):
    return load_suite(path, overrides, registries=all_registries())


def problems(path, *overrides) -> list[str]:
    with pytest.raises(SuiteError) as e:
        load(path, *overrides)
    return [str(p) for p in e.value.problems]


def test_compression_suite_validates_and_sources_change_dependents_fingerprints(tmp_path):
    path = write_suite(tmp_path / "comp.yaml", COMPRESSION_SUITE)
    suite = load(path)
    before = {v: e.fingerprint(0) for v, e in suite.experiments.items()}
    changed = load(path, "base.optimizer.lr=0.04")
    after = {v: e.fingerprint(0) for v, e in changed.experiments.items()}
    assert all(before[v] != after[v] for v in before)
    # a variant that does not depend on fp32 keeps its identity; the distilled one does not
    only_fp32 = load(path, "variants.fp32.train.epochs=3", "variants.alone={model: {name: mnist_net}}")
    assert only_fp32.experiments["alone"].fingerprint(0) == load(path, "variants.alone={model: {name: mnist_net}}") \
        .experiments["alone"].fingerprint(0)
    assert only_fp32.experiments["distilled"].fingerprint(0) != before["distilled"]
    assert only_fp32.experiments["static"].fingerprint(0) != before["static"]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("variants.static.start_from=fp23", "variants.static.start_from: 'fp23' is neither a variant nor an existing "
                                            "checkpoint file; did you mean 'fp32'?"),
        ("variants.static.model.name=mnist_net", "the model of 'static' must be that of its source 'fp32'"),
        ("variants.fp32.prune={method: channel, amount: 0.5}", "cannot be its source itself"),
        ("variants.distilled.start_from=fp32", "start_from is for variants that quantize, prune or factorize"),
        ("variants.distilled.distill.teacher=pruned", "'pruned' compresses a trained model itself"),
        ("variants.static.quantize.method=int4", "variants.static.quantize.method: Input should be 'dynamic', 'static' or 'qat'"),
        ("variants.pruned.prune.amount=1.5", "variants.pruned.prune.amount: Input should be less than 1"),
        ("variants.pruned.prune.schedule=iterative", "set finetune_epochs ≥ 1"),
        ("variants.distilled.quantize.method=static", "distill trains a student from scratch"),
    ],
)
def test_bad_compression_input_names_line_key_and_fix(tmp_path, override, expected):
    path = write_suite(tmp_path / "comp.yaml", COMPRESSION_SUITE)
    found = problems(path, override)
    assert any(expected in p for p in found), found


def test_a_bad_start_from_in_the_file_points_at_its_line(tmp_path, cli):
    text = COMPRESSION_SUITE.replace("static: {quantize:", "static: {start_from: nowhere.pt, quantize:")
    path = write_suite(tmp_path / "comp.yaml", text)
    result = cli("validate", path)
    assert result.exit_code == 2
    assert "comp.yaml:12: variants.static.start_from: 'nowhere.pt' is neither a variant nor an existing checkpoint" \
        in result.output


# ───────────────────────────── suites: end to end ─────────────────────────────


def client() -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{Path.cwd() / 'mlflow.db'}")


def child_runs(suite: str):
    exp = client().get_experiment_by_name(suite)
    return client().search_runs([exp.experiment_id], "tags.`cnnbench.role` = 'run'", max_results=1000)


@pytest.fixture
def count_trainings(monkeypatch):
    """Counts trainings from scratch: calls of the real ``train`` without starting weights."""
    import cnnbench.train

    real, calls = cnnbench.train.train, []

    def spy(exp, seed, split, device, *args, **kwargs):
        if kwargs.get("model") is None:
            calls.append(seed)
        return real(exp, seed, split, device, *args, **kwargs)

    monkeypatch.setattr(cnnbench.train, "train", spy)
    return calls


def test_finetune_is_the_same_epochs_control_that_changes_nothing_else(cli, workdir, count_trainings):
    text = COMPRESSION_SUITE.split("variants:")[0].replace("name: comp", "name: ft") + (
        "variants:\n  fp32: {}\n  more: {finetune: {epochs: 1}, optimizer: {lr: 0.01}}\n"
        "baseline: fp32\nseeds: 1\nreport: {against: {}}\n")
    result = cli("run", write_suite(workdir / "ft.yaml", text), "-q")
    assert result.exit_code == 0, result.output
    assert len(count_trainings) == 1  # `more` trains on from fp32's weights, not from scratch
    runs = {r.info.run_name: r for r in child_runs("ft")}
    fp32, more = runs["fp32/seed0"].data, runs["more/seed0"].data
    assert more.tags["cnnbench.compression"] == "fine-tune 1 epoch, every layer, nothing removed"
    assert more.metrics["params"] == fp32.metrics["params"] and more.metrics["nonzero_params"] == fp32.metrics["params"]
    assert more.metrics["test_loss"] != fp32.metrics["test_loss"]  # it did train
    [msg] = problems(write_suite(workdir / "bad.yaml", text.replace("epochs: 1}", "epochs: 0}")))
    assert "variants.more.finetune.epochs: Input should be greater than 0" in msg


def test_batch_norm_folds_into_the_convs_and_every_deployed_form_matches_the_trained_model():
    from torch.export import export

    from cnnbench.techniques.deploy import fuse_bn

    torch.manual_seed(0)
    model = MODELS.create("lenet5", in_channels=1, num_classes=10, image_size=28, norm="batch")
    model.train()(torch.randn(64, 1, 28, 28))  # running statistics that are not the identity
    model.eval()
    x = torch.randn(8, 1, 28, 28)
    fused = fuse_bn(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    # each BatchNorm2d (2 × its channels) goes; its bias-free conv gains a bias (1 × channels)
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in model.parameters()) - (6 + 16)
    with torch.no_grad():
        assert (fused(x) - model(x)).abs().max() < 1e-4
        assert torch.equal(export(fused, (x,)).module()(x), fused(x))


def test_deployment_variants_record_their_form_and_how_far_their_outputs_moved(cli, workdir, count_trainings):
    text = COMPRESSION_SUITE.split("variants:")[0].replace("name: comp", "name: dep").replace(
        "model: {name: lenet5}", "model: {name: lenet5, norm: batch}") + (
        "variants:\n  eager: {}\n  fused: {deploy: {fuse_bn: true}}\n"
        "  fused_exported: {deploy: {fuse_bn: true, form: exported}}\nbaseline: eager\nseeds: 1\n")
    result = cli("run", write_suite(workdir / "dep.yaml", text), "-q")
    assert result.exit_code == 0, result.output
    assert len(count_trainings) == 1  # the deployed forms reuse the trained baseline
    runs = {r.info.run_name: r.data for r in child_runs("dep")}
    for name, tag in (("fused", "batch norm folded into convs, eager"),
                      ("fused_exported", "batch norm folded into convs, torch.export")):
        assert runs[f"{name}/seed0"].tags["cnnbench.deployment"] == tag
        assert runs[f"{name}/seed0"].metrics["deploy_max_abs_diff"] < 1e-4
        assert runs[f"{name}/seed0"].metrics["params"] == runs["eager/seed0"].metrics["params"] - (6 + 16)
        assert abs(runs[f"{name}/seed0"].metrics["test_accuracy"] - runs["eager/seed0"].metrics["test_accuracy"]) < 0.01
    [msg] = problems(write_suite(workdir / "bad.yaml", text.replace(
        "fused: {deploy: {fuse_bn: true}}", "fused: {deploy: {fuse_bn: true}, quantize: {method: static}}")))
    assert "quantize deploys its own int8 graph (compiled); remove deploy from this variant" in msg


TRANSFER_SUITE = """\
name: tr
question: Does pretraining on two classes help with two others?
base:
  data: {dataset: synthetic, batch_size: 32, val_fraction: 0.25, classes: [2, 3], synthetic: {num_classes: 4, train_size: 512, test_size: 256, image_size: 16}}
  model: {name: lenet5}
  optimizer: {name: sgd, lr: 0.05, momentum: 0.9}
  train: {epochs: 2}
  device: cpu
  inference: {enabled: false}
variants:
  scratch: {}
  pretrain: {data: {classes: [0, 1]}}
  finetune: {finetune: {epochs: 2, new_head: true}, start_from: pretrain}
  frozen: {finetune: {epochs: 2, new_head: true, freeze: backbone}, start_from: pretrain}
baseline: scratch
seeds: 2
report: {not_compared: [pretrain], timing: {enabled: false}}
"""


def test_transfer_fine_tunes_a_source_trained_on_other_classes_and_freezing_keeps_its_backbone(cli, workdir):
    from cnnbench import data as datamod
    from cnnbench.posttraining import run_post_training
    from cnnbench.train import train

    path = write_suite(workdir / "tr.yaml", TRANSFER_SUITE)
    result = cli("run", path, "-q")
    assert result.exit_code == 0, result.output
    runs = {r.info.run_name: r.data for r in child_runs("tr")}
    assert runs["frozen/seed0"].tags["cnnbench.compression"] == "fine-tune 2 epochs, the last layer only, new head"
    report = (workdir / "reports" / "tr.md").read_text()
    assert "| pretrain (not compared) " in report
    row = next(line for line in (workdir / "reports" / "README.md").read_text().splitlines() if line.startswith("| [tr]"))
    assert "`pretrain`" not in row and re.search(r"\| [012] of 2 \|", row), row  # two comparisons: pretrain is not one

    # freeze: backbone trains the classifier alone, on the source's features
    suite = load(path)
    source, frozen = suite.experiments["pretrain"], suite.experiments["frozen"]
    src = train(source, 0, datamod.split(datamod.load(source.data), 0.25), torch.device("cpu"))
    state = {k: v.clone() for k, v in src.model.state_dict().items()}
    out = run_post_training(frozen, 0, datamod.split(datamod.load(frozen.data), 0.25), torch.device("cpu"), state)
    after = out.model.state_dict()
    head = [k for k in after if k.startswith("7.")]  # lenet5's last Linear
    assert head and all(not torch.equal(after[k], state[k]) for k in head)
    assert all(torch.equal(after[k], state[k]) for k in after if k not in head)
    assert all(p.requires_grad for p in out.model.parameters())  # unfrozen again afterwards


@pytest.mark.slow
def test_compression_variants_reuse_the_trained_baseline_and_record_inference_metrics(cli, workdir, count_trainings):
    path = write_suite(workdir / "comp.yaml", COMPRESSION_SUITE)
    result = cli("run", path, "-q")
    assert result.exit_code == 0, result.output
    assert "12 finished" in result.output
    # fp32 and distilled train from scratch once per seed; every compression variant reuses fp32
    assert len(count_trainings) == 2 * 2
    runs = {r.info.run_name: r for r in child_runs("comp")}
    for name, run in runs.items():
        m = run.data.metrics
        for key in ("latency_bs1_p50_ms", "latency_bs1_p95_ms", "latency_bs64_p50_ms", "latency_bs64_p95_ms",
                    "inference_throughput", "model_size_bytes", "params", "nonzero_params", "flops", "test_accuracy"):
            assert key in m, (name, key)
        assert m["latency_bs64_p50_ms"] <= m["latency_bs64_p95_ms"]
    fp32, static, pruned = (runs[f"{v}/seed0"].data.metrics for v in ("fp32", "static", "pruned"))
    assert fp32["model_size_bytes"] / static["model_size_bytes"] > 3.3
    assert static["params"] == fp32["params"]
    assert pruned["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert pruned["nonzero_params"] < 0.6 * fp32["params"]
    assert runs["channels/seed0"].data.metrics["params"] < fp32["params"]
    assert "Conv2d and Linear" in runs["static/seed0"].data.tags["cnnbench.compression"]
    assert "masks made permanent" in runs["pruned/seed1"].data.tags["cnnbench.compression"]
    # pruning without fine-tuning keeps the baseline's untouched weights: its accuracy is close to it
    sparsity = json.loads(Path(client().download_artifacts(runs["pruned/seed0"].info.run_id, "sparsity.json",
                                                           str(workdir))).read_text())
    assert sparsity["global"] == pytest.approx(0.5, abs=0.01) and len(sparsity) == 6
    assert "checkpoint/model.pt" in [f.path for f in client().list_artifacts(runs["fp32/seed1"].info.run_id, "checkpoint")]

    # again: everything is reused; a new compression variant loads fp32's checkpoint from MLflow
    count_trainings.clear()
    result = cli("run", path, "-q", "--set", "variants.dynamic.quantize.method=dynamic",
                 "--set", "variants.dynamic.inference.compile=never")
    assert result.exit_code == 0, result.output
    assert "2 finished" in result.output and "12 reused" in result.output
    assert count_trainings == []
    report = (workdir / "reports" / "comp.md").read_text()
    assert "comp_latency.png" in report and "comp_size.png" in report and "Linear only" in report


@pytest.mark.slow
def test_checkpoint_sources_pickles_refused_and_compiled_int8_matches_the_graph(cli, workdir, count_trainings):
    model = lenet(size=28)
    save_checkpoint(model.state_dict(), workdir / "good.pt")
    torch.save({**model.state_dict(), "payload": Payload()}, workdir / "evil.pt")
    text = COMPRESSION_SUITE.split("variants:")[0] + """variants:
  fp32: {}
  from_file: {start_from: good.pt, quantize: {method: static, calibration_batches: 2}}
  evil: {start_from: evil.pt, prune: {method: l1_unstructured, amount: 0.5}}
baseline: fp32
seeds: 1
"""
    result = cli("run", write_suite(workdir / "ck.yaml", text), "-q")
    assert result.exit_code == 1, result.output  # the evil checkpoint's run failed; the suite went on
    runs = {r.info.run_name: r for r in child_runs("comp")}
    assert runs["evil/seed0"].data.tags["cnnbench.status"] == "failed"
    assert "refused: it holds pickled Python objects" in runs["evil/seed0"].data.tags["cnnbench.reason"]
    good = runs["from_file/seed0"]
    assert good.data.tags["cnnbench.status"] == "finished", good.data.tags.get("cnnbench.reason")
    assert "torch.compile (inductor)" in good.data.tags["cnnbench.inference"]
    assert len(count_trainings) == 1  # only fp32 trained; from_file started from the file
