"""The weights' precision: auto on a CPU picks bfloat16 only for models large enough to gain from it."""

import pytest
import torch

from hirope_lsp.model import loading
from hirope_lsp.model.loading import ModelLoadError, load_model, parameter_count, pick_dtype
from tests.tiny_models import tiny_model


@pytest.fixture
def saved_tiny(tmp_path):
    from transformers import AutoTokenizer

    model = tiny_model("qwen2", vocab_size=len(AutoTokenizer.from_pretrained(loading.DEFAULT_MODEL_DIR)))
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(loading.DEFAULT_MODEL_DIR).save_pretrained(tmp_path)
    return tmp_path, sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("bf16_cpu", [True, False])
def test_auto_on_a_cpu_is_bfloat16_only_for_a_large_model_on_a_cpu_that_multiplies_it(monkeypatch, bf16_cpu):
    monkeypatch.setattr(loading, "cpu_has_bf16", lambda: bf16_cpu)
    large = loading.CPU_BF16_MIN_PARAMETERS
    assert pick_dtype("auto", "cpu", large) == (torch.bfloat16 if bf16_cpu else torch.float32)
    assert pick_dtype("auto", "cpu", large - 1) == torch.float32
    assert pick_dtype("auto", "cpu", None) == torch.float32  # size unknown
    assert pick_dtype("float32", "cpu", large) == torch.float32  # what the user set wins
    assert pick_dtype("bfloat16", "cpu", 10) == torch.bfloat16
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        pick_dtype("int3", "cpu", large)


def test_the_parameter_count_is_read_from_the_config_without_the_weights(saved_tiny, tmp_path_factory):
    path, expected = saved_tiny
    assert parameter_count(str(path), local_files_only=True) == expected
    assert parameter_count(str(tmp_path_factory.mktemp("empty")), local_files_only=True) is None


def test_auto_loads_a_large_model_in_bfloat16_on_a_cpu_with_bf16_and_the_user_can_keep_float32(saved_tiny, monkeypatch):
    path, count = saved_tiny
    monkeypatch.setattr(loading, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(loading, "CPU_BF16_MIN_PARAMETERS", count)  # the tiny model counts as large
    lm, _, _ = load_model(str(path), device="cpu", dtype="auto")
    assert next(lm.parameters()).dtype == torch.bfloat16
    lm, _, _ = load_model(str(path), device="cpu", dtype="float32")
    assert next(lm.parameters()).dtype == torch.float32
    monkeypatch.setattr(loading, "CPU_BF16_MIN_PARAMETERS", count + 1)
    lm, _, _ = load_model(str(path), device="cpu", dtype="auto")
    assert next(lm.parameters()).dtype == torch.float32


def test_the_embedded_model_stays_float32_on_a_cpu():
    lm, _, _ = load_model(None, device="cpu", dtype="auto")
    assert next(lm.parameters()).dtype == torch.float32
