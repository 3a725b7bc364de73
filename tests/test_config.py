import pytest

from cnnbench.config import (
    Experiment,
    SuiteError,
    apply_overrides,
    deep_merge,
    flatten,
    load_suite,
    parse_override,
    plan,
)
from cnnbench.registries import all_registries
from tests.conftest import SUITES, TINY_SUITE, write_suite


def load(path, *overrides):
    return load_suite(path, overrides, registries=all_registries())


def problems(path, *overrides) -> list[str]:
    with pytest.raises(SuiteError) as e:
        load(path, *overrides)
    return [str(p) for p in e.value.problems]


def test_deep_merge_merges_dicts_and_replaces_everything_else():
    base = {"data": {"dataset": "digits", "augment": ["a"]}, "model": {"name": "lenet5", "norm": "none"}}
    out = deep_merge(base, {"model": {"norm": "batch"}, "data": {"augment": ["b"]}})
    assert out == {"data": {"dataset": "digits", "augment": ["b"]}, "model": {"name": "lenet5", "norm": "batch"}}
    assert base["model"]["norm"] == "none"  # not mutated


def test_override_values_are_typed_as_yaml():
    assert parse_override("base.train.epochs=1") == (["base", "train", "epochs"], 1)
    assert parse_override("seeds=[0, 5]") == (["seeds"], [0, 5])
    assert parse_override("base.optimizer.lr=1e-3") == (["base", "optimizer", "lr"], 0.001)
    assert parse_override("base.model.name=mnist_net") == (["base", "model", "name"], "mnist_net")
    data, origins = apply_overrides({"a": {"b": 1}}, ["a.c.d=true"])
    assert data == {"a": {"b": 1, "c": {"d": True}}}
    assert origins == {("a", "c", "d"): "--set a.c.d=true"}


def test_quickstart_loads_and_variants_are_merged_over_base():
    suite = load(SUITES / "quickstart.yaml")
    assert suite.name == "quickstart"
    assert suite.seed_list() == list(range(6)) and suite.adaptive  # rounds of 4, 6 seeds
    assert suite.experiments["batchnorm"].model.norm == "batch"
    assert suite.experiments["batchnorm"].model.name == "lenet5"  # kept from base
    assert suite.experiments["adam"].optimizer.lr == 0.001
    assert suite.experiments["augment"].data.augment == [{"random_crop": {"padding": 2}}, {"rotation": {"degrees": 10}}]
    assert suite.experiments["augment"].data.image_size == 16  # kept from base
    specs = plan(suite)
    assert len(specs) == 24 and specs[0].run_name == "baseline/seed0" and specs[0].is_baseline


def test_set_overrides_apply_before_validation():
    suite = load(SUITES / "quickstart.yaml", "base.train.epochs=1", "seeds=1", "variants.adam.optimizer.lr=0.01")
    assert suite.seed_list() == [0]
    assert all(e.train.epochs == 1 for e in suite.experiments.values())
    assert suite.experiments["adam"].optimizer.lr == 0.01


@pytest.mark.parametrize("name", sorted(p.name for p in SUITES.glob("*.yaml")))
def test_shipped_suites_are_valid_and_named_after_their_file(name):
    suite = load(SUITES / name)
    assert suite.name == name.removesuffix(".yaml")


def test_fingerprint_changes_with_config_and_seed_only():
    a, b = Experiment(), Experiment()
    assert a.fingerprint(0) == b.fingerprint(0)
    assert a.fingerprint(0) != a.fingerprint(1)
    assert a.fingerprint(0) != Experiment(optimizer={"lr": 0.1}).fingerprint(0)


def test_flatten_gives_dotted_keys():
    flat = flatten(Experiment().model_dump(mode="json"))
    assert flat["optimizer.lr"] == 0.05 and flat["data.dataset"] == "digits" and flat["train.epochs"] == 5


def test_unknown_key_names_line_path_and_suggestion(tmp_path):
    p = write_suite(tmp_path / "s.yaml", TINY_SUITE.replace("train: {epochs: 2", "train: {epocs: 2"))
    [msg] = problems(p)
    assert msg.startswith(f"{p}:7: base.train.epocs: unknown key 'epocs'; did you mean 'epochs'?")
    assert "early_stopping_patience, epochs, grad_clip_norm," in msg and "allowed: channels_last," in msg


def test_unknown_registry_name_in_a_variant_points_at_the_variant_line(tmp_path):
    p = write_suite(tmp_path / "s.yaml", TINY_SUITE.replace("{name: adam, lr", "{name: adamm, lr"))
    [msg] = problems(p)
    assert msg.startswith(f"{p}:11: variants.adam.optimizer.name: unknown optimizer 'adamm'; did you mean 'adam'?")
    assert "available: adagrad, adam, adamw, rmsprop, sgd (or any torch.optim class by name" in msg


def test_every_problem_is_listed_at_once(tmp_path):
    text = TINY_SUITE.replace("batch_size: 64", "batch_size: -1").replace("baseline: sgd", "baseline: sdg")
    text = text.replace("{name: lenet5}", "{name: lenet}")
    msgs = problems(write_suite(tmp_path / "s.yaml", text))
    joined = "\n".join(msgs)
    assert "base.data.batch_size: Input should be greater than 0 (got -1)" in joined
    assert "base.model.name: unknown model 'lenet'; did you mean 'lenet5'?" in joined
    assert "baseline 'sdg' is not a variant; did you mean 'sgd'?" in joined


def test_bad_set_override_is_located_at_the_flag(tmp_path):
    p = write_suite(tmp_path / "s.yaml", TINY_SUITE)
    [msg] = problems(p, "base.train.epochs=zero")
    assert msg.startswith("--set base.train.epochs=zero: base.train.epochs: Input should be a valid integer")


def test_yaml_syntax_error_duplicate_key_and_missing_file(tmp_path):
    [msg] = problems(write_suite(tmp_path / "a.yaml", "name: x\nbase: {data: [\n"))
    assert "not valid YAML" in msg and "a.yaml:" in msg
    [msg] = problems(write_suite(tmp_path / "b.yaml", TINY_SUITE + "seeds: 3\n"))
    assert "b.yaml:14: seeds: duplicate key (first at line 13)" in msg
    [msg] = problems(tmp_path / "nope.yaml")
    assert "no such file" in msg


def test_structural_rules(tmp_path):
    msgs = problems(write_suite(tmp_path / "s.yaml", TINY_SUITE.replace("seeds: 2", "seeds: [1, 1]")))
    assert any("distinct seeds" in m for m in msgs)
    msgs = problems(write_suite(tmp_path / "t.yaml", TINY_SUITE.replace("momentum: 0.9}", "momentum: 0.0, nesterov: true}")))
    assert any("nesterov: true needs momentum > 0" in m for m in msgs)
    msgs = problems(write_suite(tmp_path / "u.yaml", TINY_SUITE.replace("device: cpu", "device: gpu")))
    assert any("base.device: String should match pattern" in m for m in msgs)


def test_report_against_names_variants_and_gives_the_baseline_none(tmp_path):
    three = TINY_SUITE.replace("  adam: {optimizer: {name: adam, lr: 0.001}}\n",
                               "  adam: {optimizer: {name: adam, lr: 0.001}}\n  adam_wd: {optimizer: {name: adam, weight_decay: 0.01}}\n")
    suite = load(write_suite(tmp_path / "ok.yaml", three + "report: {against: {adam_wd: adam}}\n"))
    assert suite.reference("adam_wd") == "adam" and suite.reference("adam") == "sgd"
    [msg] = problems(write_suite(tmp_path / "a.yaml", three + "report: {against: {adam_wd: adma}}\n"))
    assert "report.against: reference 'adma' is not a variant; did you mean 'adam'?" in msg
    [msg] = problems(write_suite(tmp_path / "b.yaml", three + "report: {against: {sgd: adam}}\n"))
    assert "the baseline 'sgd' is what the others are compared with" in msg
    [msg] = problems(write_suite(tmp_path / "c.yaml", three + "report: {against: {adam: adam}}\n"))
    assert "'adam' cannot be compared with itself" in msg
    assert load(write_suite(tmp_path / "d.yaml", three + "report: {not_compared: [adam_wd]}\n")).compared() == ["sgd", "adam"]
    [msg] = problems(write_suite(tmp_path / "e.yaml", three + "report: {not_compared: [adam], against: {adam_wd: adam}}\n"))
    assert "report.not_compared: 'adam' is what other variants are compared with" in msg
    [msg] = problems(write_suite(tmp_path / "f.yaml", three + "report: {not_compared: [sgd]}\n"))
    assert "report.not_compared: 'sgd' is what other variants are compared with" in msg


def test_registry_names_are_not_checked_without_registries(tmp_path):
    """`cnnbench report` validates structure only (no torch import needed)."""
    p = write_suite(tmp_path / "s.yaml", TINY_SUITE.replace("{name: lenet5}", "{name: not_a_model}"))
    assert load_suite(p).experiments["sgd"].model.name == "not_a_model"


def test_horizontal_flip_on_digits_is_allowed_with_a_warning(tmp_path):
    text = TINY_SUITE.replace("  adam: {optimizer: {name: adam, lr: 0.001}}", "  flip: {data: {augment: [horizontal_flip]}}")
    assert load(write_suite(tmp_path / "a.yaml", text)).warnings == []  # synthetic data: fine
    suite = load(write_suite(tmp_path / "b.yaml", text.replace("dataset: synthetic", "dataset: digits")))
    [warning] = suite.warnings
    assert warning.startswith(f"{tmp_path / 'b.yaml'}:11: variants.flip.data.augment: horizontal_flip on digits")


def test_model_knobs_and_kwargs_are_checked_against_the_factory(tmp_path):
    text = TINY_SUITE.replace("{name: lenet5}", "{name: resnet, kwargs: {dept: 20}}")
    [msg] = problems(write_suite(tmp_path / "s.yaml", text))
    assert msg.endswith("s.yaml:5: base.model: model 'resnet' has no argument 'dept'; did you mean 'depth'? it takes: norm, activation, dropout, dropout2d, num_groups, depth, width, cbam, cbam_reduction, dropblock, dropblock_size, stochastic_depth")
    text = TINY_SUITE.replace("{name: lenet5}", "{name: torchvision.resnet18, norm: batch}")
    [msg] = problems(write_suite(tmp_path / "s.yaml", text))
    assert "model 'torchvision.resnet18' has no 'norm' knob" in msg
    # torchvision builders take their own kwargs; an unknown torchvision name is an unknown model
    load(write_suite(tmp_path / "s.yaml", TINY_SUITE.replace("{name: lenet5}", "{name: torchvision.resnet18, kwargs: {zero_init_residual: true}}")))
    [msg] = problems(write_suite(tmp_path / "s.yaml", TINY_SUITE.replace("{name: lenet5}", "{name: torchvision.resnet19}")))
    assert "unknown model 'torchvision.resnet19'" in msg and "torchvision.<name>" in msg


def test_a_censored_metric_cannot_be_the_primary(tmp_path):
    text = TINY_SUITE + "report: {primary: time_to_target_s}\n"
    [msg] = problems(write_suite(tmp_path / "s.yaml", text))
    assert "report.primary: 'time_to_target_s' cannot be the primary metric: it is censored" in msg
