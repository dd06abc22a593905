"""Tiny random causal LMs of each supported family, built from config (no download)."""

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

FAMILIES = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "mistral": MistralConfig,
}


def tiny_model(family: str = "llama", *, train_length: int = 64, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=train_length,
        rope_theta=10000.0,
    )
    if family == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(overrides)
    config = FAMILIES[family](**kwargs)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    return model


# `TrainConfig` fields of a recipe that trains in seconds on the standard library (training tests)
TINY_RECIPE = dict(vocab_size=300, hidden_size=32, layers=1, heads=2, intermediate_size=64, context=32, batch_size=4,
                   warmup=2, lr=3e-3, checkpoint_every=5, held_out_percent=10, max_files=40)


PYTHON_HELPERS = "import os\n\n\n" + "".join(
    f"def helper_{k}(value, scale={k}):\n    total = value * scale + {k}\n    return total\n\n\n" for k in range(60))


def calibration_setup(tmp_path, file_name: str = "helpers.py", text: str = PYTHON_HELPERS):
    """(a copy of the embedded model's directory, a corpus folder holding one file) for `calibrate` runs that
    write the copy's card."""
    import shutil

    from hirope_lsp.model.loading import DEFAULT_MODEL_DIR

    model = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, model)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / file_name).write_text(text)
    return model, corpus
