"""Malformed suites, generated with hypothesis: `cnnbench validate` and `run` exit 2 with a message
naming the problem — never a traceback (an uncaught exception fails these tests: catch_exceptions=False)."""

import re
import time

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cnnbench.cli import main
from tests.conftest import TINY_SUITE

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["auto", "cuda:7", "1e-3", "lenet5", "adam", "-1", ""]))
KEYS = st.one_of(st.text(min_size=1, max_size=10), st.sampled_from(
    ["name", "base", "variants", "baseline", "seeds", "data", "model", "optimizer", "train", "schedule", "device",
     "epochs", "lr", "augment", "search", "space", "report", "precision", "compile", "threads", "dataset"]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(KEYS, inner, max_size=4)), max_leaves=12)
# dotted paths into a valid suite, to break one thing at a time
PATHS = st.sampled_from([
    ["name"], ["question"], ["seeds"], ["baseline"], ["variants"], ["base"], ["base", "data"],
    ["base", "data", "dataset"], ["base", "data", "batch_size"], ["base", "data", "synthetic"], ["base", "model"],
    ["base", "model", "name"], ["base", "optimizer", "lr"], ["base", "optimizer", "name"], ["base", "train"],
    ["base", "train", "epochs"], ["base", "train", "precision"], ["base", "train", "compile"], ["base", "device"],
    ["variants", "adam"], ["variants", "adam", "optimizer"], ["variants", "new"], ["report"], ["search"],
])

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _validate(tmp_path, text: str):
    path = tmp_path / "fuzz.yaml"
    path.write_text(text)
    return CliRunner().invoke(main, ["validate", str(path)], catch_exceptions=False)


def _assert_clean(result):
    assert result.exit_code in (0, 2), result.output
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        assert "error" in result.output and "fuzz.yaml" in result.output


@FUZZ
@given(doc=VALUES)
def test_random_yaml_structures_are_refused_with_a_message(tmp_path, doc):
    result = _validate(tmp_path, yaml.safe_dump(doc))
    _assert_clean(result)
    assert result.exit_code == 2  # no random structure is a complete suite


@FUZZ
@given(path=PATHS, value=VALUES)
def test_one_broken_value_in_a_valid_suite_never_crashes(tmp_path, path, value):
    doc = yaml.safe_load(TINY_SUITE)
    node = doc
    for key in path[:-1]:
        node = node.setdefault(key, {}) if isinstance(node, dict) else node
    if isinstance(node, dict):
        node[path[-1]] = value
    _assert_clean(_validate(tmp_path, yaml.safe_dump(doc)))


@FUZZ
@given(text=st.text(alphabet=st.sampled_from(list("{}[]:,-'\"&*!|>%@` \n\tab1.#")), max_size=80))
def test_broken_yaml_syntax_names_the_file(tmp_path, text):
    _assert_clean(_validate(tmp_path, text))


def _laughs(levels: int = 9) -> str:
    """A "billion laughs": each anchor is a list of nine aliases of the previous one (9⁹ values, ~1 KB)."""
    lines = ["name: bomb", "question: q", "a0: &a0 [lol]"]
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    lines += [f"base: {{data: *a{levels}}}", "variants: {x: {}}", "baseline: x"]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text, line, words", [
    (_laughs(), 1, "anchors and aliases expand to more than"),
    ("name: deep\nquestion: q\nbase: " + "[" * 3000 + "]" * 3000 + "\n", 3, "nested more than"),
    ("name: deep\nquestion: q\nbase:\n" + "".join(" " * (2 * i) + f"k{i}:\n" for i in range(1, 200)) + "variants: {}\n",
     None, "nested more than"),
])
def test_alias_bombs_and_runaway_nesting_are_refused_at_once(tmp_path, text, line, words):
    """Bounded before anything walks the expanded tree: no MemoryError, no RecursionError, no traceback."""
    started = time.perf_counter()
    result = _validate(tmp_path, text)
    elapsed = time.perf_counter() - started
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and words in result.output, result.output
    assert re.search(r"fuzz\.yaml:%s:" % (line if line is not None else r"\d+"), result.output), result.output
    assert elapsed < 5, f"took {elapsed:.1f} s"  # unbounded, the laughs take minutes and gigabytes


def test_an_alias_bomb_in_a_set_override_is_refused_too(tmp_path):
    path = tmp_path / "fuzz.yaml"
    path.write_text(TINY_SUITE)
    deep = "[" * 500 + "]" * 500
    result = CliRunner().invoke(main, ["validate", str(path), "--set", f"base.train.epochs={deep}"],
                                catch_exceptions=False)
    assert result.exit_code == 2 and "nested more than" in result.output and "--set base.train.epochs" in result.output
