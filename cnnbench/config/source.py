"""Suite text → data with a location for every value: YAML read with file:line, bounded against
alias bombs and runaway nesting, ``--set`` overrides, deep-merge, and pydantic errors turned into
:class:`Problem` lines that name the file, line, key and fix."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from cnnbench.registry import did_you_mean

# A suite is a few hundred values nested a few levels deep; these bounds are far above any real one and
# far below what hurts: nine nested anchors of nine aliases each (1 KB of text) expand to 9⁹ values.
MAX_DEPTH = 64
MAX_VALUES = 100_000


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
    """Parse YAML; return the data and a map from key path to 1-based line number. Nesting deeper than
    ``MAX_DEPTH`` or anchors expanding to more than ``MAX_VALUES`` values are refused before anything
    walks the expanded tree."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SuiteError([Problem(source, "", "no such file (give the path of a suite YAML, e.g. suites/quickstart.yaml)")]) from None
    except OSError as e:
        raise SuiteError([Problem(source, "", f"cannot read: {e.strerror}")]) from None
    node, data = safe_load(text, source)
    lines: dict[tuple, int] = {}
    problems: list[Problem] = []
    if node is not None:
        _walk_nodes(node, (), lines, problems, source)
    if problems:
        raise SuiteError(problems)
    return data, lines


def safe_load(text: str, source: str) -> tuple[yaml.Node | None, Any]:
    """The composed node and the loaded data of ``text``, or :class:`SuiteError` naming ``source``:line."""
    try:
        _check_depth(text, source)
        node = yaml.compose(text, Loader=Loader)
        if node is not None:
            _check_expansion(node, source)
        data = yaml.load(text, Loader=Loader)  # noqa: S506 - Loader is a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise SuiteError([Problem(where, "", f"not valid YAML: {getattr(e, 'problem', e)}")]) from None
    return node, data


def _check_depth(text: str, source: str) -> None:
    """Refuse nesting deeper than ``MAX_DEPTH``, from the parser's events (PyYAML's composer recurses
    once per level and would end in a RecursionError)."""
    depth = 0
    for event in yaml.parse(text, Loader=Loader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise SuiteError([Problem(f"{source}:{event.start_mark.line + 1}", "",
                                          f"nested more than {MAX_DEPTH} levels deep; a suite needs a few levels")])
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def _check_expansion(root: yaml.Node, source: str) -> None:
    """Refuse a document whose anchors and aliases expand to more than ``MAX_VALUES`` values (a "billion
    laughs"): sizes are counted once per distinct node, so the check itself never expands anything."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        if id(node) not in sizes:
            if isinstance(node, yaml.MappingNode):
                children = [n for pair in node.value for n in pair]
            elif isinstance(node, yaml.SequenceNode):
                children = node.value
            else:
                children = []
            sizes[id(node)] = min(1 + sum(size(c) for c in children), MAX_VALUES + 1)
        return sizes[id(node)]

    if size(root) > MAX_VALUES:
        raise SuiteError([Problem(f"{source}:{root.start_mark.line + 1}", "",
                                  f"anchors and aliases expand to more than {MAX_VALUES:,} values; write the suite "
                                  "out (a suite needs a few hundred)")])


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
    value = safe_load(raw, f"--set {text}")[1] if raw.strip() else ""
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



# ───────────────────────────── locations of errors ─────────────────────────────


class Locator:
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


def describe_error(err: dict, model: type[BaseModel] | None) -> str:
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


def model_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
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


def problems_of(exc: ValidationError, root: type[BaseModel], locator: Locator, prefix: tuple = ()) -> list[Problem]:
    out = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = locator.real_path(prefix + loc)
        out.append(
            Problem(locator.where(path), ".".join(map(str, path)), describe_error(err, model_at(root, loc)))
        )
    return out
