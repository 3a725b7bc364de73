"""What ``cnnbench validate`` prints: the plan of a valid suite and a rough CPU time estimate."""

from __future__ import annotations

from cnnbench import techniques
from cnnbench.config import Experiment, Suite, plan


def train_images(exp: Experiment) -> int:
    """Training images per epoch, from registry metadata (no data is loaded)."""
    from cnnbench.data import DATASETS

    total = DATASETS.info(exp.data.dataset)["train_size"] or exp.data.synthetic.train_size  # imagefolder: a guess
    if exp.data.classes is not None:  # roughly: the digit datasets have 10 balanced classes
        total = total * len(exp.data.classes) // 10
    n = round(total * (1 - exp.data.val_fraction))
    return min(n, exp.data.limit_train) if exp.data.limit_train else n


def trained_epochs(exp: Experiment) -> int:
    """Epochs a run trains: a post-training variant only fine-tunes, as its techniques say (its source
    trains once)."""
    if not exp.compresses:
        return exp.train.epochs
    return sum(t.finetune_epochs(exp) for t in techniques.active(exp, "post_training"))


def rough_seconds(exp: Experiment) -> float:
    """Training time on 2 CPU cores from each model's measured img/s at 28×28 (rough: ±2×)."""
    from cnnbench.models import MODELS

    rate = MODELS.info(exp.model.name).get("cpu_img_per_s", 1000)
    size = exp.data.image_size or (exp.data.synthetic.image_size if exp.data.dataset == "synthetic" else 28)
    size = 32 if exp.data.dataset.startswith("cifar") and not exp.data.image_size else size
    size = max(size, exp.data.canvas or 0)  # the images the net sees are the canvas
    rate *= (28 / size) ** 2
    return train_images(exp) * trained_epochs(exp) / rate


def exact_tie_note(suite: Suite) -> list[str]:
    """Said before the runs when the suite cannot decide a variant that equals its reference on every seed
    (a deterministic transform: fusion, export): the exact sign-flip test then needs more seeds than it runs."""
    from cnnbench.stats import sign_flip_seeds

    looks, compared = suite.looks(), max(1, len(suite.compared()) - 1)
    need = sign_flip_seeds(looks.spent(len(looks.counts) - 1) / compared)
    if need <= looks.counts[-1]:
        return []
    if suite.report.test == "sign":
        return ["", f"note: the sign test (report.test: sign) can decide a comparison only from {need} seeds at the "
                    f"last look, when every difference has one sign; this suite stops at {looks.counts[-1]}"]
    return ["", f"note: a variant whose {suite.report.primary} equals its reference's on every seed (a deterministic "
                f"transform such as fusion or export) is decided by the exact sign-flip test only from {need} seeds "
                f"at the last look; this suite stops at {looks.counts[-1]}"]


def describe_plan(suite: Suite) -> str:
    specs = plan(suite)
    seeds = suite.seed_list()
    lines = [
        f"suite '{suite.name}' is valid: {suite.question}",
        f"{len(suite.variants)} variants × {len(seeds)} seeds ({', '.join(map(str, seeds))}) = {len(specs)} runs;"
        f" baseline '{suite.baseline}'; primary metric {suite.report.primary}",
        *([f"adaptive seeds: rounds at {', '.join(map(str, suite.looks().counts))} seeds, stopping once every "
           f"comparison is decided — {len(suite.variants) * suite.looks().counts[0]} runs at least, the figures "
           f"below are the most"] if suite.adaptive else []),
        *([("compared with a reference instead of the baseline: "
            + ", ".join(f"{v} vs {r}" for v, r in suite.report.against.items()))] if suite.report.against else []),
        "",
        f"{'variant':<20} {'dataset':<14} {'model':<10} {'optimizer':<16} {'epochs':>6} {'images/epoch':>12} {'≈ time/run':>10}",
    ]
    total_epochs, total_s = 0, 0.0
    for name, exp in suite.experiments.items():
        secs = rough_seconds(exp)
        total_epochs += trained_epochs(exp) * len(seeds)
        total_s += secs * len(seeds)
        opt = f"{exp.optimizer.name} {exp.optimizer.lr:g}"
        lines.append(
            f"{name:<20} {exp.data.dataset:<14} {exp.model.name:<10} {opt:<16} {trained_epochs(exp):>6}"
            f" {train_images(exp):>12,} {secs:>9.1f}s"
        )
    if suite.search is not None:
        sc = suite.search
        trial_s = sum(rough_seconds(e) * sc.tuning_seeds for e in suite.experiments.values()) * sc.trials
        total_epochs += sum(e.train.epochs for e in suite.experiments.values()) * sc.trials * sc.tuning_seeds
        total_s += trial_s
        spaces = "; ".join(f"{v}: {', '.join(suite.search_space(v))}" for v in suite.variants)
        lines += ["", f"search first: {sc.trials} trials per variant ({sc.sampler}, seed {sc.sampler_seed}, "
                      f"{sc.pruner} pruner, {sc.direction} {sc.metric}) = {sc.trials * len(suite.variants)} trials, "
                      f"at most {trial_s:.0f} s (pruning saves some; --no-search skips it)", f"spaces — {spaces}"]
    if suite.architecture_search is not None:
        nas, start = suite.architecture_search, suite.experiments[suite.search_start()]
        trial_s = rough_seconds(start) * nas.tuning_seeds * nas.trials  # at the start variant's size (±2× more)
        retrain_s = rough_seconds(start) * nas.retrain * len(seeds)
        total_epochs += start.train.epochs * (nas.tuning_seeds * nas.trials + nas.retrain * len(seeds))
        total_s += trial_s + retrain_s
        lines += ["", f"architecture search: {nas.trials} trials ({nas.sampler}, seed {nas.sampler_seed}) over "
                      f"{', '.join(nas.space)} of '{suite.search_start()}', maximize val_accuracy, minimize {nas.cost}; "
                      f"roughly {trial_s:.0f} s at its size; then up to {nas.retrain} front members as variants "
                      f"nas_1 … × {len(seeds)} seeds, roughly {retrain_s:.0f} s (--no-search: the recorded front only)"]
    lines += exact_tie_note(suite)
    lines += ["", f"total: {total_epochs} epochs, roughly {total_s:.0f} s of training on 2 CPU cores"
                  " (plus data loading and MLflow; a GPU is much faster)"]
    return "\n".join(lines)
