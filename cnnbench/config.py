"""The suite schema: YAML loading with file:line in errors, ``--set`` overrides, deep-merge, plan.

Data flows one way: ``load_suite(path, overrides)`` → :class:`Suite` → :func:`plan` → ``[RunSpec]``.
Nothing here imports torch: registry names are checked only when the caller passes
``registries`` (``run``/``validate`` do, ``report`` does not need to).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from cnnbench.registry import did_you_mean

TUNING_SEED_BASE = 10_000  # search trials train on seeds 10000, 10001, …: never the evaluation seeds

# Bump when the meaning of a config changes (training semantics), so old runs are not reused.
FINGERPRINT_VERSION = 1

DEVICE_PATTERN = r"^(auto|cpu|mps|xla|cuda(:\d+)?)$"

# (section, key) of settings added after FINGERPRINT_VERSION 1; see Experiment.identity
ADDED_AFTER_V1 = [("train", k) for k in ("precision", "channels_last", "compile", "compile_mode", "deterministic",
                                         "cudnn_benchmark")]


# ───────────────────────────── schema ─────────────────────────────


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


def _check_registered(value: str, info: ValidationInfo, kind: str) -> str:
    """Check ``value`` against the registry named ``kind`` when the caller supplied registries."""
    registries = (info.context or {}).get("registries") or {}
    reg = registries.get(kind)
    if reg is not None and value not in reg:
        raise ValueError(reg.unknown_message(value))
    return value


class SyntheticConfig(Strict):
    """Shape of the ``synthetic`` dataset (random class-dependent patterns, for timing)."""

    channels: PositiveInt = 1
    image_size: PositiveInt = 28
    num_classes: int = Field(10, ge=2)
    train_size: PositiveInt = 4096
    test_size: PositiveInt = 1024


AugmentSpec = str | dict[str, dict[str, Any]]


class DataConfig(Strict):
    dataset: str = "digits"
    batch_size: PositiveInt = 64
    eval_batch_size: PositiveInt = 1000
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    augment: list[AugmentSpec] = Field(default_factory=list)
    limit_train: PositiveInt | None = Field(None, description="use only the first N training samples")
    image_size: PositiveInt | None = Field(None, description="resize images to N×N (digits default: 28, imagefolder: 32)")
    path: str | None = Field(None, description="imagefolder: directory with train/ and test/ class folders")
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str, info: ValidationInfo) -> str:
        return _check_registered(v, info, "dataset")

    @field_validator("augment")
    @classmethod
    def _augment(cls, v: list, info: ValidationInfo) -> list:
        for spec in v:
            if isinstance(spec, dict) and len(spec) != 1:
                raise ValueError(f"an augmentation is a name or {{name: {{kwargs}}}}, got {spec!r}")
            name = spec if isinstance(spec, str) else next(iter(spec))
            _check_registered(name, info, "augmentation")
        return v


class ModelConfig(Strict):
    """The model and its knobs; a knob left unset takes the model's own default (see `cnnbench list`)."""

    name: str = "lenet5"
    norm: str | None = Field(None, description="none | batch | group | layer | instance (default: the model's own)")
    activation: str | None = Field(None, description="relu | leaky_relu | elu | gelu | silu | mish (default: the model's own)")
    dropout: float | None = Field(None, ge=0.0, lt=1.0, description="dropout before the linear layers")
    dropout2d: float | None = Field(None, ge=0.0, lt=1.0, description="channel dropout (Dropout2d) after conv blocks")
    num_groups: PositiveInt | None = Field(None, description="norm: group — groups per GroupNorm (reduced to a divisor of the channels)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments of the model factory (width, depth, cbam, …)")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str, info: ValidationInfo) -> str:
        return _check_registered(v, info, "model")

    @field_validator("norm")
    @classmethod
    def _norm(cls, v: str | None, info: ValidationInfo) -> str | None:
        return v if v is None else _check_registered(v, info, "norm")

    @field_validator("activation")
    @classmethod
    def _activation(cls, v: str | None, info: ValidationInfo) -> str | None:
        return v if v is None else _check_registered(v, info, "activation")

    @model_validator(mode="after")
    def _factory_accepts(self, info: ValidationInfo) -> ModelConfig:
        """Knobs and kwargs must be arguments of the model's factory (checked when registries are given)."""
        reg = ((info.context or {}).get("registries") or {}).get("model")
        if reg is None or self.name not in reg:
            return self
        params = inspect.signature(reg.get(self.name)).parameters
        open_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        named = [k for k in params if k not in ("in_channels", "num_classes", "image_size")
                 and params[k].kind is not inspect.Parameter.VAR_KEYWORD]
        for knob in ("norm", "activation", "dropout", "dropout2d", "num_groups"):
            if getattr(self, knob) is not None and knob not in params:
                raise ValueError(f"model '{self.name}' has no '{knob}' knob; it takes: {', '.join(named) or 'only kwargs'}")
        for key in self.kwargs:
            if key in ("in_channels", "num_classes", "image_size"):
                raise ValueError(f"model.kwargs.{key} comes from the dataset; remove it")
            if key not in params and not open_kwargs:
                raise ValueError(f"model '{self.name}' has no argument '{key}';{did_you_mean(key, named)} it takes: {', '.join(named)}")
        return self


class OptimizerConfig(Strict):
    name: str = "sgd"
    lr: PositiveFloat = 0.05
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    decay_norm_and_bias: bool = Field(False, description="also apply weight_decay to biases and norm parameters")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments of the optimizer")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str, info: ValidationInfo) -> str:
        return _check_registered(v, info, "optimizer")

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> OptimizerConfig:
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov: true needs momentum > 0 (set optimizer.momentum, e.g. 0.9)")
        return self


class ScheduleConfig(Strict):
    name: str = "constant"
    step_size: PositiveInt = Field(1, description="step: decay every N epochs")
    milestones: list[PositiveInt] = Field(default_factory=list, description="multistep: epochs at which to decay")
    gamma: PositiveFloat = Field(0.1, description="step/multistep/exponential/plateau: multiplicative decay")
    min_lr: float = Field(0.0, ge=0.0, description="cosine/warmup_cosine/plateau: lowest learning rate")
    warmup_epochs: float = Field(1.0, ge=0.0, description="warmup_cosine: epochs of linear warm-up")
    pct_start: float = Field(0.3, gt=0.0, lt=1.0, description="onecycle: share of the run spent rising")
    patience: NonNegativeInt = Field(2, description="plateau: epochs without improvement tolerated before decaying")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str, info: ValidationInfo) -> str:
        return _check_registered(v, info, "schedule")


class TrainConfig(Strict):
    epochs: PositiveInt = 5
    target_accuracy: float | None = Field(None, gt=0.0, le=1.0, description="validation accuracy for time-to-target")
    threads: PositiveInt | None = Field(None, description="torch.set_num_threads; default: torch's own")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="cross-entropy label smoothing (training loss only)")
    grad_clip_norm: PositiveFloat | None = Field(None, description="clip the global gradient norm to this value")
    early_stopping_patience: PositiveInt | None = Field(
        None, description="stop when validation loss has not improved for N epochs (the final model is tested)")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="torch.autocast dtype for forward + loss (fp16 adds a GradScaler); evaluation uses it too")
    channels_last: bool = Field(False, description="NHWC memory format for the model and its 4-D inputs")
    compile: bool = Field(False, description="torch.compile the training step's model (compile time: its own metric)")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    deterministic: bool = Field(False, description="torch.use_deterministic_algorithms for this run")
    cudnn_benchmark: bool = Field(False, description="torch.backends.cudnn.benchmark for this run (CUDA only)")


class QuantizeConfig(Strict):
    """int8 quantization of a trained model (torchao PT2E with X86InductorQuantizer)."""

    method: Literal["dynamic", "static", "qat"] = Field(
        description="dynamic: Linear layers only, activations quantized at run time; static: Conv and Linear, "
                    "activation ranges calibrated on training batches; qat: static after quantization-aware fine-tuning")
    backend: Literal["x86"] = Field("x86", description="x86: torchao's X86InductorQuantizer (oneDNN int8 kernels via inductor)")
    calibration_batches: PositiveInt = Field(32, description="static: training batches observed to set activation ranges")
    qat_epochs: PositiveInt = Field(1, description="qat: epochs of fine-tuning with fake quantization")


PRUNE_METHODS = ("l1_unstructured", "random_unstructured", "global_unstructured", "ln_structured", "channel")


class PruneConfig(Strict):
    """Pruning of a trained model: torch.nn.utils.prune masks (made permanent), or ``channel``: rebuilt smaller layers."""

    method: Literal["l1_unstructured", "random_unstructured", "global_unstructured", "ln_structured", "channel"] = Field(
        description="l1/random_unstructured: per layer; global_unstructured: smallest weights across all layers; "
                    "ln_structured: zeroes whole output channels (L2 norm); channel: removes output channels and "
                    "rebuilds smaller layers (the only kind that speeds up dense inference)")
    amount: float = Field(gt=0.0, lt=1.0, description="fraction of weights (channels for ln_structured/channel) removed")
    schedule: Literal["one_shot", "iterative"] = "one_shot"
    steps: int = Field(3, ge=2, description="iterative: pruning steps, each followed by finetune_epochs")
    finetune_epochs: NonNegativeInt = Field(0, description="epochs of fine-tuning after pruning (after each step if iterative)")

    @model_validator(mode="after")
    def _iterative_needs_finetuning(self) -> PruneConfig:
        if self.schedule == "iterative" and self.finetune_epochs == 0:
            raise ValueError("schedule: iterative prunes in steps with fine-tuning between them; set finetune_epochs ≥ 1 "
                             "(without it, use schedule: one_shot)")
        if self.schedule == "iterative" and self.method == "channel":
            raise ValueError("channel pruning is one_shot only (set schedule: one_shot)")
        return self


class DistillConfig(Strict):
    """Knowledge distillation: the student (this variant's model) is trained on α·T²·KL(soft targets) + (1-α)·CE."""

    teacher: str = Field(description="a variant of this suite (trained once per seed and reused), a checkpoint file, "
                                     "or runs:/<id>/<path>")
    temperature: PositiveFloat = 4.0
    alpha: float = Field(0.9, ge=0.0, le=1.0, description="weight of the soft-target loss")
    teacher_model: ModelConfig | None = Field(None, description="the teacher's architecture when teacher is a checkpoint")


class InferenceConfig(Strict):
    """How every run's inference latency is measured (batch 1 and 64, after warm-up, synchronized)."""

    enabled: bool = True
    repeats: PositiveInt = Field(50, description="timed forward passes per batch size")
    warmup: NonNegativeInt = Field(10, description="untimed forward passes first")
    compile: Literal["auto", "always", "never"] = Field(
        "auto", description="torch.compile (inductor) the model measured; auto: quantized models only (PT2E int8 "
                            "kernels exist only through inductor)")


COMPRESSION_DEFAULTS = {"start_from": None, "quantize": None, "prune": None, "distill": None,
                        "inference": InferenceConfig().model_dump(mode="json")}


class Experiment(Strict):
    """One complete experiment: what the baseline is, and what every variant resolves to."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    device: str = Field("auto", pattern=DEVICE_PATTERN)
    # ── compression (issue 6): see CompressionFields below ──
    start_from: str | None = Field(None, description="quantize/prune start from: a variant's trained weights (default: "
                                   "the baseline's), a checkpoint file, or an MLflow artifact URI runs:/<id>/<path>")
    quantize: QuantizeConfig | None = None
    prune: PruneConfig | None = None
    distill: DistillConfig | None = None
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    _upstream: str = PrivateAttr("")  # identity of the source/teacher runs this one depends on (set by load_suite)

    @model_validator(mode="after")
    def _one_kind_of_compression(self) -> Experiment:
        if self.distill is not None and (self.quantize is not None or self.prune is not None):
            raise ValueError("distill trains a student from scratch, quantize/prune start from trained weights: use "
                             "two variants (quantize/prune with start_from: <the distilled variant>)")
        return self

    @property
    def compresses(self) -> bool:
        """Starts from trained weights instead of training from scratch."""
        return self.quantize is not None or self.prune is not None

    def identity(self) -> dict:
        """The config as fingerprints see it: settings added after FINGERPRINT_VERSION 1 are left out
        while they hold their default — what every earlier run did — so those runs stay reusable; the
        identity of the runs a compression/distillation variant starts from is added."""
        dump = self.model_dump(mode="json")
        for section, key in ADDED_AFTER_V1:
            default = type(getattr(self, section)).model_fields[key].default
            if dump[section].get(key, default) == default:
                dump[section].pop(key, None)
        for key, default in COMPRESSION_DEFAULTS.items():
            if dump.get(key) == default:
                dump.pop(key)
        if self._upstream:
            dump["upstream"] = self._upstream
        return dump

    def fingerprint(self, seed: int) -> str:
        """Identity of a (config, seed) run: a finished run with the same fingerprint is reused."""
        blob = json.dumps({"v": FINGERPRINT_VERSION, "seed": seed, "config": self.identity()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


CENSORED_METRICS = ("time_to_target_s", "epochs_to_target")  # missing for runs that never reach the target
LOWER_IS_BETTER = re.compile(r"(loss|time|_s$|latency|memory|bytes|params|epochs_to)")


class ReportConfig(Strict):
    primary: str = "test_accuracy"
    metrics: list[str] = Field(
        default_factory=lambda: [
            "test_accuracy",
            "f1_macro",
            "test_loss",
            "train_time_s",
            "train_throughput",
            "time_to_target_s",
            "peak_memory_bytes",
            "params",
        ]
    )
    higher_is_better: bool | None = Field(None, description="for the primary metric; default guessed from its name")
    alpha: float = Field(0.05, gt=0.0, lt=0.5, description="significance level of the verdicts (Holm-corrected)")

    @field_validator("primary")
    @classmethod
    def _not_censored(cls, v: str) -> str:
        if v in CENSORED_METRICS:
            raise ValueError(f"'{v}' cannot be the primary metric: it is censored (runs that never reach the target have "
                             "none), so every report shows it as a Kaplan–Meier median instead; use train_time_s or "
                             "train_throughput for speed")
        return v

    def primary_higher_is_better(self) -> bool:
        return self.is_higher_better(self.primary)

    def is_higher_better(self, metric: str) -> bool:
        if metric == self.primary and self.higher_is_better is not None:
            return self.higher_is_better
        return not LOWER_IS_BETTER.search(metric)


class ParamSpec(Strict):
    """One searched hyperparameter: ``trial.suggest_float`` / ``suggest_int`` / ``suggest_categorical``."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = Field(None, gt=0)
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ParamSpec:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical parameter needs a non-empty 'choices' list")
            if self.low is not None or self.high is not None:
                raise ValueError("a categorical parameter takes 'choices', not low/high")
            return self
        if self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"a {self.type} parameter needs low < high, got low={self.low}, high={self.high}")
        if self.choices is not None:
            raise ValueError(f"'choices' is for categorical parameters; a {self.type} one takes low/high")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs low > 0, got {self.low}")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined (Optuna does not support it)")
        return self

    def grid(self) -> list[Any]:
        """The values a grid search visits: the choices, or low..high in ``step`` (ints: step 1)."""
        if self.type == "categorical":
            return list(self.choices)
        step = self.step or (1 if self.type == "int" else None)
        if step is None:
            raise ValueError("a grid search needs 'step' on float parameters (or use choices)")
        n = int(round((self.high - self.low) / step)) + 1
        values = [self.low + i * step for i in range(n)]
        return [int(v) for v in values] if self.type == "int" else values

    def sample_value(self) -> Any:
        """A value used to check that the parameter's key exists in the experiment config."""
        if self.type == "categorical":
            return self.choices[0]
        return int(self.low) if self.type == "int" else self.low


class SearchConfig(Strict):
    """An Optuna search run for every variant with the same budget before its final seeded runs."""

    trials: PositiveInt = Field(20, description="trials per variant: the same for every variant")
    metric: Literal["val_accuracy", "val_loss"] = Field("val_accuracy", description="validation only, never test")
    direction: Literal["maximize", "minimize"] | None = Field(None, description="default: maximize accuracy, minimize loss")
    sampler: Literal["tpe", "random", "cmaes", "qmc", "grid"] = "tpe"
    sampler_seed: NonNegativeInt = 0
    pruner: Literal["none", "median", "hyperband", "successive_halving", "wilcoxon"] = "median"
    pruner_startup_trials: NonNegativeInt = Field(5, description="median: trials that finish before any is pruned")
    space: dict[str, ParamSpec] = Field(default_factory=dict, description="dotted key into the experiment → parameter")
    tuning_seeds: PositiveInt = Field(1, description="seeds per trial (10000, 10001, …; the objective is their mean)")

    @model_validator(mode="after")
    def _direction(self) -> SearchConfig:
        if self.direction is None:
            self.direction = "minimize" if self.metric.endswith("loss") else "maximize"
        return self


class Suite(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    question: str
    description: str = ""
    base: Experiment
    variants: dict[str, dict[str, Any]] = Field(min_length=1)
    baseline: str
    seeds: PositiveInt | list[NonNegativeInt] = 3
    report: ReportConfig = Field(default_factory=ReportConfig)
    search: SearchConfig | None = Field(None, description="tune every variant with Optuna before the seeded runs")

    # filled by load_suite: each variant's validated experiment, and where the suite came from
    experiments: dict[str, Experiment] = Field(default_factory=dict, exclude=True)
    source: str = Field("", exclude=True)
    warnings: list[str] = Field(default_factory=list, exclude=True)
    search_spaces: dict[str, dict[str, ParamSpec]] = Field(default_factory=dict, exclude=True)  # per variant: suite + own

    def search_space(self, variant: str) -> dict[str, ParamSpec]:
        """The suite's space plus the variant's own ``search_space`` (empty when the suite does not search)."""
        return self.search_spaces.get(variant, {})

    @field_validator("variants")
    @classmethod
    def _variant_names(cls, v: dict) -> dict:
        for name in v:
            if not re.match(r"^[A-Za-z0-9_.-]+$", str(name)):
                raise ValueError(f"variant name '{name}' may only use letters, digits, '_', '.', '-'")
        return v

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: int | list[int]) -> int | list[int]:
        if isinstance(v, list) and (not v or len(set(v)) != len(v)):
            raise ValueError(f"seeds must be a count or a non-empty list of distinct seeds, got {v}")
        return v

    @field_validator("baseline")
    @classmethod
    def _baseline_is_a_variant(cls, v: str, info: ValidationInfo) -> str:
        variants = info.data.get("variants")  # absent when variants itself is invalid
        if variants is not None and v not in variants:
            raise ValueError(f"baseline '{v}' is not a variant;{did_you_mean(v, list(variants))} variants: {', '.join(variants)}")
        return v

    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)


# ───────────────────────────── errors ─────────────────────────────


@dataclass
class Problem:
    where: str  # "suites/x.yaml:12" or "--set a.b=c"
    path: str  # dotted path into the suite
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.path or '<suite>'}: {self.message}"


class SuiteError(Exception):
    """Invalid suite input; carries every problem found."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


# ───────────────────────────── YAML with line numbers ─────────────────────────────


class Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.2; PyYAML's 1.1 rules need ``1.0e-3``)."""


Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _walk_nodes(node: yaml.Node, path: tuple, lines: dict, problems: list, source: str) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in seen:
                problems.append(
                    Problem(f"{source}:{line}", ".".join(map(str, path + (key,))), f"duplicate key (first at line {seen[key]})")
                )
            seen[key] = line
            _walk_nodes(value_node, path + (key,), lines, problems, source)
            lines[path + (key,)] = line
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk_nodes(item, path + (i,), lines, problems, source)


def read_yaml(path: str | Path) -> tuple[Any, dict[tuple, int]]:
    """Parse YAML; return the data and a map from key path to 1-based line number."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SuiteError([Problem(source, "", "no such file (give the path of a suite YAML, e.g. suites/quickstart.yaml)")]) from None
    except OSError as e:
        raise SuiteError([Problem(source, "", f"cannot read: {e.strerror}")]) from None
    try:
        node = yaml.compose(text, Loader=Loader)
        data = yaml.load(text, Loader=Loader)  # noqa: S506 - Loader is a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise SuiteError([Problem(where, "", f"not valid YAML: {getattr(e, 'problem', e)}")]) from None
    lines: dict[tuple, int] = {}
    problems: list[Problem] = []
    if node is not None:
        _walk_nodes(node, (), lines, problems, source)
    if problems:
        raise SuiteError(problems)
    return data, lines


# ───────────────────────────── overrides & merge ─────────────────────────────


def deep_merge(base: dict, override: dict) -> dict:
    """A copy of ``base`` with ``override`` merged in: dicts merge recursively, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` → (['a','b','c'], typed value); the value is parsed as YAML (1 → int, [1,2] → list)."""
    if "=" not in text:
        raise SuiteError([Problem(f"--set {text}", "", "expected KEY=VALUE with a dotted key, e.g. --set base.train.epochs=1")])
    key, raw = text.split("=", 1)
    keys = key.strip().split(".")
    if not all(keys):
        raise SuiteError([Problem(f"--set {text}", key, "empty part in the dotted key")])
    try:
        value = yaml.load(raw, Loader=Loader) if raw.strip() else ""  # noqa: S506 - SafeLoader
    except yaml.YAMLError as e:
        raise SuiteError([Problem(f"--set {text}", key, f"value is not valid YAML: {e}")]) from None
    return keys, value


def apply_overrides(data: dict, overrides: list[str]) -> tuple[dict, dict[tuple, str]]:
    """Apply ``--set`` overrides; return the new data and which path each override set."""
    data = copy.deepcopy(data)
    origins: dict[tuple, str] = {}
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
        origins[tuple(keys)] = f"--set {text}"
    return data, origins


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict → dotted keys (lists kept as values)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


# ───────────────────────────── loading ─────────────────────────────


class _Locator:
    """Turns a pydantic error location into 'file:line' and a dotted path."""

    def __init__(self, source: str, data: Any, lines: dict[tuple, int], origins: dict[tuple, str]):
        self.source, self.data, self.lines, self.origins = source, data, lines, origins

    def real_path(self, loc: tuple) -> tuple:
        """Keep the parts of ``loc`` that index into the data (drop pydantic's union tags)."""
        node, path = self.data, ()
        for part in loc:
            if isinstance(node, dict) and part in node:
                node, path = node[part], path + (part,)
            elif isinstance(node, list) and isinstance(part, int) and part < len(node):
                node, path = node[part], path + (part,)
        return path

    def where(self, path: tuple) -> str:
        for n in range(len(path), -1, -1):
            if path[:n] in self.origins:
                return self.origins[path[:n]]
            if path[:n] in self.lines:
                return f"{self.source}:{self.lines[path[:n]]}"
        return self.source


def _describe(err: dict, model: type[BaseModel] | None) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        key = str(err["loc"][-1])
        allowed = sorted(model.model_fields) if model else []
        allowed = [a for a in allowed if a not in ("experiments", "source")]
        return f"unknown key '{key}';{did_you_mean(key, allowed)} allowed: {', '.join(allowed)}"
    if kind == "missing":
        return f"missing required key '{err['loc'][-1]}'"
    msg = err["msg"].removeprefix("Value error, ")
    if kind == "value_error":
        return msg
    return f"{msg} (got {err.get('input')!r})"


def _model_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the last key of ``loc`` (for listing allowed keys)."""
    model = root
    for part in loc[:-1]:
        fld = model.model_fields.get(part) if isinstance(part, str) else None
        ann = getattr(fld, "annotation", None)
        models = [a for a in get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)]
        if len(models) == 1:  # Optional[Model]
            ann = models[0]
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return model if fld is None else None
    return model


def _problems(exc: ValidationError, root: type[BaseModel], locator: _Locator, prefix: tuple = ()) -> list[Problem]:
    out = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = locator.real_path(prefix + loc)
        out.append(
            Problem(locator.where(path), ".".join(map(str, path)), _describe(err, _model_at(root, loc)))
        )
    return out


def load_suite(path: str | Path, overrides: list[str] | tuple[str, ...] = (), registries: dict | None = None) -> Suite:
    """Read, override, validate. Raises :class:`SuiteError` listing every problem found."""
    source = str(path)
    data, lines = read_yaml(path)
    if not isinstance(data, dict):
        raise SuiteError([Problem(f"{source}:1", "", "a suite is a YAML mapping with name, question, base, variants, baseline")])
    data, origins = apply_overrides(data, list(overrides))
    locator = _Locator(source, data, lines, origins)
    context = {"registries": registries or {}}
    own_spaces = _pop_variant_spaces(data)  # `search_space` is not part of a variant's experiment

    try:
        suite = Suite.model_validate(data, context=context)
    except ValidationError as e:
        problems = _problems(e, Suite, locator)
        # still check the variants we can, so one pass reports everything
        if isinstance(data.get("base"), dict) and isinstance(data.get("variants"), dict):
            problems += _variant_problems(data, locator, context, skip_base_errors=True)
        raise SuiteError(problems) from None

    problems = _variant_problems(data, locator, context)
    if problems:
        raise SuiteError(problems)
    for name, override in suite.variants.items():
        suite.experiments[name] = Experiment.model_validate(deep_merge(data["base"], override or {}), context=context)
    problems = _search_problems(suite, own_spaces, locator, context)
    problems += _compression_problems(suite, locator)  # issue 6: sources/teachers exist, no cycles
    if problems:
        raise SuiteError(problems)
    suite.source = source
    suite.warnings = _warnings(suite, locator)
    return suite


def _pop_variant_spaces(data: dict) -> dict[str, Any]:
    spaces = {}
    for name, override in (data.get("variants") or {}).items() if isinstance(data.get("variants"), dict) else ():
        if isinstance(override, dict) and "search_space" in override:
            spaces[name] = override.pop("search_space")
    return spaces


def set_dotted(config: dict, key: str, value: Any) -> dict:
    """A copy of ``config`` with ``key`` (``optimizer.lr``, ``optimizer.betas.0``) set to ``value``."""
    out = copy.deepcopy(config)
    *parents, last = key.split(".")
    node = out
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return out


def _search_problems(suite: Suite, own_spaces: dict, locator: _Locator, context: dict) -> list[Problem]:
    """Each variant's space is valid and every key lands on a real setting of its experiment."""
    problems: list[Problem] = []
    for name in suite.variants:
        raw = own_spaces.get(name) or {}
        where = ("variants", name, "search_space")
        if raw and suite.search is None:
            problems.append(Problem(locator.where(where), ".".join(where), "a variant's search_space needs a top-level 'search' section"))
            continue
        if suite.search is None:
            continue
        space = dict(suite.search.space)
        if not isinstance(raw, dict):
            problems.append(Problem(locator.where(where), ".".join(where), "search_space is a mapping of dotted keys to parameters"))
            continue
        for key, spec in raw.items():
            try:
                space[key] = ParamSpec.model_validate(spec)
            except ValidationError as e:
                problems += _problems(e, ParamSpec, locator, where + (key,))
        if not space:
            problems.append(Problem(locator.where(("search",)), "search.space", f"variant '{name}' has nothing to search: give search.space or its search_space"))
        config = suite.experiments[name].model_dump(mode="json")
        for key, spec in space.items():
            origin = where + (key,) if key in raw else ("search", "space", key)
            try:
                Experiment.model_validate(set_dotted(config, key, spec.sample_value()), context=context)
            except (ValidationError, KeyError, IndexError, ValueError, TypeError, AttributeError) as e:
                detail = e.errors()[0]["msg"] if isinstance(e, ValidationError) else f"no such setting ({type(e).__name__}: {e})"
                problems.append(Problem(locator.where(origin), ".".join(map(str, origin)),
                                        f"'{key}' is not a setting of variant '{name}' that takes {spec.sample_value()!r}: {detail}"))
            if suite.search.sampler == "grid":
                try:
                    spec.grid()
                except ValueError as e:
                    problems.append(Problem(locator.where(origin), ".".join(map(str, origin)), str(e)))
        suite.search_spaces[name] = space
    return problems


FLIP_UNSAFE_DATASETS = ("digits", "mnist")  # a mirrored digit can read as another one (or as none)


def _warnings(suite: Suite, locator: _Locator) -> list[str]:
    """Allowed but probably unintended: said before anything runs."""
    out = []
    for name, exp in suite.experiments.items():
        names = [a if isinstance(a, str) else next(iter(a)) for a in exp.data.augment]
        if "horizontal_flip" in names and exp.data.dataset in FLIP_UNSAFE_DATASETS:
            path = ("variants", name, "data", "augment") if "augment" in (suite.variants[name] or {}).get("data", {}) \
                else ("base", "data", "augment")
            out.append(f"{locator.where(path)}: {'.'.join(path)}: horizontal_flip on {exp.data.dataset} mirrors digits, "
                       f"which can change what they mean (variant '{name}'); suites should not ship it")
    return list(dict.fromkeys(out))


def _variant_problems(data: dict, locator: _Locator, context: dict, skip_base_errors: bool = False) -> list[Problem]:
    problems: list[Problem] = []
    base = data["base"]
    for name, override in data["variants"].items():
        if override is None:
            override = {}
        if not isinstance(override, dict):
            problems.append(Problem(locator.where(("variants", name)), f"variants.{name}", "a variant is a mapping of overrides of base (use {} for none)"))
            continue
        try:
            Experiment.model_validate(deep_merge(base, override), context=context)
        except ValidationError as e:
            for err in e.errors():
                loc = tuple(err["loc"])
                in_variant = locator.real_path(("variants", name) + loc)
                if len(in_variant) > 2 and _startswith_data(override, loc):
                    path = in_variant
                elif skip_base_errors:
                    continue  # already reported against base
                else:
                    path = locator.real_path(("base",) + loc)
                problems.append(Problem(locator.where(path), ".".join(map(str, path)), _describe(err, _model_at(Experiment, loc))))
    # de-duplicate base errors reported once per variant
    unique, seen = [], set()
    for p in problems:
        key = (p.where, p.path, p.message)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def _startswith_data(override: dict, loc: tuple) -> bool:
    """Does the erroneous location come from the variant's own override?"""
    node = override
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            return False
    return True


# ───────────────────────────── plan ─────────────────────────────


@dataclass(frozen=True)
class RunSpec:
    """One (variant, seed) training run of a suite — or, with ``trial`` set, one search trial."""

    suite: str
    variant: str
    seed: int
    experiment: Experiment = field(compare=False)
    is_baseline: bool = False
    plan_key: str = ""  # identity of the planned run (untuned config + seed + study): what reports select on
    study: str | None = None  # the Optuna study whose best params ``experiment`` carries
    trial: int | None = None
    skip_reason: str | None = None  # recorded as skipped instead of trained (e.g. a search with no complete trial)

    @property
    def run_name(self) -> str:
        return f"{self.variant}/trial{self.trial}" if self.trial is not None else f"{self.variant}/seed{self.seed}"

    @property
    def fingerprint(self) -> str:
        """Identity of the config actually trained (tuned values included): a finished run with it is reused."""
        return self.experiment.fingerprint(self.seed)


def search_fingerprint(suite: Suite, variant: str) -> str:
    """Identity of a variant's search: its config, space, sampler, pruner, metric — not the trial count."""
    blob = json.dumps({
        "v": FINGERPRINT_VERSION,
        "search": suite.search.model_dump(mode="json", exclude={"trials", "space"}),
        "space": {k: v.model_dump(mode="json") for k, v in sorted(suite.search_space(variant).items())},
        "config": suite.experiments[variant].identity(),
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def study_name(suite: Suite, variant: str) -> str:
    """``<suite>.<variant>.<search fingerprint>``: resumed while nothing but the trial count changes."""
    return f"{suite.name}.{variant}.{search_fingerprint(suite, variant)}"


def plan(suite: Suite, tuned: dict[str, Experiment | None] | None = None) -> list[RunSpec]:
    """Seed-major order: every variant of seed 0, then seed 1, … (paired results arrive early).

    ``tuned`` maps a variant to its experiment with the best searched values (``None``: its search
    completed no trial, so its runs are planned as skipped). Without it the suite's own values run.
    """
    specs = []
    for seed in suite.seed_list():
        for name in suite.variants:
            exp, key, study, skip = suite.experiments[name], suite.experiments[name].fingerprint(seed), None, None
            if tuned is not None and name in tuned:
                study = study_name(suite, name)
                key = hashlib.sha256(f"{key}|{study}".encode()).hexdigest()[:16]
                if tuned[name] is None:
                    skip = f"search {study} completed no trial: nothing to evaluate"
                else:
                    exp = tuned[name]
            specs.append(RunSpec(suite.name, name, seed, exp, name == suite.baseline, key, study, None, skip))
    return specs


def json_schema() -> dict:
    return Suite.model_json_schema()



# ───────────────────────────── compression: sources and teachers ─────────────────────────────


def source_of(suite: Suite, variant: str) -> str | None:
    """Where a quantize/prune variant's weights come from: a variant name or a checkpoint reference."""
    exp = suite.experiments[variant]
    if not exp.compresses:
        return None
    return exp.start_from or suite.baseline


def upstream_variants(suite: Suite, variant: str) -> list[str]:
    """The variants whose trained weights this one needs (its source and/or teacher)."""
    exp = suite.experiments[variant]
    refs = [source_of(suite, variant), exp.distill.teacher if exp.distill else None]
    return [r for r in refs if r is not None and r in suite.experiments]


def _compression_problems(suite: Suite, locator: _Locator) -> list[Problem]:
    """Sources and teachers are trainable variants of the suite or existing checkpoints; no cycles;
    a compressed model has its source's architecture. Sets each dependent experiment's upstream identity."""
    problems: list[Problem] = []

    def problem(name: str, keys: tuple, message: str) -> None:
        override = suite.variants[name] or {}
        node, own = override, True
        for k in keys:
            if isinstance(node, dict) and k in node:
                node = node[k]
            else:
                own = False
                break
        path = ("variants", name, *keys) if own else ("base", *keys)
        problems.append(Problem(locator.where(path if own else locator.real_path(path)), ".".join(path), message))

    names = list(suite.experiments)
    for name, exp in suite.experiments.items():
        if exp.start_from is not None and not exp.compresses:
            problem(name, ("start_from",), "start_from is for variants that quantize or prune a trained model; "
                    "add a quantize or prune section, or remove start_from")
        refs = []
        if exp.compresses:
            refs.append((("start_from",), source_of(suite, name), exp.model, "its source"))
        if exp.distill is not None:
            refs.append((("distill", "teacher"), exp.distill.teacher, exp.distill.teacher_model, "its teacher"))
        for keys, ref, model, role in refs:
            if ref == name:
                problem(name, keys, f"variant '{name}' cannot be {role} itself"
                        + ("; the baseline trains from scratch: give start_from another variant or a checkpoint"
                           if keys == ("start_from",) else ""))
            elif ref in suite.experiments:
                other = suite.experiments[ref]
                if other.compresses:
                    problem(name, keys, f"'{ref}' quantizes or prunes a model itself; {role} must be a variant that "
                            "trains (chain compressions inside one variant: quantize and prune together)")
                elif keys == ("start_from",) and other.model != exp.model:
                    problem(name, keys, f"the model of '{name}' must be that of {role} '{ref}' "
                            f"({other.model.model_dump(exclude_defaults=True)}): it loads those weights")
            elif ref.startswith("runs:/") or ref.startswith("models:/"):
                pass  # resolved at run time (the store may be another one)
            elif not Path(ref).is_file():
                hint = f";{did_you_mean(ref, names)} variants: {', '.join(names)}" if "/" not in ref else ""
                problem(name, keys, f"'{ref}' is neither a variant nor an existing checkpoint file{hint}")
            elif keys == ("distill", "teacher") and model is None:
                problem(name, ("distill",), "a teacher checkpoint needs distill.teacher_model: its architecture, "
                        "e.g. {name: mnist_net}")
    if suite.search is not None and any(e.compresses or e.distill for e in suite.experiments.values()):
        problems.append(Problem(locator.where(("search",)), "search",
                                "search is not supported in suites with quantize/prune/distill variants yet"))
    if problems:
        return problems

    # cycles (a teacher distilled from its own student) and upstream identities, in dependency order
    def identity(name: str, trail: tuple = ()) -> str:
        if name in trail:
            raise ValueError(" → ".join((*trail, name)))
        exp = suite.experiments[name]
        ups = [identity(u, (*trail, name)) for u in upstream_variants(suite, name)]
        if ups:
            exp._upstream = "|".join(ups)
        return exp.fingerprint(-1)

    for name in names:
        try:
            identity(name)
        except ValueError as e:
            problem(name, ("distill", "teacher"), f"teachers form a cycle: {e}")
            break
    return problems
