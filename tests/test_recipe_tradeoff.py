"""scripts/recipe_tradeoff.py: its shapes are the shipped recipe's, and both phases run the real paths."""

import importlib.util
from pathlib import Path

import pytest

from hirope_lsp.model.loading import load_model

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "recipe_tradeoff.py"


@pytest.fixture(scope="module")
def tradeoff():
    spec = importlib.util.spec_from_file_location("recipe_tradeoff", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_shipped_shape_is_the_embedded_model(tradeoff):
    lm, _, _ = load_model(None, device="cpu", dtype="float32")
    assert tradeoff.parameters(*tradeoff.parse_shape(tradeoff.SHIPPED)) == sum(p.numel() for p in lm.parameters())
    config = tradeoff.llama_config(6, 256)
    assert (config.intermediate_size, config.num_attention_heads) == (lm.config.intermediate_size,
                                                                      lm.config.num_attention_heads)


def test_a_width_that_is_no_multiple_of_the_heads_is_refused(tradeoff):
    with pytest.raises(SystemExit, match="multiple"):
        tradeoff.parse_shape("6x200")


def test_inference_row_times_a_cold_prompt_and_a_keystroke(tradeoff, tmp_path):
    row = tradeoff.inference_row(tradeoff.random_model_dir(1, 64, tmp_path), budget=600, rounds=1)
    assert row["prompt_tokens"] > 300
    assert row["cold_s"] > 0 and row["keystroke_ms"] > 0


def test_training_row_keeps_the_tokens_of_a_step(tradeoff):
    row = tradeoff.training_row(1, 64, context=128, steps=1)
    assert row["batch"] == 16 * 513 // 129
    assert row["tokens_per_s"] > 0
