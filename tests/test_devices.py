"""Devices and speed knobs: auto selection, absent/unsupported devices, autocast, GradScaler, compile,
per-run settings, FLOPs/MFU — and, where torch_xla is installed (the .venv-xla of .ci/run), XLA for real."""

import importlib.util
import math
import os

import mlflow
import pytest
import torch

from cnnbench import devices
from cnnbench.train import train
from tests.conftest import SUITES
from tests.test_models_data import _experiment, _split  # the same tiny synthetic experiment

HAS_XLA = importlib.util.find_spec("torch_xla") is not None
xla = pytest.mark.skipif(not HAS_XLA, reason="torch_xla not installed (run in .venv-xla: see README, TPU / XLA)")


PROBE_BATCH = 2  # model construction (batch 1) and measure.flops_per_sample (batch 2) run fp32 probes: not training steps


def _conv_output_dtypes(exp, device=torch.device("cpu")):
    """Train ``exp`` and record the dtype of every Conv2d output seen in training mode."""
    seen = set()

    def hook(module, args, out):
        if module.training and out.shape[0] > PROBE_BATCH:
            seen.add(out.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, a, o: hook(m, a, o) if isinstance(m, torch.nn.Conv2d) else None)
    try:
        result = train(exp, 0, _split(exp), device)
    finally:
        handle.remove()
    return result, seen


# ── selection and absence ────────────────────────────────────────────────────


def test_auto_picks_an_accelerator_only_when_present(monkeypatch):
    monkeypatch.delenv("PJRT_DEVICE", raising=False)
    picked = devices.resolve("auto")
    if torch.cuda.is_available():
        assert picked.type == "cuda"
    elif not torch.backends.mps.is_available():
        assert picked.type == "cpu"  # xla is never picked unless PJRT_DEVICE configures it
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert devices.resolve("auto").type == ("xla" if HAS_XLA else "cpu")


@pytest.mark.skipif(HAS_XLA, reason="checks the message shown when torch_xla is missing")
def test_xla_without_torch_xla_is_unavailable_with_an_install_hint(cli, workdir):
    with pytest.raises(devices.DeviceUnavailable, match=r"torch_xla.*\.\[tpu\]"):
        devices.resolve("xla")
    suite = workdir / "s.yaml"
    suite.write_text((SUITES / "quickstart.yaml").read_text())
    result = cli("run", suite, "--device", "xla")
    assert result.exit_code == 2 and "torch_xla" in result.output and "Traceback" not in result.output


def _devices_suite(workdir, name: str, devices_: list[str]):
    """A one-seed synthetic suite: a cpu baseline and one variant per device in ``devices_``."""
    suite = workdir / "s.yaml"
    variants = "".join(f"  {d}: {{device: {d}}}\n" for d in devices_)
    suite.write_text(f"""\
name: {name}
question: which devices run?
base:
  data: {{dataset: synthetic, batch_size: 64, synthetic: {{train_size: 256, test_size: 64, image_size: 16}}}}
  model: {{name: lenet5}}
  train: {{epochs: 1}}
  device: cpu
variants:
  cpu: {{}}
{variants}baseline: cpu
seeds: 1
""")
    return suite


def test_a_variant_on_an_absent_or_unable_device_is_skipped_and_the_suite_goes_on(cli, workdir):
    suite = _devices_suite(workdir, "devs", ["xla", "mps"])
    env = {k: os.environ.pop(k) for k in ["PJRT_DEVICE"] if k in os.environ}
    try:
        result = cli("run", suite, "-q")
    finally:
        os.environ.update(env)
    assert result.exit_code == 0, result.output
    runs = {r.data.tags["cnnbench.variant"]: r.data.tags for r in mlflow.search_runs(
        experiment_names=["devs"], filter_string="tags.`cnnbench.role` = 'run'", output_format="list")}
    assert runs["cpu"]["cnnbench.status"] == "finished"
    if not torch.backends.mps.is_available():
        assert runs["mps"]["cnnbench.status"] == "skipped" and "MPS is not available" in runs["mps"]["cnnbench.reason"]
    if not HAS_XLA:
        assert runs["xla"]["cnnbench.status"] == "skipped" and "torch_xla" in runs["xla"]["cnnbench.reason"]


# ── precision, memory format, compile ────────────────────────────────────────


def test_bf16_autocast_on_cpu_runs_convolutions_in_bf16_with_fp32_weights():
    exp = _experiment(train={"precision": "bf16"})
    result, seen = _conv_output_dtypes(exp)
    assert result.status == "finished" and seen == {torch.bfloat16}
    fp32, fp32_seen = _conv_output_dtypes(_experiment())
    assert fp32_seen == {torch.float32}
    # the same training, to within bf16's rounding
    assert result.history[-1]["train_loss"] == pytest.approx(fp32.history[-1]["train_loss"], rel=0.01)
    assert abs(result.metrics["test_accuracy"] - fp32.metrics["test_accuracy"]) <= 0.05


def test_fp16_on_cpu_uses_a_grad_scaler(monkeypatch):
    """fp16 autocast on the CPU where torch supports it, with dynamic loss scaling."""
    scaled = []
    original = torch.amp.GradScaler.scale
    monkeypatch.setattr(torch.amp.GradScaler, "scale", lambda self, x: scaled.append(self.get_scale()) or original(self, x))
    exp = _experiment(train={"precision": "fp16"})
    result, seen = _conv_output_dtypes(exp)
    assert result.status == "finished" and seen == {torch.float16}
    steps = 2 * math.ceil(len(_split(exp).train_idx) / 64)
    assert len(scaled) == steps and scaled[0] == 65536.0  # every step of the 2 epochs was scaled
    fp32 = train(_experiment(), 0, _split(exp), torch.device("cpu"))
    assert result.history[-1]["train_loss"] == pytest.approx(fp32.history[-1]["train_loss"], rel=0.01)


def test_channels_last_trains_the_same_model_in_nhwc():
    formats = []
    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, a: formats.append(a[0].is_contiguous(memory_format=torch.channels_last))
        if isinstance(m, torch.nn.Conv2d) and m.training and a[0].shape[0] > PROBE_BATCH else None)
    try:
        cl = train(_experiment(train={"channels_last": True}), 0, _split(_experiment()), torch.device("cpu"))
    finally:
        handle.remove()
    plain = train(_experiment(), 0, _split(_experiment()), torch.device("cpu"))
    assert formats and all(formats)
    assert abs(cl.metrics["test_accuracy"] - plain.metrics["test_accuracy"]) <= 0.05


def test_compile_time_is_its_own_metric_not_hidden_in_throughput():
    exp = _experiment(train={"compile": True, "epochs": 2})
    split = _split(exp)
    n = len(split.train_idx)
    assert n % 64  # a last, smaller batch: a second graph, compiled in epoch 1 — counted too
    result = train(exp, 0, split, torch.device("cpu"))
    m = result.metrics
    assert result.status == "finished"
    assert m["compile_time_s"] > 0.5 and m["compile_time_s"] < m["train_time_s"]
    steady = n * 2 / (m["train_time_s"] - m["compile_time_s"])
    assert m["train_throughput"] == pytest.approx(steady)
    assert train(_experiment(), 0, _split(exp), torch.device("cpu")).metrics["compile_time_s"] == 0.0


def test_run_settings_apply_to_one_run_only():
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, a, o: seen.append((torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())))
    try:
        exp = _experiment(train={"threads": 1, "deterministic": True, "epochs": 1})
        train(exp, 0, _split(exp), torch.device("cpu"))
    finally:
        handle.remove()
    assert set(seen) == {(1, True)}
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == before


def test_flops_and_mfu_are_recorded_against_the_measured_peak(monkeypatch, tmp_path):
    from cnnbench.measure import flops_per_sample, matmul_peak_flops
    from cnnbench.models import build

    monkeypatch.setenv("CNNBENCH_CACHE_DIR", str(tmp_path))
    exp = _experiment(train={"epochs": 1})
    result = train(exp, 0, _split(exp), torch.device("cpu"))
    model = build(exp.model, in_channels=1, num_classes=10, image_size=16)
    step = flops_per_sample(model, (1, 16, 16), backward=True)
    forward = flops_per_sample(model, (1, 16, 16))
    assert 2.5 * forward < step < 3.5 * forward  # backward ≈ twice the forward
    m = result.metrics
    assert m["train_gflops"] == pytest.approx(m["train_throughput"] * step / 1e9)
    peak = matmul_peak_flops(torch.device("cpu"), torch.float32)
    assert (tmp_path / "matmul_peak.json").exists() and m["mfu"] == pytest.approx(m["train_gflops"] * 1e9 / peak)
    assert 0 < m["mfu"] < 1


def test_the_step_flop_count_is_probed_once_per_architecture_and_input(monkeypatch):
    import cnnbench.train as trainmod

    probes = []
    real = trainmod.flops_per_sample
    monkeypatch.setattr(trainmod, "flops_per_sample", lambda *a, **k: probes.append(a[1]) or real(*a, **k))
    monkeypatch.setattr(trainmod, "_STEP_FLOPS", {})
    exp = _experiment(train={"epochs": 1})
    other = _experiment(train={"epochs": 1}, model={"name": "simple_cnn"})
    runs = [train(e, seed, _split(e), torch.device("cpu")) for e, seed in ((exp, 0), (exp, 1), (other, 0), (other, 2))]
    assert len(probes) == 2  # one per architecture: other seeds reuse the count
    gflops_per_img = [r.metrics["train_gflops"] / r.metrics["train_throughput"] for r in runs]
    assert gflops_per_img[0] == pytest.approx(gflops_per_img[1]) and gflops_per_img[2] == pytest.approx(gflops_per_img[3])
    assert gflops_per_img[2] != gflops_per_img[0]  # the other architecture got a count of its own


def test_new_train_knobs_at_their_defaults_keep_old_fingerprints():
    """Runs recorded before these knobs existed did fp32/NCHW/eager: they stay reusable."""
    exp = _experiment()
    assert "precision" not in exp.identity()["train"]
    assert _experiment(train={"precision": "fp32"}).fingerprint(0) == exp.fingerprint(0)
    assert _experiment(train={"precision": "bf16"}).fingerprint(0) != exp.fingerprint(0)


def test_environment_record_names_cpu_features():
    from cnnbench.environment import capsule

    env = capsule(torch.device("cpu"))
    assert "torch dispatch" in env["cpu_flags"] and env["device_type"] == "cpu"


# ── XLA, for real (torch_xla on the CPU with PJRT_DEVICE=CPU) ────────────────


@pytest.mark.xla
@xla
def test_xla_step_reads_nothing_back_inside_the_loop(monkeypatch):
    """One graph per step, no device→host transfer per batch: metrics are gathered at epoch end."""
    import torch_xla.debug.metrics as met

    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    device = devices.resolve("xla")
    exp = _experiment(train={"epochs": 1}, data={"val_fraction": 0.1, "synthetic": {"train_size": 1280}})
    met.clear_all()
    result = train(exp, 0, _split(exp), device)
    batches = 18  # 1152 / 64
    transfers = (met.metric_data("TransferFromDeviceTime") or (0,))[0]
    assert result.status == "finished" and result.metrics["compile_time_s"] > 0
    assert transfers < batches / 2, f"{transfers} device→host transfers for {batches} steps"
    assert met.metric_data("CompileTime")[0] <= 12, "graphs compiled: expected a handful, not one per step"


@pytest.mark.xla
@xla
def test_fp16_on_xla_is_skipped_with_the_reason(monkeypatch):
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    with pytest.raises(devices.Unsupported, match="fp16 on XLA"):
        train(_experiment(train={"precision": "fp16"}), 0, _split(_experiment()), devices.resolve("xla"))


@pytest.mark.xla
@xla
@pytest.mark.slow
def test_quickstart_end_to_end_on_xla(cli, workdir, monkeypatch):
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    suite = workdir / "quickstart.yaml"
    suite.write_text((SUITES / "quickstart.yaml").read_text())
    result = cli("run", suite, "--device", "xla", "--set", "seeds=1", "-q")
    assert result.exit_code == 0, result.output
    runs = mlflow.search_runs(experiment_names=["quickstart"], filter_string="tags.`cnnbench.role` = 'run'",
                              output_format="list")
    assert len(runs) == 4
    for r in runs:
        assert r.data.tags["cnnbench.status"] == "finished" and r.data.tags["cnnbench.device"] == "xla"
        assert r.data.metrics["compile_time_s"] > 0 and r.data.metrics["train_throughput"] > 0
    adam = next(r for r in runs if r.data.tags["cnnbench.variant"] == "adam")
    assert adam.data.metrics["test_accuracy"] > 0.85  # it really learns on XLA
    assert (workdir / "reports" / "quickstart.md").exists()


@pytest.mark.xla
@xla
def test_cpu_then_xla_in_one_suite(cli, workdir, monkeypatch):
    """XLA is started before anything trains: started after a CPU backward pass, it failed inside autograd."""
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    suite = _devices_suite(workdir, "mixed", ["xla"])
    assert cli("run", suite, "-q", "--no-report").exit_code == 0
    runs = mlflow.search_runs(experiment_names=["mixed"], filter_string="tags.`cnnbench.role` = 'run'",
                              output_format="list")
    assert sorted((r.data.tags["cnnbench.device"], r.data.tags["cnnbench.status"]) for r in runs) == [
        ("cpu", "finished"), ("xla", "finished")]


@pytest.mark.xla
@xla
def test_xla_resume_restores_the_device_rng(monkeypatch, tmp_path):
    """Dropout on XLA draws from the device's generator: a run stopped after epoch 1 and resumed from its
    checkpoint ends where the uninterrupted run ends."""
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    device = devices.resolve("xla")
    exp = _experiment(train={"epochs": 2}, model={"dropout": 0.5})
    split = _split(exp)
    whole = train(exp, 0, split, device)

    class Stop(Exception):
        pass

    def stop(record):
        raise Stop

    ckpt = tmp_path / "run.pt"
    with pytest.raises(Stop):
        train(exp, 0, split, device, on_epoch=stop, checkpoint=ckpt)
    resumed = train(exp, 0, split, device, checkpoint=ckpt)
    assert resumed.metrics["resumed_from_epoch"] == 1
    assert resumed.metrics["test_accuracy"] == whole.metrics["test_accuracy"]
    assert resumed.history[-1]["train_loss"] == pytest.approx(whole.history[-1]["train_loss"], rel=1e-6)
