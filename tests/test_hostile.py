"""Hostile and broken input below the protocol: deep nesting, huge text, out-of-memory."""

import torch

from hirope_lsp.completion.prompt import ContextSettings, PromptBuilder
from hirope_lsp.completion.service import CompletionService
from hirope_lsp.hierarchy.document import Change, Document
from hirope_lsp.model.engine import Engine, EngineSettings
from hirope_lsp.model.loading import load_model


def test_hundred_thousand_nested_brackets():
    text = "x = " + "[" * 100_000 + "]" * 100_000 + "\n"
    doc = Document("file:///w/deep.py", text, language_id="python")
    assert doc.units is not None
    doc.apply_changes([Change("y", ((0, 0), (0, 1)))], 2)
    assert doc.text.startswith("y = [[[") and doc.tree is not None


def test_huge_document_completes_with_bounded_prompt():
    loaded = load_model(None, device="cpu")
    engine = Engine(EngineSettings(), loaded=loaded)
    builder = PromptBuilder(loaded[1], loaded[2], ContextSettings(budget_tokens=256))
    service = CompletionService(engine, None, builder, max_new_tokens=2)
    text = "value = 1\n" * 1_000_000  # 10 MB, over the parse limit: plain text
    doc = Document("file:///w/big.py", text, language_id="python")
    assert doc.tree is None
    result = service.complete(doc, 500_000, 0)
    assert len(result.job.prompt.token_ids) <= 256


def test_out_of_memory_degrades_to_a_shorter_context(monkeypatch):
    loaded = load_model(None, device="cpu")
    engine = Engine(EngineSettings(), loaded=loaded)
    service = CompletionService(engine, None, PromptBuilder(loaded[1], loaded[2], ContextSettings(budget_tokens=400)),
                                max_new_tokens=2)
    doc = Document("file:///w/m.py", "def f(x):\n    return x + 1\n" * 40, language_id="python")
    real = engine.handle.forward
    calls = {"n": 0}

    def flaky(ids, positions, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(ids, positions, **kw)

    monkeypatch.setattr(engine.handle, "forward", flaky)
    job = service.prepare(doc, 80, 0)
    result = service.run(job)
    assert result.generation.computed_tokens <= len(job.prompt.token_ids) // 2 + 1


def test_remote_code_in_a_model_directory_is_never_run_unless_trusted(tmp_path):
    import json
    import shutil

    import pytest

    from hirope_lsp.model.loading import DEFAULT_MODEL_DIR, ModelLoadError

    model_dir = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL_DIR, model_dir)
    marker = tmp_path / "executed"
    (model_dir / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                       "from transformers import LlamaConfig\nclass EvilConfig(LlamaConfig):\n    pass\n")
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig"}
    config["model_type"] = "evil"
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError):
        load_model(str(model_dir), device="cpu")
    assert not marker.exists(), "no code from the model directory ran"
