import hashlib

import pytest
import torch

from cnnbench import data as datamod
from cnnbench.augment import AUGMENTATIONS, BatchAugment
from cnnbench.config import DataConfig, Experiment
from cnnbench.data import DATASETS, DataNotFoundError
from cnnbench.layers import ACTIVATIONS, NORMS, POOLS, MixedPool2d, StochasticPool2d
from cnnbench.models import MODELS, build, count_params
from cnnbench.train import train

# Datasets that need no files: every registered model must train on each.
OFFLINE = {
    "digits": DataConfig(dataset="digits"),
    "synthetic_rgb32": DataConfig(dataset="synthetic", synthetic={"channels": 3, "image_size": 32, "num_classes": 100,
                                                                  "train_size": 256, "test_size": 64}),
}


def test_lenet5_has_the_classic_parameter_count():
    model = MODELS.create("lenet5", in_channels=1, num_classes=10, image_size=28)
    assert count_params(model) == 61_706


@pytest.mark.parametrize("dataset", sorted(OFFLINE))
@pytest.mark.parametrize("model_name", MODELS.names())
def test_every_model_trains_a_step_on_each_dataset(model_name, dataset):
    ds = datamod.load(OFFLINE[dataset])
    c, h, _ = ds.shape
    torch.manual_seed(0)
    model = MODELS.create(model_name, in_channels=c, num_classes=ds.num_classes, image_size=h)
    x, y = ds.train_x[:32].float() / 255, ds.train_y[:32]
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model(x)
    assert out.shape == (32, ds.num_classes)
    torch.nn.functional.cross_entropy(out, y).backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("norm", NORMS.names())
@pytest.mark.parametrize("activation", ACTIVATIONS.names())
def test_every_norm_and_activation_builds_into_every_model(norm, activation):
    for name in MODELS.names():
        exp = Experiment(model={"name": name, "norm": norm, "activation": activation, "dropout": 0.1})
        model = build(exp.model, in_channels=1, num_classes=10, image_size=28)
        has_bn = any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        assert has_bn == (norm == "batch")
        assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("pool", POOLS.names())
def test_every_pool_halves_the_map_in_every_model_that_pools_and_trains(pool):
    torch.manual_seed(0)
    for name in ("lenet5", "mnist_net", "simple_cnn"):
        model = build(Experiment(model={"name": name, "pool": pool}).model, in_channels=1, num_classes=10, image_size=28)
        plain = build(Experiment(model={"name": name}).model, in_channels=1, num_classes=10, image_size=28)
        extra = {"learned": None, "mixed_learned": None}.get(pool, 0)  # the others add no parameters
        if extra is not None:
            assert count_params(model) == count_params(plain), (name, pool)
        else:
            assert count_params(model) > count_params(plain)
        out = model.train()(torch.rand(4, 1, 28, 28))
        out.sum().backward()
        assert out.shape == (4, 10) and model.eval()(torch.rand(4, 1, 28, 28)).shape == (4, 10)
    assert count_params(build(Experiment(model={"name": "lenet5", "pool": "mixed_learned"}).model, 1, 10, 28)) == 61_708


def test_mixed_and_stochastic_pooling_compute_what_their_papers_say():
    x = torch.tensor([[[[1.0, 3.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]], [[-1.0, 2.0], [1.0, 1.0]]]])  # 3 windows
    assert torch.allclose(MixedPool2d(learned=False)(x).flatten(), torch.tensor([2.0, 0.0, 1.375]))  # ½(max + avg)
    pool = StochasticPool2d().eval()  # Σ pᵢaᵢ with pᵢ ∝ max(aᵢ, 0): (1 + 9)/4; zeros → 0; (4 + 1 + 1)/4 (−1 has p = 0)
    assert torch.allclose(pool(x).flatten(), torch.tensor([2.5, 0.0, 1.5]))
    pool.train()
    torch.manual_seed(0)
    draws = torch.stack([pool(x).flatten() for _ in range(4000)])
    assert set(draws[:, 0].tolist()) == {1.0, 3.0} and set(draws[:, 1].tolist()) == {0.0}
    assert (draws[:, 0] == 3.0).float().mean() == pytest.approx(0.75, abs=0.03)  # p(3) = 3/4
    assert set(draws[:, 2].tolist()) == {1.0, 2.0}  # a negative activation is never drawn
    torch.manual_seed(1)
    first = pool(x.repeat(8, 1, 1, 1))
    torch.manual_seed(1)
    assert torch.equal(first, pool(x.repeat(8, 1, 1, 1)))  # a seeded run repeats exactly


def test_global_average_pooling_head_replaces_the_400_flattened_features_with_16():
    gap = build(Experiment(model={"name": "lenet5", "kwargs": {"head": "gap"}}).model, 1, 10, 28)
    assert count_params(gap) == 61_706 - 400 * 120 + 16 * 120
    assert gap(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="lenet5 head 'fc': use 'flatten' or 'gap'"):
        build(Experiment(model={"name": "lenet5", "kwargs": {"head": "fc"}}).model, 1, 10, 28)


def test_pool_names_are_checked_and_models_without_pooling_refuse_the_knob():
    from cnnbench.registries import all_registries

    ctx = {"registries": all_registries()}
    with pytest.raises(ValueError, match="unknown pool 'maxx'; did you mean 'max'"):
        Experiment.model_validate({"model": {"name": "lenet5", "pool": "maxx"}}, context=ctx)
    with pytest.raises(ValueError, match="model 'resnet' has no 'pool' knob"):
        Experiment.model_validate({"model": {"name": "resnet", "pool": "avg"}}, context=ctx)
    default, explicit = Experiment(), Experiment(model={"pool": "max"})
    assert default.fingerprint(0) != explicit.fingerprint(0) and "pool" not in default.identity()["model"]


def test_dropblock_rate_rises_linearly_over_training_and_is_off_at_evaluation():
    from cnnbench.layers import ScheduledDropBlock2d

    exp = Experiment.model_validate({
        "data": {"dataset": "synthetic", "batch_size": 64, "synthetic": {"train_size": 128, "test_size": 64, "image_size": 28}},
        "model": {"name": "lenet5", "kwargs": {"dropblock": 0.3, "dropblock_size": 3}},
        "train": {"epochs": 3}, "device": "cpu"})
    model = build(exp.model, 1, 10, 28)
    blocks = [m for m in model.modules() if isinstance(m, ScheduledDropBlock2d)]
    assert len(blocks) == 2 and all(b.block.block_size == 3 for b in blocks)
    seen = []
    result = train(exp, 0, datamod.split(datamod.load(exp.data), 0.1), torch.device("cpu"), model=model,
                   on_epoch=lambda record: seen.append(blocks[0].block.p))
    assert result.status == "finished" and seen == pytest.approx([0.0, 0.15, 0.3])  # Ghiasi et al.'s linear ramp
    x = torch.rand(8, 6, 12, 12) + 0.1
    assert torch.equal(blocks[0].eval()(x), x)
    dropped = blocks[0].train()(x)
    assert (dropped == 0).any() and not torch.equal(dropped, x)  # whole regions zeroed, the rest rescaled


def test_stochastic_depth_drops_residual_branches_by_the_linear_decay_rule():
    plain = MODELS.create("resnet", in_channels=1, num_classes=10, image_size=28, depth=20)
    deep = MODELS.create("resnet", in_channels=1, num_classes=10, image_size=28, depth=20, stochastic_depth=0.5)
    deep.load_state_dict(plain.state_dict())  # no parameters added
    probs = [m.drop_path.p for m in deep if hasattr(m, "drop_path")]
    assert probs == pytest.approx([0.5 * k / 9 for k in range(1, 10)])  # block l of L: p·l/L
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(deep.eval()(x), plain.eval()(x))  # every branch is there at evaluation
        torch.manual_seed(0)
        assert not torch.allclose(deep.train()(x), plain.train()(x))
    with pytest.raises(ValueError, match="stochastic_depth must be in"):
        MODELS.create("resnet", in_channels=1, num_classes=10, image_size=28, stochastic_depth=1.0)


def test_classes_make_a_task_of_their_own_relabelled_in_order():
    full = datamod.load(DataConfig(dataset="digits"))
    part = datamod.load(DataConfig(dataset="digits", classes=[7, 3]))
    assert part.num_classes == 2 and set(part.train_y.tolist()) == {0, 1} and set(part.test_y.tolist()) == {0, 1}
    assert (part.train_y == 0).sum() == (full.train_y == 7).sum() and (part.test_y == 1).sum() == (full.test_y == 3).sum()
    assert torch.equal(part.train_x[part.train_y == 0], full.train_x[full.train_y == 7])  # the same images, in order
    with pytest.raises(ValueError, match=r"data.classes: \[12\] not in digits, whose classes are 0…9"):
        datamod.load(DataConfig(dataset="digits", classes=[1, 12]))
    with pytest.raises(ValueError, match="each class once"):
        DataConfig(dataset="digits", classes=[1, 1])
    assert "classes" not in Experiment().identity()["data"]  # every earlier run keeps its fingerprint


def test_real_mnist_loads_from_the_data_dir(mnist_dir):
    ds = datamod.load(DataConfig(dataset="mnist"), str(mnist_dir))
    assert ds.train_x.shape == (60_000, 1, 28, 28) and ds.train_x.dtype == torch.uint8
    assert ds.test_x.shape == (10_000, 1, 28, 28)
    assert torch.bincount(ds.train_y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    mean, std = ds.mean_std
    assert mean.item() == pytest.approx(0.1307, abs=1e-4) and std.item() == pytest.approx(0.3081, abs=1e-4)


def test_missing_dataset_names_the_directory_and_files(tmp_path):
    with pytest.raises(DataNotFoundError) as e:
        DATASETS.create("fashion_mnist", root=str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path / "FashionMNIST" / "raw") in msg and "train-images-idx3-ubyte" in msg and "CNNBENCH_DATA_DIR" in msg


def test_validation_split_is_carved_from_train_and_fixed():
    ds = datamod.load(DataConfig(dataset="digits"))
    a, b = datamod.split(ds, 0.1), datamod.split(ds, 0.1)
    assert torch.equal(a.val_idx, b.val_idx)
    assert len(set(a.train_idx.tolist()) & set(a.val_idx.tolist())) == 0
    assert len(a.train_idx) + len(a.val_idx) == len(ds.train_y)
    assert len(datamod.split(ds, 0.1, limit_train=100).train_idx) == 100


def test_augmentations_are_per_sample_and_reproducible_from_the_seed():
    x = torch.rand(16, 1, 28, 28)
    aug = BatchAugment(["random_crop", "rotation"], image_size=28)
    a = aug(x, torch.Generator().manual_seed(3))
    b = aug(x, torch.Generator().manual_seed(3))
    c = aug(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    same = x[0:1].expand(16, -1, -1, -1).contiguous()  # one image, 16 different draws
    outs = aug(same, torch.Generator().manual_seed(0))
    assert len({hashlib.sha1(o.numpy().tobytes()).hexdigest() for o in outs}) > 8


def test_flip_and_crop_are_exact_pixel_operations():
    x = torch.rand(4, 1, 8, 8)
    flipped = BatchAugment([{"horizontal_flip": {"p": 1.0}}], image_size=8)(x, torch.Generator().manual_seed(0))
    assert torch.equal(flipped, x.flip(-1))
    same = BatchAugment([{"random_crop": {"padding": 0}}], image_size=8)(x, torch.Generator().manual_seed(0))
    assert torch.equal(same, x)
    shifted = BatchAugment([{"random_crop": {"padding": 2}}], image_size=8)(x, torch.Generator().manual_seed(0))
    for img, out in zip(x, shifted):  # each output is the input shifted by whole pixels, zero-filled
        found = any(
            torch.equal(out, torch.nn.functional.pad(img, (2, 2, 2, 2))[:, 2 + dy : 10 + dy, 2 + dx : 10 + dx])
            for dy in range(-2, 3) for dx in range(-2, 3)
        )
        assert found


def _experiment(**over):
    base = {
        "data": {"dataset": "synthetic", "batch_size": 64, "synthetic": {"train_size": 512, "test_size": 128, "image_size": 16}},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "train": {"epochs": 2},
        "device": "cpu",
    }
    from cnnbench.config import deep_merge

    return Experiment.model_validate(deep_merge(base, over))


def _split(exp):
    return datamod.split(datamod.load(exp.data), exp.data.val_fraction)


def test_same_seed_same_initial_weights_and_data_order_across_variants(monkeypatch):
    """Seed s pairs runs: changing the optimizer or adding augmentation changes neither."""
    import cnnbench.train as tr

    variants = {"sgd": _experiment(), "adam": _experiment(optimizer={"name": "adam", "lr": 0.001}),
                "aug": _experiment(data={"augment": ["rotation"]})}
    splits = {tag: _split(exp) for tag, exp in variants.items()}
    real_randperm, orders = torch.randperm, {}
    for tag, exp in variants.items():
        calls = orders.setdefault(tag, [])

        def recording_randperm(n, *args, _calls=calls, **kwargs):
            out = real_randperm(n, *args, **kwargs)
            _calls.append(out.clone())
            return out

        monkeypatch.setattr(tr.torch, "randperm", recording_randperm)
        tr.train(exp, 7, splits[tag], torch.device("cpu"))
    monkeypatch.setattr(tr.torch, "randperm", real_randperm)
    assert len(orders["sgd"]) == 2  # one permutation per epoch
    for tag in ("adam", "aug"):
        assert all(torch.equal(a, b) for a, b in zip(orders["sgd"], orders[tag], strict=True))
    data = _split(variants["sgd"]).data
    w = {tag: list(tr.initial_model(exp, 7, data).parameters()) for tag, exp in variants.items()}
    assert all(torch.equal(a, b) for a, b in zip(w["sgd"], w["adam"], strict=True))
    assert not torch.equal(w["sgd"][0], list(tr.initial_model(variants["sgd"], 8, data).parameters())[0])


def test_training_learns_and_reports_all_metrics():
    exp = _experiment(train={"epochs": 4, "target_accuracy": 0.5}, optimizer={"name": "adam", "lr": 0.003})
    records = []
    result = train(exp, 0, _split(exp), torch.device("cpu"), on_epoch=records.append)
    assert result.status == "finished"
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert {"train_loss", "val_loss", "val_accuracy", "lr", "train_time_cum_s"} <= set(records[0])
    m = result.metrics
    for key in ("test_accuracy", "test_loss", "precision_macro", "recall_macro", "f1_macro", "train_time_s",
                "train_throughput", "params", "peak_memory_bytes", "time_to_target_s", "epochs_to_target"):
        assert key in m, key
    assert m["test_accuracy"] > 0.5  # synthetic classes are separable
    assert m["time_to_target_s"] <= m["train_time_s"]
    assert sum(map(sum, result.confusion)) == 128


def test_nan_loss_is_a_diverged_result_not_a_crash():
    exp = _experiment(optimizer={"name": "sgd", "lr": 1e6, "momentum": 0.0})
    result = train(exp, 0, _split(exp), torch.device("cpu"))
    assert result.status == "diverged"
    assert result.metrics["diverged_epoch"] == 1 and "diverged at epoch 1" in result.message
    assert "test_accuracy" not in result.metrics


def test_same_seed_gives_identical_results_on_cpu():
    exp = _experiment(data={"augment": ["random_crop"]})
    a = train(exp, 3, _split(exp), torch.device("cpu"))
    b = train(exp, 3, _split(exp), torch.device("cpu"))
    assert a.history[-1]["val_loss"] == b.history[-1]["val_loss"]
    assert a.metrics["test_accuracy"] == b.metrics["test_accuracy"]


@pytest.mark.slow
def test_lenet5_reaches_mnist_accuracy_in_one_epoch(mnist_dir):
    """Real MNIST, where accuracy matters: one epoch of LeNet-5 (54k images) is above 96%."""
    exp = Experiment.model_validate({
        "data": {"dataset": "mnist", "batch_size": 64},
        "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
        "train": {"epochs": 1}, "device": "cpu",
    })
    split = datamod.split(datamod.load(exp.data, str(mnist_dir)), exp.data.val_fraction, exp.data.limit_train)
    result = train(exp, 0, split, torch.device("cpu"))
    assert result.metrics["test_accuracy"] > 0.96, result.metrics


@pytest.mark.parametrize("name", AUGMENTATIONS.names())
def test_every_augmentation_is_deterministic_under_a_seed_and_changes_images(name):
    ds = datamod.load(OFFLINE["synthetic_rgb32"])
    x = ds.train_x[:16].float() / 255
    aug = BatchAugment([name], image_size=32)
    a, b = aug(x, torch.Generator().manual_seed(5)), aug(x, torch.Generator().manual_seed(5))
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(a, x)
    assert 0 <= a.min() and a.max() <= 1


def test_policy_and_pixel_augmentations_run_in_the_training_loop():
    exp = _experiment(train={"epochs": 1}, data={"augment": ["trivial_augment", "random_erasing", "color_jitter"]})
    assert train(exp, 0, _split(exp), torch.device("cpu")).status == "finished"


def test_imagefolder_end_to_end(tmp_path, monkeypatch):
    """A user's own directory tree of images: loaded, trained on, and tracked through the CLI."""
    from click.testing import CliRunner
    from PIL import Image

    from cnnbench.cli import main

    g = torch.Generator().manual_seed(0)
    for split_name, n in (("train", 12), ("test", 4)):
        for label, colour in (("cats", (220, 40, 40)), ("dogs", (40, 40, 220))):
            folder = tmp_path / "pets" / split_name / label
            folder.mkdir(parents=True)
            for i in range(n):
                noise = torch.randint(0, 30, (20, 24, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(noise + torch.tensor(colour, dtype=torch.uint8).numpy()).save(folder / f"{i}.png")
    ds = DATASETS.create("imagefolder", root=str(tmp_path / "pets"), image_size=16)
    assert ds.train_x.shape == (24, 3, 16, 16) and ds.test_x.shape == (8, 3, 16, 16) and ds.num_classes == 2
    suite = tmp_path / "pets.yaml"
    suite.write_text(f"""name: pets
question: Can LeNet-5 tell red from blue?
base:
  data: {{dataset: imagefolder, path: {tmp_path / 'pets'}, image_size: 16, batch_size: 8, val_fraction: 0.25}}
  optimizer: {{name: adam, lr: 0.01}}
  train: {{epochs: 3}}
  device: cpu
variants: {{baseline: {{}}}}
baseline: baseline
seeds: 1
""")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = CliRunner().invoke(main, ["run", str(suite), "-q"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "1 finished" in result.output and (tmp_path / "reports" / "pets.md").exists()
    with pytest.raises(DataNotFoundError, match="train/ and test/"):
        DATASETS.create("imagefolder", root=str(tmp_path / "nowhere"))


def test_augmentations_change_only_training_batches(monkeypatch):
    """The model sees augmented images in training, and exactly the same clean images at validation/test."""
    import cnnbench.train as tr

    real_initial_model = tr.initial_model

    def inputs_seen(exp):
        seen = {"train": [], "eval": []}

        def recording_initial_model(*args):
            model = real_initial_model(*args)
            model.register_forward_pre_hook(  # batch 2: measure.flops_per_sample's probe on a copy, not training
                lambda m, a: seen["train" if m.training else "eval"].append(a[0].clone()) if len(a[0]) != 2 else None)
            return model

        monkeypatch.setattr(tr, "initial_model", recording_initial_model)
        train(exp, 0, _split(exp), torch.device("cpu"))
        return seen

    clean = inputs_seen(_experiment(train={"epochs": 1}))
    augmented = inputs_seen(_experiment(train={"epochs": 1}, data={"augment": ["random_crop", "random_erasing"]}))
    assert len(clean["eval"]) == len(augmented["eval"]) > 0
    assert all(torch.equal(a, b) for a, b in zip(clean["eval"], augmented["eval"]))
    assert len(clean["train"]) == len(augmented["train"])
    assert all(not torch.equal(a, b) for a, b in zip(clean["train"], augmented["train"]))


# ── harder tasks derived from the data we have (issue 17): label noise, digits on a larger canvas ──


def test_label_noise_flips_an_exact_fixed_share_of_training_labels_to_other_classes_and_leaves_test_clean():
    clean = datamod.load(DataConfig(dataset="digits"))
    noisy = datamod.load(DataConfig(dataset="digits", label_noise=0.3))
    flipped = noisy.train_y != clean.train_y
    assert flipped.sum().item() == round(0.3 * len(clean.train_y))  # exactly that share, and never the true class
    assert torch.equal(noisy.test_y, clean.test_y) and torch.equal(noisy.train_x, clean.train_x)
    assert 0 <= noisy.train_y.min() and noisy.train_y.max() < 10
    assert ((noisy.train_y[flipped] - clean.train_y[flipped]) % 10).unique().tolist() == list(range(1, 10))
    again = datamod.noisy_labels(clean.train_y, 0.3, 10, torch.Generator().manual_seed(datamod.LABEL_NOISE_SEED))
    assert torch.equal(again, noisy.train_y)  # a fixed draw: the same for every seed and variant


def test_canvas_places_each_whole_image_at_a_fixed_random_offset(mnist_dir):
    plain = datamod.load(DataConfig(dataset="mnist"), str(mnist_dir))
    moved = datamod.load(DataConfig(dataset="mnist", canvas=56), str(mnist_dir))
    assert moved.train_x.shape == (60000, 1, 56, 56) and moved.test_x.shape == (10000, 1, 56, 56)
    assert torch.equal(moved.train_x[:100].sum((1, 2, 3), dtype=torch.int64),
                       plain.train_x[:100].sum((1, 2, 3), dtype=torch.int64))  # nothing cut off or added
    rows = (moved.train_x[:500, 0] > 0).any(2).float().argmax(1)  # first inked row of each image
    assert rows.unique().numel() > 20  # positions spread over the canvas
    assert torch.equal(moved.train_y, plain.train_y) and torch.equal(moved.test_y, plain.test_y)
    with pytest.raises(ValueError, match=r"data.canvas: 20 is smaller than the images \(28×28\)"):
        datamod.on_canvas(plain.test_x[:2], 20, torch.Generator())


def test_harder_tasks_are_new_experiments_and_the_defaults_keep_every_fingerprint():
    base = Experiment.model_validate({"data": {"dataset": "digits"}})
    assert Experiment.model_validate({"data": {"dataset": "digits", "label_noise": 0.0}}).fingerprint(0) == base.fingerprint(0)
    assert Experiment.model_validate({"data": {"dataset": "digits", "label_noise": 0.2}}).fingerprint(0) != base.fingerprint(0)
    assert Experiment.model_validate({"data": {"dataset": "digits", "canvas": 40}}).fingerprint(0) != base.fingerprint(0)


def test_a_model_trains_on_translated_noisy_digits():
    exp = Experiment.model_validate({"data": {"dataset": "digits", "image_size": 16, "canvas": 24, "label_noise": 0.2},
                                     "model": {"name": "lenet5"}, "optimizer": {"momentum": 0.9, "lr": 0.02},
                                     "train": {"epochs": 2}, "device": "cpu"})
    data = datamod.load(exp.data)
    assert data.shape == (1, 24, 24)
    result = train(exp, 0, datamod.split(data, 0.1), torch.device("cpu"))
    assert result.status == "finished" and 0.1 < result.metrics["test_accuracy"] <= 1.0
