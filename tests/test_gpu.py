"""The fused CUDA path (memory-efficient SDPA with log-sum-exp). Skipped without a GPU."""

import pytest
import torch
from tiny_models import tiny_model
from transformers import DynamicCache

from hirope_lsp.model import attention
from hirope_lsp.model.patch import attach
from hirope_lsp.model.rope import RopeMethodConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def random_units(length):
    unit = torch.arange(length) // 7
    return torch.stack([unit, torch.arange(length)], -1)[None]


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_cuda_window_longer_than_input_is_unpatched(dtype, atol):
    model = tiny_model("llama").to("cuda", dtype)
    ids = torch.randint(0, 97, (1, 60), device="cuda")
    reference = model(ids).logits.float()
    handle = attach(model, RopeMethodConfig(window=61))
    assert torch.allclose(handle.forward(ids, random_units(60)).logits.float(), reference, atol=atol)
    assert "cuda" not in attention._fused_disabled, "the fused kernel ran"


def test_cuda_incremental_decoding_equals_full_forward():
    model = tiny_model("qwen3").to("cuda")
    handle = attach(model, RopeMethodConfig(window=6, query_chunk=8))
    ids = torch.randint(0, 97, (1, 50), device="cuda")
    positions = random_units(50)
    full = handle.forward(ids, positions).logits
    cache = DynamicCache(config=model.config)
    steps = [handle.forward(ids[:, :30], positions[:, :30], past_key_values=cache).logits]
    for t in range(30, 50):
        steps.append(handle.forward(ids[:, t : t + 1], positions[:, : t + 1], past_key_values=cache).logits)
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-4)
    assert "cuda" not in attention._fused_disabled
