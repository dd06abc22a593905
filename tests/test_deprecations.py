"""No transformers deprecation from our calls: the suite's warning filter (pyproject.toml) turns one into
an error, the KV path hands the cache over by the name the installed transformers takes, and the
README's completion command prints no deprecation."""

import inspect
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from transformers import DynamicCache
from transformers.utils import deprecation

from hirope_lsp.model.patch import attach, cache_keyword
from hirope_lsp.model.rope import RopeMethodConfig
from tiny_models import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def test_the_filter_fails_a_test_on_a_transformers_deprecated_keyword():
    # transformers' own decorator, so the filter is checked against the installed release's wording
    @deprecation.deprecate_kwarg("old_name", version="99.0.0", new_name="new_name")
    def renamed(new_name=None):
        return new_name

    with pytest.raises(FutureWarning, match="is deprecated and will be removed in version 99.0.0"):
        renamed(old_name=1)
    assert renamed(new_name=2) == 2  # the current name passes quietly


def test_the_filter_fails_a_test_on_a_transformers_deprecated_attribute():
    deprecate_attr = getattr(deprecation, "deprecate_attr", None)
    if deprecate_attr is None:
        pytest.skip(f"transformers {transformers.__version__} has no deprecate_attr")
    getter = deprecate_attr(__name__, rename={"OldThing": (DynamicCache, "99.0.0")})
    with pytest.raises(FutureWarning, match="is deprecated and will be removed in version 99.0.0"):
        getter("OldThing")


@pytest.mark.parametrize("method", ["hirope", "rope"])
def test_the_kv_path_passes_the_cache_by_its_current_name(method):
    model = tiny_model("llama")
    handle = attach(model, RopeMethodConfig(method=method, window=8))
    takes = cache_keyword(model)
    assert takes == ("cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values")
    ids = torch.randint(0, 97, (1, 12))
    positions = torch.stack([torch.zeros(12, dtype=torch.long), torch.arange(12)], dim=-1)[None]
    cache = DynamicCache(config=model.config)
    with warnings.catch_warnings(record=True) as caught, torch.inference_mode():
        warnings.simplefilter("always")
        handle.forward(ids[:, :10], positions[:, :10], cache=cache, use_cache=True)
        handle.forward(ids[:, 10:11], positions[:, :11], past_key_values=cache, use_cache=True)  # older name
        handle.forward(ids[:, 11:12], positions[:, :12], cache, use_cache=True)
    said = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not said, f"transformers {transformers.__version__} warned: {said}"
    assert cache.get_seq_length() == 12, f"the model did not use the cache handed over as {takes}="
    with pytest.raises(TypeError, match="not both"):
        handle.forward(ids[:, :1], positions[:, :1], cache=DynamicCache(), past_key_values=DynamicCache())
    handle.detach()


def test_the_readme_completion_prints_no_deprecation():
    run = subprocess.run([sys.executable, "-W", "always::FutureWarning", "-W", "always::DeprecationWarning",
                          "-m", "hirope_lsp", "complete", "examples/geometry.py", "--line", "13", "--character", "34",
                          "--min-confidence", "-100"],  # the README's command
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip(), "the completion printed nothing"
    noted = [line for line in run.stderr.splitlines()
             if "deprecated" in line.lower() or "FutureWarning" in line or "DeprecationWarning" in line]
    assert not noted, "\n".join(noted)
