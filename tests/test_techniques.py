"""Every technique module registers itself, and the schema, the plan and the report follow from the
registry alone (parametrized over everything registered, timm-style)."""

import subprocess
import sys

import pytest

from cnnbench import techniques
from cnnbench.config import Experiment, json_schema
from tests.conftest import REPO

MODULES = sorted(p.stem for p in (REPO / "cnnbench" / "techniques").glob("*.py") if p.stem not in ("__init__", "base"))


def test_every_module_in_the_package_is_a_registered_technique_and_none_imports_torch():
    code = ("import sys; from cnnbench import techniques; import cnnbench.config; "
            "print(sorted(techniques.registered())); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    names, torch_loaded = out.strip().splitlines()
    assert eval(names) == MODULES  # noqa: S307 - our own printed list
    assert torch_loaded == "False"


@pytest.mark.parametrize("name", sorted(techniques.registered()))
def test_a_technique_declares_what_the_rest_of_the_house_reads(name):
    t = techniques.registered()[name]
    assert t.stage in ("training", "post_training")
    assert len(t.card()) > 100  # its method card: what it does, when it helps, what it costs
    assert t.summary and "\n" not in t.summary
    if t.block is not None:  # its block is an optional key of every experiment, and of the JSON schema
        assert Experiment.model_fields[name].default is None
        assert name in json_schema()["$defs"]["Experiment"]["properties"]
        assert not t.active(Experiment())
    else:
        assert name not in Experiment.model_fields


EXAMPLES = {"precision": {"train": {"precision": "bf16"}}, "compile": {"train": {"compile": True}},
            "distill": {"distill": {"teacher": "big"}}, "low_rank": {"low_rank": {"rank_ratio": 0.5}},
            "prune": {"prune": {"method": "l1_unstructured", "amount": 0.5, "finetune_epochs": 2}},
            "quantize": {"quantize": {"method": "qat", "qat_epochs": 1}},
            "finetune": {"finetune": {"epochs": 3, "new_head": True}}, "deploy": {"deploy": {"fuse_bn": True}}}


@pytest.mark.parametrize("name", sorted(techniques.registered()))
def test_switched_on_a_technique_is_active_described_and_counted(name):
    assert name in EXAMPLES, f"add an example experiment for the new technique '{name}'"
    exp = Experiment.model_validate(EXAMPLES[name])
    t = techniques.registered()[name]
    assert [x.name for x in techniques.active(exp)] == [name]
    assert t.describe(exp) and "\n" not in t.describe(exp)
    assert exp.compresses == (t.stage == "post_training")
    assert t.finetune_epochs(exp) == {"prune": 2, "quantize": 1, "finetune": 3}.get(name, 0)
    assert exp.fingerprint(0) != Experiment().fingerprint(0)


def test_post_training_techniques_apply_in_their_order():
    exp = Experiment.model_validate({"quantize": {"method": "static"}, "low_rank": {"energy": 0.9},
                                     "prune": {"method": "channel", "amount": 0.5}})
    assert [t.name for t in techniques.active(exp, "post_training")] == ["low_rank", "prune", "quantize"]
    more = Experiment.model_validate({"finetune": {"epochs": 1}, "low_rank": {"energy": 0.9}, "deploy": {"form": "exported"}})
    assert [t.name for t in techniques.active(more, "post_training")] == ["finetune", "low_rank", "deploy"]
