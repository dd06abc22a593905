"""Models named by hub id, as users name them, resolved offline from a HuggingFace cache."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from hirope_lsp.model.loading import DEFAULT_MODEL_DIR

HUB_ID = "Qwen/Qwen2.5-Coder-1.5B"  # a dot in the name, as most code models have


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf") / "hub"
    repo = cache / ("models--" + HUB_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / ("0" * 40)
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    Qwen2ForCausalLM(config).save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    return cache


def _complete(tmp_path, cache, *args):
    source = tmp_path / "m.py"
    source.write_text("def add(a, b):\n    return a\n")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "hirope_lsp", "complete", str(source), "--line", "1",
                           "--character", "12", "--max-new-tokens", "4", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_a_hub_id_with_a_dot_loads_from_the_cache_with_downloads_off(tmp_path, hub_cache):
    run = _complete(tmp_path, hub_cache, "--model", HUB_ID)
    assert run.returncode == 0, run.stderr
    assert "does not exist" not in run.stderr
    assert "prompt" in run.stderr.splitlines()[-1]


def test_a_hub_id_missing_from_the_cache_says_so_and_how_to_allow_the_download(tmp_path, hub_cache):
    run = _complete(tmp_path, hub_cache, "--model", "Qwen/Qwen2.5-Coder-7B")
    assert run.returncode == 2
    assert "not in the HuggingFace cache" in run.stderr and "allowDownload" in run.stderr


def test_a_missing_local_directory_is_named_as_one(tmp_path, hub_cache):
    run = _complete(tmp_path, hub_cache, "--model", str(Path(tmp_path) / "no-such-model"))
    assert run.returncode == 2 and "does not exist" in run.stderr
