"""Suites: ``load_suite(path, overrides)`` → :class:`Suite` → :func:`plan` → ``[RunSpec]``.

``schema`` (what a suite may say), ``source`` (YAML with locations, overrides), ``load`` (validation
across sections), ``plan`` (runs, fingerprints, references between variants). Nothing imports torch.
"""

from cnnbench.config.load import load_suite
from cnnbench.config.plan import (
    TUNING_SEED_BASE,
    RunSpec,
    json_schema,
    plan,
    references,
    search_fingerprint,
    source_of,
    study_name,
    upstream_variants,
)
from cnnbench.config.schema import FINGERPRINT_VERSION, Experiment, ParamSpec, ReportConfig, SearchConfig, Suite
from cnnbench.config.source import Problem, SuiteError, apply_overrides, deep_merge, flatten, parse_override, set_dotted
from cnnbench.settings import DEVICE_PATTERN, DataConfig, ModelConfig, OptimizerConfig, ScheduleConfig, TrainConfig

__all__ = [
    "load_suite",
    "TUNING_SEED_BASE",
    "RunSpec",
    "json_schema",
    "plan",
    "references",
    "search_fingerprint",
    "source_of",
    "study_name",
    "upstream_variants",
    "FINGERPRINT_VERSION",
    "Experiment",
    "ParamSpec",
    "ReportConfig",
    "SearchConfig",
    "Suite",
    "Problem",
    "SuiteError",
    "apply_overrides",
    "deep_merge",
    "flatten",
    "parse_override",
    "set_dotted",
    "DEVICE_PATTERN",
    "DataConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ScheduleConfig",
    "TrainConfig",
]
