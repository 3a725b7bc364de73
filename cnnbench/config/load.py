"""``load_suite``: read a suite, apply ``--set`` overrides, validate it, resolve every variant's
experiment, and check what one section cannot see alone (search spaces land on real settings,
sources and teachers exist without cycles). Every problem found is reported in one pass."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cnnbench import techniques
from cnnbench.config.plan import references, upstream_variants
from cnnbench.config.schema import Experiment, ParamSpec, Suite
from cnnbench.config.source import (
    Locator,
    Problem,
    SuiteError,
    apply_overrides,
    deep_merge,
    describe_error,
    model_at,
    problems_of,
    read_yaml,
    set_dotted,
)
from cnnbench.registry import did_you_mean


def load_suite(path: str | Path, overrides: list[str] | tuple[str, ...] = (), registries: dict | None = None) -> Suite:
    """Read, override, validate. Raises :class:`SuiteError` listing every problem found."""
    source = str(path)
    data, lines = read_yaml(path)
    if not isinstance(data, dict):
        raise SuiteError([Problem(f"{source}:1", "", "a suite is a YAML mapping with name, question, base, variants, baseline")])
    data, origins = apply_overrides(data, list(overrides))
    locator = Locator(source, data, lines, origins)
    context = {"registries": registries or {}}
    own_spaces = _pop_variant_spaces(data)  # `search_space` is not part of a variant's experiment

    try:
        suite = Suite.model_validate(data, context=context)
    except ValidationError as e:
        problems = problems_of(e, Suite, locator)
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
    problems += _architecture_search_problems(suite, locator, context)
    problems += _reference_problems(suite, locator)  # sources/teachers exist, no cycles
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


def _search_problems(suite: Suite, own_spaces: dict, locator: Locator, context: dict) -> list[Problem]:
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
                problems += problems_of(e, ParamSpec, locator, where + (key,))
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


def _architecture_search_problems(suite: Suite, locator: Locator, context: dict) -> list[Problem]:
    """Every key of the architecture search's space lands on a real setting of the variant it varies."""
    if suite.architecture_search is None:
        return []
    problems, start = [], suite.search_start()
    config = suite.experiments[start].model_dump(mode="json")
    for key, spec in suite.architecture_search.space.items():
        origin = ("architecture_search", "space", key)
        for value in spec.grid() if spec.type == "categorical" else (spec.sample_value(),):
            try:
                Experiment.model_validate(set_dotted(config, key, value), context=context)
            except (ValidationError, KeyError, IndexError, ValueError, TypeError, AttributeError) as e:
                detail = e.errors()[0]["msg"] if isinstance(e, ValidationError) else f"no such setting ({type(e).__name__}: {e})"
                problems.append(Problem(locator.where(origin), ".".join(origin),
                                        f"'{key}' is not a setting of variant '{start}' that takes {value!r}: {detail}"))
                break
    if references(suite, start):
        problems.append(Problem(locator.where(("architecture_search",)), "architecture_search",
                                f"variant '{start}' needs other variants' weights; the search trains from scratch"))
    return problems


FLIP_UNSAFE_DATASETS = ("digits", "mnist")  # a mirrored digit can read as another one (or as none)


def _warnings(suite: Suite, locator: Locator) -> list[str]:
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


def _variant_problems(data: dict, locator: Locator, context: dict, skip_base_errors: bool = False) -> list[Problem]:
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
                problems.append(Problem(locator.where(path), ".".join(map(str, path)), describe_error(err, model_at(Experiment, loc))))
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


def _post_training() -> list[str]:
    return sorted(n for n, t in techniques.registered().items() if t.stage == "post_training")


def _reference_problems(suite: Suite, locator: Locator) -> list[Problem]:
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
            problem(name, ("start_from",), "start_from is for variants that quantize, prune or factorize a trained "
                    f"model; add such a section ({', '.join(_post_training())}), or remove start_from")
        for reference in references(suite, name):
            keys, ref, model, role = reference.keys, reference.ref, reference.model, reference.role
            if ref == name:
                problem(name, keys, f"variant '{name}' cannot be {role} itself"
                        + ("; the baseline trains from scratch: give start_from another variant or a checkpoint"
                           if keys == ("start_from",) else ""))
            elif ref in suite.experiments:
                other = suite.experiments[ref]
                if other.compresses:
                    problem(name, keys, f"'{ref}' compresses a trained model itself; {role} must be a variant that "
                            "trains (chain compressions inside one variant: e.g. prune and quantize together)")
                elif keys == ("start_from",) and other.model != exp.model:
                    problem(name, keys, f"the model of '{name}' must be that of {role} '{ref}' "
                            f"({other.model.model_dump(exclude_defaults=True)}): it loads those weights")
            elif ref.startswith("runs:/") or ref.startswith("models:/"):
                pass  # resolved at run time (the store may be another one)
            elif not Path(ref).is_file():
                hint = f";{did_you_mean(ref, names)} variants: {', '.join(names)}" if "/" not in ref else ""
                problem(name, keys, f"'{ref}' is neither a variant nor an existing checkpoint file{hint}")
            elif keys != ("start_from",) and model is None:
                problem(name, keys[:1], f"a teacher checkpoint needs {keys[0]}.teacher_model: its architecture, "
                        "e.g. {name: mnist_net}")
    if suite.search is not None and any(references(suite, v) for v in suite.experiments):
        problems.append(Problem(locator.where(("search",)), "search",
                                "search is not supported yet in suites whose variants need other variants' weights "
                                f"({', '.join(_post_training())}, distill)"))
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
