"""Wall time of the quickstart and the share of it spent in MLflow.

Runs ``cnnbench run SUITE`` as a user would, in a fresh directory (so the SQLite store is created
from nothing, as on a first run), then again with ``--rerun`` on the warm store. The MLflow share is
the time cnnbench measured inside MLflow calls during the suite over the suite's wall time; opening
the store (MLflow creating its SQLite tables, ~3 s the first time) and imports are in the command's
wall time, not in the suite's.

    python benchmarks/suite_overhead.py [suites/quickstart.yaml] [--set ...]
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(cwd: Path, suite: Path, extra: list[str]) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "cnnbench", "run", str(suite), "-q", *extra], cwd=cwd,
                         capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - t0
    m = re.search(r"; ([\d.]+) s \(([\d.]+) s in MLflow\)", out)
    return wall, float(m.group(1)), float(m.group(2))


def main() -> None:
    suite = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 and not sys.argv[1].startswith("-") else REPO / "suites/quickstart.yaml"
    extra = [a for a in sys.argv[2:]] if len(sys.argv) > 2 else []
    with tempfile.TemporaryDirectory() as tmp:
        cold = run(Path(tmp), suite, extra)
        warm = run(Path(tmp), suite, extra + ["--rerun"])
    for label, (wall, suite_s, mlflow_s) in (("fresh store", cold), ("warm store ", warm)):
        print(f"{suite.name} {label}: command wall {wall:5.1f} s; suite {suite_s:5.1f} s, of which MLflow "
              f"{mlflow_s:5.2f} s = {100 * mlflow_s / suite_s:4.1f}% (targets: wall ≤ 30 s, MLflow ≤ 2%)")


if __name__ == "__main__":
    main()
