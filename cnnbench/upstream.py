"""Trained weights that other variants need: a post-training variant starts from its source's weights
(``start_from``, default the baseline), a distilled student learns from its teacher's.

A source is a variant of the suite, trained once per seed and reused by every variant that names it,
or a checkpoint file / ``runs:/<id>/<path>`` artifact. Variants that others need store their weights
as the MLflow artifact ``checkpoint/model.pt`` (and in a local cache for the suite's invocation), so a
later ``cnnbench run`` that reuses the source still finds them. Within each seed, sources and teachers
run before the variants that need them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from cnnbench.checkpoints import load_checkpoint, save_checkpoint
from cnnbench.config import RunSpec, Suite, references, upstream_variants

CHECKPOINT_ARTIFACT = "checkpoint/model.pt"


class Upstream:
    """Trained weights of sources and teachers, per seed: saved when their run finishes, found again
    in this invocation's cache or in MLflow for runs reused from an earlier invocation."""

    def __init__(self, suite: Suite, tracker, experiment_id: str):
        self.suite, self.tracker, self.experiment_id = suite, tracker, experiment_id
        self.needed = {u for v in suite.experiments for u in upstream_variants(suite, v)}
        # removed when this object goes or the process exits (every `cnnbench run` used to leave one in /tmp)
        self._cache = tempfile.TemporaryDirectory(prefix=f"cnnbench-{suite.name}-checkpoints-")
        self.cache_dir = Path(self._cache.name)
        self.local: dict[tuple[str, int], Path] = {}
        self.failed: dict[tuple[str, int], str] = {}

    def order(self, specs: list[RunSpec], todo: list[RunSpec], done: dict[str, str]) -> list[RunSpec]:
        """``todo`` plus any reused source whose run stored no checkpoint (it is trained again), sorted so
        that within a seed every source/teacher runs before the variants that need it."""
        todo = list(todo)
        planned = {(s.variant, s.seed) for s in todo}
        by_key = {(s.variant, s.seed): s for s in specs}
        for spec in list(todo):
            for up in upstream_variants(self.suite, spec.variant):
                src = by_key.get((up, spec.seed))
                if src is None or (up, spec.seed) in planned:
                    continue
                run_id = done.get(src.fingerprint)
                if run_id is None or not self.tracker.has_artifact(run_id, CHECKPOINT_ARTIFACT):
                    todo.append(src)
                    planned.add((up, spec.seed))
        seeds = self.suite.seed_list()
        return sorted(todo, key=lambda s: (seeds.index(s.seed) if s.seed in seeds else 0, self.depth(s.variant)))

    def depth(self, variant: str) -> int:
        ups = upstream_variants(self.suite, variant)
        return 1 + max(self.depth(u) for u in ups) if ups else 0

    def save(self, variant: str, seed: int, run_id: str, model) -> None:
        """Keep a needed variant's trained weights: local cache (atomic write) and MLflow artifact."""
        if variant not in self.needed:
            return
        path = save_checkpoint(model.state_dict(), self.cache_dir / f"{variant}-seed{seed}.pt")
        self.local[(variant, seed)] = path
        self.tracker.log_artifacts(run_id, {CHECKPOINT_ARTIFACT: path.read_bytes()})

    def state(self, ref: str, seed: int) -> dict:
        """The state dict ``ref`` (a variant, for ``seed``; a file; or ``runs:/…``) names. Raises
        :class:`Missing` when a source variant has no finished run for the seed."""
        if ref in self.suite.experiments:
            path = self.local.get((ref, seed))
            if path is None:
                spec_fp = self.suite.experiments[ref].fingerprint(seed)
                run_id = self.tracker.done_runs(self.experiment_id, self.suite.name).get(spec_fp)
                if run_id is None or not self.tracker.has_artifact(run_id, CHECKPOINT_ARTIFACT):
                    raise Missing(f"'{ref}' has no finished run with a checkpoint for seed {seed}")
                path = Path(self.tracker.download_artifact(run_id, CHECKPOINT_ARTIFACT, str(self.cache_dir / f"{ref}-{seed}")))
                self.local[(ref, seed)] = path
            return load_checkpoint(path)
        if ref.startswith(("runs:/", "models:/")):
            return load_checkpoint(self.tracker.download_uri(ref, str(self.cache_dir / "uri")))
        return load_checkpoint(ref)

    def weights(self, spec: RunSpec) -> tuple[dict[str, dict], dict]:
        """The state dicts of everything ``spec``'s variant references (by ref), and their model configs
        (a variant's own model, or the one a checkpoint reference gives). Raises :class:`Missing`."""
        states, models = {}, {}
        for reference in references(self.suite, spec.variant):
            states[reference.ref] = self.state(reference.ref, spec.seed)
            other = self.suite.experiments.get(reference.ref)
            models[reference.ref] = other.model if other is not None else (reference.model or spec.experiment.model)
        return states, models


class Missing(RuntimeError):
    """A source or teacher run did not finish: the dependent run is skipped with this reason."""
