"""Fingerprints of every shipped suite's runs are pinned: a finished run is reused (and a report selects
it) by its fingerprint and plan key, so a refactor that changes one silently retires every stored run.

The golden file was written from main before the technique interface (issue 15); regenerate it only
with a deliberate FINGERPRINT_VERSION bump: ``python tests/test_fingerprints.py --write`` — or one suite's
entry when that suite is redesigned (its runs are new experiments; the quickstart's, for issue 17), or a searched
suite's studies when the search itself changes (reports_per_epoch: pruning at quarter epochs, issue 19).
"""

import functools
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden" / "fingerprints.json"


@functools.cache
def current() -> dict:
    from cnnbench.config import load_suite, plan, study_name
    from cnnbench.registries import all_registries

    out = {}
    for path in sorted((REPO / "suites").glob("*.yaml")):
        suite = load_suite(path, registries=all_registries())
        runs = {f"{s.variant}/seed{s.seed}": s.fingerprint for s in plan(suite)}
        entry = {"runs": runs}
        if suite.search is not None:
            tuned = plan(suite, dict(suite.experiments))
            entry["studies"] = {v: study_name(suite, v) for v in suite.variants}
            entry["tuned_plan_keys"] = {f"{s.variant}/seed{s.seed}": s.plan_key for s in tuned}
        out[path.stem] = entry
    return out


@pytest.mark.parametrize("suite", sorted(json.loads(GOLDEN.read_text())))
def test_shipped_suites_keep_their_fingerprints(suite):
    golden = json.loads(GOLDEN.read_text())[suite]
    now = current()[suite]
    for key in golden:
        assert now[key] == golden[key], f"{suite}: {key} changed; stored runs would no longer be reused"


if __name__ == "__main__" and "--write" in sys.argv:
    GOLDEN.write_text(json.dumps(current(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
