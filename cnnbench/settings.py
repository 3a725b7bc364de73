"""The settings every experiment has: data, model, optimizer, schedule, training loop, inference timing.

Pydantic models with ``extra="forbid"``; nothing here imports torch. Registry names (datasets, models,
optimizers, …) are checked only when the caller passes ``registries`` in the validation context
(``run`` and ``validate`` do; ``report`` needs no torch and does not). Techniques that have a block
of their own (``quantize:``, ``prune:``, ``distill:``, ``low_rank:``) define it in their module
(:mod:`cnnbench.techniques`); :mod:`cnnbench.config.schema` assembles the experiment from both.
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

from cnnbench.registry import did_you_mean

DEVICE_PATTERN = r"^(auto|cpu|mps|xla|cuda(:\d+)?)$"


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
    label_noise: float = Field(0.0, ge=0.0, lt=1.0, description="harder task: this fraction of the training (and so "
                               "validation) labels is replaced by another class; test labels stay clean. A fixed draw: "
                               "the same images for every seed and variant")
    canvas: PositiveInt | None = Field(None, description="harder task: each image (after image_size) is placed at a "
                                       "random position on an N×N black canvas, train and test alike (translated "
                                       "digits). Fixed positions: the same for every seed and variant")
    classes: list[NonNegativeInt] | None = Field(
        None, min_length=2, description="a task of its own: only these classes, train and test alike, relabelled "
                                        "0…k−1 in this order (e.g. [0, 1, 2, 3, 4] to pretrain, [5, 6, 7, 8, 9] to "
                                        "transfer to)")
    path: str | None = Field(None, description="imagefolder: directory with train/ and test/ class folders")
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)

    @field_validator("classes")
    @classmethod
    def _distinct_classes(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"classes {v}: each class once")
        return v

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
    pool: str | None = Field(None, description="max | avg | mixed | mixed_learned | stochastic | learned: the 2×2 "
                                               "downsampling between conv blocks (default: the model's own)")
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

    @field_validator("pool")
    @classmethod
    def _pool(cls, v: str | None, info: ValidationInfo) -> str | None:
        return v if v is None else _check_registered(v, info, "pool")

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
        for knob in ("norm", "activation", "dropout", "dropout2d", "num_groups", "pool"):
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
    threads: PositiveInt | None = Field(None, description="torch.set_num_threads; default: torch's own (with "
                                                          "processes > 1: the CPU's cores shared between them)")
    processes: PositiveInt = Field(1, description="data-parallel training of this run: N processes (torch.distributed "
                                                  "DDP; gloo on the CPU, nccl on CUDA), each with 1/N of every batch "
                                                  "(the global batch stays data.batch_size, so the learning rate is "
                                                  "unchanged)")
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


class InferenceConfig(Strict):
    """How every run's inference latency is measured (batch 1 and 64, after warm-up, synchronized)."""

    enabled: bool = True
    repeats: PositiveInt = Field(50, description="timed forward passes per batch size")
    warmup: NonNegativeInt = Field(10, description="untimed forward passes first")
    compile: Literal["auto", "always", "never"] = Field(
        "auto", description="torch.compile (inductor) the model measured; auto: quantized models only (PT2E int8 "
                            "kernels exist only through inductor)")
