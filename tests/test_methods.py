"""The registry of position methods: one module and one entry make a method, and everything that
offers a choice of method (settings, editors' schema, CLI, evaluation) follows the registry."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model

from hirope_lsp.cli import build_parser
from hirope_lsp.config import SETTINGS
from hirope_lsp.model import methods
from hirope_lsp.model.methods import REGISTRY, PositionMethod, position_method
from hirope_lsp.model.methods.hirope import hirope_far_positions
from hirope_lsp.model.methods.ntk import ntk_frequencies
from hirope_lsp.model.patch import attach
from hirope_lsp.model.rope import FarPositions, RopeMethodConfig, plain_positions
from hirope_lsp.research import evaluate

ROOT = Path(__file__).resolve().parents[1]


def halved_units(cfg, positions, num_pairs, split, window, start=0) -> FarPositions:
    """A method of the test's own: HiRoPE on units twice as coarse."""
    coarse = torch.cat([positions[..., :-1] // 2, positions[..., -1:]], -1)
    return hirope_far_positions(cfg, coarse, num_pairs, split, window, start)


@pytest.fixture
def new_method(monkeypatch):
    method = PositionMethod("hirope-coarse", "hirope on coarser units", far_positions=halved_units, hierarchical=True)
    monkeypatch.setitem(REGISTRY, method.name, method)
    return method


def random_units(length, seed=0):
    g = torch.Generator().manual_seed(seed)
    unit = (torch.rand(length, generator=g) < 0.2).long().cumsum(0)
    return torch.stack([unit, torch.arange(length)], -1)[None]


def test_a_registered_method_attaches_and_keeps_the_window_exact(new_method):
    model = tiny_model("llama")
    ids = torch.randint(0, 97, (1, 40))
    positions = random_units(40)
    with torch.no_grad():
        reference = model(ids).logits
        handle = attach(model, RopeMethodConfig(method=new_method.name, window=41))
        assert handle.windowed
        exact = handle.forward(ids, positions).logits
        handle.detach()
        handle = attach(model, RopeMethodConfig(method=new_method.name, window=6))
        coarse = handle.forward(ids, positions).logits
        handle.detach()
        handle = attach(model, RopeMethodConfig(method="hirope", window=6))
        plain_hirope = handle.forward(ids, positions).logits
        handle.detach()
    assert torch.allclose(exact, reference, atol=2e-5)
    assert (coarse - plain_hirope).abs().max() > 1e-4  # its own positions, not HiRoPE's


def test_a_registered_method_reaches_the_evaluation(new_method):
    assert new_method.name in evaluate.all_methods()
    assert evaluate.all_methods()[-1] == "truncate"
    cfg = evaluate.method_config(new_method.name, 64, 256, RopeMethodConfig(far_bias=2.0))
    assert cfg.method == new_method.name and cfg.far_bias == 2.0
    keys = [("unit", i // 10) for i in range(30)]
    assert evaluate.positions_for(new_method.name, keys, 30).shape == (1, 30, 2)


def test_hierarchical_methods_read_the_levels_the_others_the_token_index():
    keys = [("unit", i // 10) for i in range(30)]
    assert evaluate.positions_for("hirope", keys, 30)[0, 25, 0] > 0
    for name in ("hirope-fixed", "rerope", "self-extend", "ntk", "truncate"):
        assert evaluate.positions_for(name, keys, 30).equal(plain_positions(30))


def test_methods_are_sized_for_the_compared_length():
    base = RopeMethodConfig(window=32)
    assert evaluate.method_config("ntk", 64, 256, base).factor == 4.0
    assert evaluate.method_config("yarn", 64, 256, base).factor == 4.0
    assert evaluate.method_config("dynamic-ntk", 64, 256, base).factor is None  # it reads each input's length
    assert evaluate.method_config("self-extend", 64, 256, base).group_size == 8  # ceil(256 / (64 - 32))
    assert evaluate.method_config("self-extend", 64, 1024, base).group_size == 32
    truncate = evaluate.method_config("truncate", 64, 256, base)
    assert truncate.method == "rope" and truncate.factor is None


def test_an_unknown_method_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown position method 'alibi'; choose one of hirope, "):
        RopeMethodConfig(method="alibi").validate()
    with pytest.raises(ValueError, match="unknown position method"):
        position_method("alibi")


def test_a_method_is_a_window_method_or_a_rescaling_one():
    with pytest.raises(ValueError, match="not both"):
        PositionMethod("both", "both", far_positions=halved_units, frequencies=ntk_frequencies)


def test_every_choice_of_method_lists_the_registry():
    names = list(methods.method_names())
    setting = next(s for s in SETTINGS if s.key == "hirope.method")
    assert list(setting.enum) == names
    for name, method in REGISTRY.items():
        assert method.summary in setting.doc
    package = json.loads((ROOT / "editors/vscode/package.json").read_text())
    properties = package["contributes"]["configuration"]["properties"]
    assert properties["hirope.positions.method"]["enum"] == names
    parser = build_parser()
    args = parser.parse_args(["complete", "x.py", "--line", "0", "--character", "0", "--method", "rerope"])
    assert args.method == "rerope"
    with pytest.raises(SystemExit):
        parser.parse_args(["complete", "x.py", "--line", "0", "--character", "0", "--method", "alibi"])


def test_the_window_methods_and_the_rescaling_ones_are_the_expected_ones():
    assert {m.name for m in REGISTRY.values() if m.windowed} == {"hirope", "hirope-fixed", "rerope", "self-extend"}
    assert {m.name for m in REGISTRY.values() if m.rescales} == {"ntk", "dynamic-ntk", "yarn"}
    assert [m.name for m in REGISTRY.values() if m.hierarchical] == ["hirope"]
    assert replace(REGISTRY["ntk"]).size_for(RopeMethodConfig(), 128, 64).method == "ntk"
