"""The suite schema: an experiment (the shared settings plus one block per registered technique), the
report, the search, and the suite that holds a baseline and its variants. Nothing here imports torch.

Fingerprints live here too: a finished run is reused, and a report selects it, by the fingerprint of
its experiment and seed, so they must stay the same for the same meaning (``tests/test_fingerprints``).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Literal

from pydantic import (
    Field,
    NonNegativeInt,
    PositiveInt,
    PrivateAttr,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from cnnbench import techniques
from cnnbench.metrics import metric
from cnnbench.registry import did_you_mean
from cnnbench.settings import (
    DEVICE_PATTERN,
    DataConfig,
    InferenceConfig,
    ModelConfig,
    OptimizerConfig,
    ScheduleConfig,
    Strict,
    TrainConfig,
)

# Bump when the meaning of a config changes (training semantics), so old runs are not reused.
FINGERPRINT_VERSION = 1

# (section, key) of settings added after FINGERPRINT_VERSION 1; see Experiment.identity
ADDED_AFTER_V1 = [("train", k) for k in ("precision", "channels_last", "compile", "compile_mode", "deterministic",
                                         "cudnn_benchmark", "processes")] + [
    ("data", "label_noise"), ("data", "canvas"), ("data", "classes"), ("model", "pool")]


class _Experiment(Strict):
    """One complete experiment: what the baseline is, and what every variant resolves to."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    device: str = Field("auto", pattern=DEVICE_PATTERN)
    start_from: str | None = Field(None, description="post-training techniques (quantize, prune, low_rank) start from: "
                                   "a variant's trained weights (default: the baseline's), a checkpoint file, or an "
                                   "MLflow artifact URI runs:/<id>/<path>")
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    _upstream: str = PrivateAttr("")  # identity of the source/teacher runs this one depends on (set by load_suite)

    @model_validator(mode="after")
    def _data_parallel(self):
        if self.train.processes > 1:
            if self.train.compile:
                raise ValueError("train.processes > 1 with train.compile: data-parallel training runs the eager model "
                                 "(set compile: false, or processes: 1)")
            if self.distill is not None or self.compresses:
                raise ValueError("train.processes > 1 trains a model from scratch; distillation and post-training "
                                 "techniques run in one process (set processes: 1 in this variant)")
        return self

    @model_validator(mode="after")
    def _technique_checks(self):
        for technique in techniques.active(self):
            for _keys, message in technique.check(self):
                raise ValueError(message)
        return self

    @property
    def compresses(self) -> bool:
        """Starts from trained weights (a post-training technique is on) instead of training from scratch."""
        return bool(techniques.active(self, "post_training"))

    def identity(self) -> dict:
        """The config as fingerprints see it: settings added after FINGERPRINT_VERSION 1 are left out
        while they hold their default — what every earlier run did — so those runs stay reusable (an
        absent technique block, ``start_from`` and default inference settings alike); the identity of
        the runs a compression/distillation variant starts from is added."""
        dump = self.model_dump(mode="json")
        for section, key in ADDED_AFTER_V1:
            default = type(getattr(self, section)).model_fields[key].default
            if dump[section].get(key, default) == default:
                dump[section].pop(key, None)
        for key in ("start_from", *techniques.blocks()):
            if dump.get(key) is None:
                dump.pop(key, None)
        if dump.get("inference") == InferenceConfig().model_dump(mode="json"):
            dump.pop("inference")
        if self._upstream:
            dump["upstream"] = self._upstream
        return dump

    def fingerprint(self, seed: int) -> str:
        """Identity of a (config, seed) run: a finished run with the same fingerprint is reused."""
        blob = json.dumps({"v": FINGERPRINT_VERSION, "seed": seed, "config": self.identity()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# Each registered technique with a block of its own adds the optional key ``<name>:`` to the experiment.
Experiment = create_model(
    "Experiment", __base__=_Experiment, __module__=__name__, __doc__=_Experiment.__doc__,
    **{name: (block | None, Field(None, description=(block.__doc__ or "").strip().split("\n")[0]))
       for name, block in techniques.blocks().items()},
)


def _catalogued(name: str):
    """The catalogue row of ``name``; an unknown name is a validation error listing the closest ones."""
    try:
        return metric(name)
    except KeyError as e:
        raise ValueError(str(e)) from None


MARGIN_TEXT = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(pp|%)\s*$")


def parse_margin(name: str, value: float | str) -> tuple[float, bool]:
    """``(margin, relative)`` for metric ``name``: ``'0.2 pp'`` (percentage points, for a share such as
    accuracy) → 0.002 absolute; ``'5%'`` → 0.05 of the baseline's mean; a number → absolute, in the unit the
    metric is recorded in (seconds, img/s, …). A bare number for a share is refused: 0.2 would be 20 pp."""
    fmt = _catalogued(name).fmt
    if isinstance(value, str):
        m = MARGIN_TEXT.match(value)
        if m is None:
            raise ValueError(f"margin '{value}' for {name}: write a number, 'N pp' (percentage points) or 'N%' "
                             "(relative to the baseline's mean)")
        number, unit = float(m.group(1)), m.group(2)
        if unit == "pp" and fmt != "pct":
            raise ValueError(f"margin '{value}' for {name}: percentage points are for shares such as accuracy; "
                             f"{name} is not one (write a number in its unit or 'N%')")
        return number / 100, unit == "%"
    if fmt == "pct":
        raise ValueError(f"margin {value} for {name}: {name} is a share, so say which unit: '{value} pp' "
                         f"(percentage points) or '{value}%' (relative to the baseline's mean)")
    if value < 0:
        raise ValueError(f"margin {value} for {name} must be ≥ 0")
    return float(value), False


class TimingConfig(Strict):
    """The timing protocol: after training, the deployed models of the first seed — baseline and variants —
    are timed in interleaved rounds in one process, with the baseline entered twice (A/A) for the noise floor."""

    enabled: bool = Field(True, description="time the models side by side after training (needs inference.enabled)")
    rounds: int = Field(15, ge=2, description="interleaved rounds (A, B, C, A', …); one median per model per round")
    calls_per_round: PositiveInt = Field(10, description="timed forward passes per model per round, one model after "
                                                         "the other (A, B, C, A′, A, …); the round keeps each one's median")
    warmup: NonNegativeInt = Field(5, description="untimed passes per model and batch size before the rounds")
    forms: list[Literal["eager", "compiled"]] = Field(
        ["eager"], min_length=1, description="deployed forms to time; 'compiled': torch.compile (inductor) each model")
    margin: str | float = Field("5%", description="timing differences smaller than this (relative) are equivalent; "
                                                  "the A/A floor widens it when the machine is noisier")

    @field_validator("margin")
    @classmethod
    def _relative(cls, v: str | float) -> str:
        m = MARGIN_TEXT.match(v) if isinstance(v, str) else None
        if m is None or m.group(2) != "%":
            raise ValueError(f"timing margin '{v}' must be relative, e.g. '5%'")
        return v

    @property
    def relative_margin(self) -> float:
        return float(MARGIN_TEXT.match(self.margin).group(1)) / 100


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
    higher_is_better: bool | None = Field(None, description="for the primary metric; default: the metric catalogue's")
    alpha: float = Field(0.05, gt=0.0, lt=0.5, description="error rate of the verdicts, shared by the variants "
                                                          "(Bonferroni) and by the looks of adaptive seeds")
    margin: float | str | dict[str, float | str] | None = Field(
        None, description="the smallest difference that matters, for the primary metric ('0.2 pp', '5%', or a "
                          "number in the metric's unit), or per metric ({test_accuracy: 0.2 pp, train_time_s: 5%}): "
                          "a comparison whose interval lies inside ±margin is 'equivalent'")
    test: Literal["t", "sign"] = Field(
        "t", description="how a measured metric's paired differences are judged: 't' (mean, paired t-interval) or "
                         "'sign' (median, distribution-free order-statistic interval: for regimes where some seeds "
                         "collapse and the differences are a mixture; needs 2^(1−n) below the per-comparison level)")
    timing: TimingConfig = Field(default_factory=TimingConfig)
    not_compared: list[str] = Field(
        default_factory=list, description="variants that only feed others (a pretraining source) and are not "
                                          "compared with anything: their runs are reported, no verdict")
    against: dict[str, str] = Field(
        default_factory=dict, description="variant → the variant it is compared with instead of the baseline: a "
                                          "control that differs from it in one thing only (a dense model fine-tuned "
                                          "as long as the pruned ones, the plain net at the same learning rate)")

    @field_validator("margin")
    @classmethod
    def _margins(cls, v, info: ValidationInfo):
        if v is None:
            return v
        for name, value in (v if isinstance(v, dict) else {info.data.get("primary", "test_accuracy"): v}).items():
            parse_margin(name, value)
        return v

    def margin_for(self, name: str) -> tuple[float | None, bool]:
        """``(margin, relative)`` for metric ``name``; ``(None, False)`` when the suite sets none for it."""
        given = self.margin if isinstance(self.margin, dict) else {self.primary: self.margin}
        value = given.get(name)
        return (None, False) if value is None else parse_margin(name, value)

    @field_validator("metrics")
    @classmethod
    def _catalogued(cls, v: list[str]) -> list[str]:
        for name in v:
            _catalogued(name)
        return v

    @field_validator("primary")
    @classmethod
    def _not_censored(cls, v: str) -> str:
        if _catalogued(v).censored:
            raise ValueError(f"'{v}' cannot be the primary metric: it is censored (runs that never reach the target have "
                             "none), so every report shows it as a Kaplan–Meier median instead; use train_time_s or "
                             "train_throughput for speed")
        return v

    def primary_higher_is_better(self) -> bool:
        return self.is_higher_better(self.primary)

    def is_higher_better(self, name: str) -> bool:
        """The catalogue's direction (a cost such as params or FLOPs: lower is better); for the primary
        metric, ``higher_is_better`` when the suite sets it."""
        if name == self.primary and self.higher_is_better is not None:
            return self.higher_is_better
        return bool(metric(name).higher_is_better)


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
    pruner_startup_trials: NonNegativeInt = Field(
        2, description="median: trials that finish before any is pruned (2: ≥ 50% of trial epochs saved at a "
                       "0.00 pp best-validation gap on TPE seeds 0–2 in benchmarks/search_pruning.py; 5 saved 30–56%)")
    reports_per_epoch: PositiveInt = Field(
        4, description="validations per epoch the pruner sees (the first tuning seed's): 4 lets it stop a hopeless "
                       "trial after a quarter of an epoch; each extra one costs a pass over the validation split")
    space: dict[str, ParamSpec] = Field(default_factory=dict, description="dotted key into the experiment → parameter")
    tuning_seeds: PositiveInt = Field(1, description="seeds per trial (10000, 10001, …; the objective is their mean)")

    @model_validator(mode="after")
    def _direction(self) -> SearchConfig:
        if self.direction is None:
            self.direction = "minimize" if self.metric.endswith("loss") else "maximize"
        return self


class ArchitectureSearch(Strict):
    """A multi-objective Optuna search over architecture knobs: validation accuracy up, a cost down.

    Every trial trains the ``start`` variant with the sampled knobs on the tuning seeds (10000, …), for
    that variant's epochs, and records its validation accuracy and its cost. The Pareto front's members,
    up to ``retrain`` of them spread along it by cost, become variants ``nas_1`` (cheapest) … that run
    over the suite's seeds like any other and are compared with the baseline (a hand-designed model)."""

    start: str | None = Field(None, description="the variant whose experiment the search varies (default: the baseline)")
    space: dict[str, ParamSpec] = Field(min_length=1, description="dotted key into that experiment → parameter")
    cost: Literal["params", "flops", "latency_bs1_ms"] = Field(
        "params", description="the objective minimized beside validation accuracy (params and flops are exact; "
                              "latency is timed, batch 1, on the search's device)")
    trials: PositiveInt = Field(24, description="trials in all (multi-objective studies cannot prune)")
    sampler: Literal["nsga2", "tpe", "random"] = "nsga2"
    sampler_seed: NonNegativeInt = 0
    population_size: int = Field(8, ge=2, description="NSGA-II: trials per generation")
    tuning_seeds: PositiveInt = Field(1, description="seeds per trial (10000, 10001, …; accuracy is their mean)")
    retrain: PositiveInt = Field(3, description="front members retrained over the suite's seeds, spread by cost")
    min_accuracy: float | None = Field(
        None, ge=0, le=1, description="front members below this validation accuracy are not retrained (a floor "
                                      "stated before the search: the cheapest members of a front are often useless)")


class AdaptiveSeeds(Strict):
    """Seeds in rounds until every comparison of the primary metric (and of any metric with a margin) is
    decided, or ``max`` seeds have run. The verdicts stay valid under this stopping (see ``stats.Looks``)."""

    min: int = Field(ge=2, description="seeds of the first round")
    max: int = Field(ge=2, description="seeds at most")
    per_round: PositiveInt | None = Field(None, description="seeds added per round (default: min)")
    drop_decided: bool = Field(
        True, description="later rounds run only the variants still undecided, with the references and "
                          "sources/teachers those need: a decided comparison keeps the verdict of the look that "
                          "decided it (each is its own sequential test). false: every variant runs every round, "
                          "e.g. when secondary metrics should have every seed")

    @model_validator(mode="after")
    def _ordered(self) -> AdaptiveSeeds:
        if self.max < self.min:
            raise ValueError(f"seeds: max ({self.max}) must be ≥ min ({self.min})")
        return self


class Suite(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    question: str
    description: str = ""
    base: Experiment
    variants: dict[str, dict[str, Any]] = Field(min_length=1)
    baseline: str
    seeds: PositiveInt | list[NonNegativeInt] | AdaptiveSeeds = 3
    report: ReportConfig = Field(default_factory=ReportConfig)
    search: SearchConfig | None = Field(None, description="tune every variant with Optuna before the seeded runs")
    architecture_search: ArchitectureSearch | None = Field(
        None, description="search architectures (accuracy and a cost); retrain the Pareto front as variants nas_1, …")

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

    @model_validator(mode="after")
    def _references_are_variants(self) -> Suite:
        for variant, reference in self.report.against.items():
            for role, name in (("variant", variant), ("reference", reference)):
                if name not in self.variants:
                    raise ValueError(f"report.against: {role} '{name}' is not a variant;"
                                     f"{did_you_mean(name, list(self.variants))} variants: {', '.join(self.variants)}")
            if variant == self.baseline:
                raise ValueError(f"report.against: the baseline '{variant}' is what the others are compared with; "
                                 "it cannot have a reference of its own")
            if variant == reference:
                raise ValueError(f"report.against: '{variant}' cannot be compared with itself")
        for name in self.report.not_compared:
            if name not in self.variants:
                raise ValueError(f"report.not_compared: '{name}' is not a variant;"
                                 f"{did_you_mean(name, list(self.variants))} variants: {', '.join(self.variants)}")
            if name == self.baseline or name in self.report.against.values():
                raise ValueError(f"report.not_compared: '{name}' is what other variants are compared with; "
                                 "a variant that is not compared cannot be a reference")
            if name in self.report.against:
                raise ValueError(f"report.not_compared: '{name}' also has a reference in report.against; "
                                 "give it one or the other")
        return self

    @model_validator(mode="after")
    def _architecture_search_fits(self) -> Suite:
        nas = self.architecture_search
        if nas is None:
            return self
        if nas.start is not None and nas.start not in self.variants:
            raise ValueError(f"architecture_search.start: '{nas.start}' is not a variant;"
                             f"{did_you_mean(nas.start, list(self.variants))} variants: {', '.join(self.variants)}")
        taken = [v for v in self.variants if re.fullmatch(r"nas_\d+", v)]
        if taken:
            raise ValueError(f"variant name(s) {', '.join(taken)}: names nas_1, nas_2, … are kept for the members of the "
                             "architecture search's Pareto front; rename them")
        if self.search is not None:
            raise ValueError("architecture_search and search in one suite are not supported yet: the front's members "
                             "would need a hyperparameter search of their own; use two suites")
        return self

    def search_start(self) -> str:
        """The variant the architecture search varies."""
        return self.architecture_search.start or self.baseline

    def compared(self) -> list[str]:
        """The variants that get a verdict, and the baseline: all but ``report.not_compared``."""
        return [v for v in self.variants if v not in self.report.not_compared]

    def reference(self, variant: str) -> str:
        """The variant ``variant`` is compared with: its ``report.against`` entry, else the baseline."""
        return self.report.against.get(variant, self.baseline)

    def seed_list(self) -> list[int]:
        """Every seed the suite may run (adaptive: up to ``max``, in this order)."""
        if isinstance(self.seeds, AdaptiveSeeds):
            return list(range(self.seeds.max))
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)

    @property
    def adaptive(self) -> bool:
        return isinstance(self.seeds, AdaptiveSeeds)

    @property
    def drops_decided(self) -> bool:
        """Adaptive, and variants decided at a look run no later rounds (``seeds.drop_decided``)."""
        return self.adaptive and self.seeds.drop_decided

    def looks(self):
        """The seed counts at which verdicts are read, and α spent at each (``stats.Looks``)."""
        from cnnbench.stats import Looks

        if isinstance(self.seeds, AdaptiveSeeds):
            return Looks.rounds(self.seeds.min, self.seeds.max, self.seeds.per_round or self.seeds.min, self.report.alpha)
        return Looks.fixed(len(self.seed_list()), self.report.alpha)
