import json
import math
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hirope_lsp.research import evaluate
from hirope_lsp.model.loading import DEFAULT_MODEL_DIR
from hirope_lsp.model.rope import RopeMethodConfig
from hirope_lsp.research.train import TrainConfig, learning_rate, train
from tiny_models import TINY_RECIPE as TINY


def test_training_smoke_loss_falls_resumes_and_exports(tmp_path):
    run = tmp_path / "run"
    first = train(run, TrainConfig(**TINY, steps=10))
    log = [json.loads(line) for line in (run / "loss.jsonl").read_text().splitlines()]
    assert first["step"] == 10 and len(log) == 10
    assert sum(r["loss"] for r in log[-3:]) < sum(r["loss"] for r in log[:3]), "the loss falls"
    export = tmp_path / "export"
    second = train(run, TrainConfig(**TINY, steps=15), export=export, given=("steps",))
    log = [json.loads(line) for line in (run / "loss.jsonl").read_text().splitlines()]
    assert second["step"] == 15 and [r["step"] for r in log] == list(range(1, 16)), "resumed at step 10"
    model = AutoModelForCausalLM.from_pretrained(export)
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert model.config.max_position_embeddings == 32
    assert "<|fim_middle|>" in tokenizer.get_vocab()
    assert json.loads((export / "training.json").read_text())["fim_order"] == "spm"


def test_learning_rate_ramps_again_where_the_optimizer_starts_fresh():
    cfg = TrainConfig(lr=1e-3, warmup=50, steps=4000)
    assert learning_rate(cfg, 0) == 1e-3 / 50 and learning_rate(cfg, 49) == 1e-3, "a new run warms up to the peak"
    cosine = learning_rate(cfg, 3700)
    assert 1e-4 < cosine < 2e-4
    assert learning_rate(cfg, 3700, optimizer_fresh_at=3700) == cosine / 50
    assert learning_rate(cfg, 3749, optimizer_fresh_at=3700) == learning_rate(cfg, 3749)
    assert learning_rate(cfg, 4000) == learning_rate(cfg, 5000) == 1e-3 * 0.1
    restart = TrainConfig(lr=4e-4, warmup=50, steps=5000, cycle_start=4000)  # a second cycle after the first
    assert math.isclose(learning_rate(restart, 4000, optimizer_fresh_at=4000), 4e-4 / 50)
    assert math.isclose(learning_rate(restart, 4050, optimizer_fresh_at=4000), 4e-4), "the peak of the new cycle"
    assert math.isclose(learning_rate(restart, 4525, optimizer_fresh_at=4000), 4e-4 * 0.55)
    assert math.isclose(learning_rate(restart, 5000, optimizer_fresh_at=4000), 4e-4 * 0.1)


def test_resuming_applies_a_new_schedule_and_refuses_a_new_shape(tmp_path):
    import pytest

    run = tmp_path / "run"
    train(run, TrainConfig(**TINY, steps=6))
    unnamed = train(run, TrainConfig(**TINY, steps=3000))  # no flags given: the saved length too
    assert unnamed["step"] == 6 and json.loads((run / "train_config.json").read_text())["steps"] == 6
    plain = train(run, TrainConfig(**TINY, steps=8), given=("steps",))  # only the length given: the saved schedule goes on
    assert plain["step"] == 8
    saved = json.loads((run / "train_config.json").read_text())
    assert saved["lr"] == TINY.get("lr", TrainConfig().lr) and saved["cycle_start"] == 0
    cycle = TrainConfig(**{**TINY, "lr": 5e-4, "warmup": 2}, steps=12, cycle_start=8)
    train(run, TrainConfig(**{**asdict(cycle), "layers": 9, "lr": 1e-2}), given=("steps", "lr", "warmup", "cycle_start"))
    saved = json.loads((run / "train_config.json").read_text())
    assert (saved["lr"], saved["warmup"], saved["cycle_start"]) == (1e-2, 2, 8), "the command's schedule is applied"
    assert saved["layers"] == TINY.get("layers", TrainConfig().layers), "a shape not named in given is the run's"
    log = {r["step"]: r["lr"] for r in map(json.loads, (run / "loss.jsonl").read_text().splitlines()) if "lr" in r}
    assert math.isclose(log[9], 1e-2 / 2) and math.isclose(log[10], 1e-2), "the new cycle ramps up on kept Adam state"
    with pytest.raises(ValueError, match="layers"):
        train(run, TrainConfig(**{**TINY, "layers": TINY.get("layers", 1) + 1}, steps=14), given=("layers",))
    same_shape = train(run, TrainConfig(**TINY, steps=13), given=("layers", "steps"))
    assert same_shape["step"] == 13, "naming the shape the run already has is fine"


def test_training_from_committed_weights_warms_up_from_their_step(tmp_path):
    import shutil

    first = tmp_path / "first"
    train(first, TrainConfig(**TINY, steps=5))
    committed = tmp_path / "committed.safetensors"
    shutil.copyfile(first / "best.safetensors", committed)
    shutil.copyfile(first / "best.json", tmp_path / "committed.json")
    fresh = tmp_path / "fresh"
    shutil.copytree(first / "tokenizer", fresh / "tokenizer")
    cfg = TrainConfig(**{**TINY, "warmup": 4}, steps=12)
    train(fresh, cfg, init_from=committed)
    log = [json.loads(line) for line in (fresh / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(6, 13)), "continued at the committed step"
    assert [r["lr"] for r in log[:4]] == [learning_rate(cfg, s, optimizer_fresh_at=5) for s in range(5, 9)]
    assert log[0]["lr"] < log[1]["lr"] < log[2]["lr"] < log[3]["lr"], "ramped up, not restarted at full rate"
    checkpoint = torch.load(fresh / "checkpoint.pt", weights_only=False)
    assert checkpoint["optimizer_fresh_at"] == 5, "a resumed run keeps the ramp's origin"


def test_perplexity_evaluation_smoke(tmp_path):
    data = evaluate.default_eval_data()[0]
    report = evaluate.eval_perplexity([data], None, ("rope", "hirope", "truncate"), (1, 2), max_windows=2)
    assert {r["method"] for r in report["results"]} == {"rope", "hirope", "truncate"}
    for row in report["results"]:
        assert math.isfinite(row["ppl"]) and row["ppl"] > 1
        for key in ("ppl", "ppl_last"):  # windows of one length are equally long: the pooled figure is their mean
            assert len(row[key + "_windows"]) == row["windows"]
            assert min(row[key + "_windows"]) - 1e-6 <= row[key] <= max(row[key + "_windows"]) + 1e-6
    by = {(r["method"], r["x"]): r["ppl"] for r in report["results"]}
    assert abs(by[("rope", 1)] - by[("truncate", 1)]) < 1e-3, "within the trained length truncation changes nothing"
    evaluate.plot(report, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
    card = json.loads((DEFAULT_MODEL_DIR / "training.json").read_text())["far_bias"]
    assert (report["settings"]["far_bias"], report["settings"]["far_bias_mode"]) == (card["value"], card["mode"]), \
        "the report names the far bias it ran with: the card's where none was given"


def test_fixed_units_take_the_unit_size_given():
    data = evaluate.default_eval_data()[0]
    runs = {size: evaluate.eval_perplexity([data], None, ("hirope-fixed",), (2,), max_windows=1,
                                           base=RopeMethodConfig(unit_size=size)) for size in (64, 512)}
    assert [runs[size]["settings"]["unit_size"] for size in (64, 512)] == [64, 512]
    assert runs[64]["results"][0]["ppl"] != runs[512]["results"][0]["ppl"], "beyond the window the units differ"


def test_completion_evaluation_smoke():
    report = evaluate.eval_completion(None, None, ("hirope", "truncate"), prompt_x=2, count=2,
                                      base=RopeMethodConfig(far_bias=0.5, far_bias_mode="log"))
    assert [r["method"] for r in report["results"]] == ["hirope", "truncate"]
    assert (report["settings"]["far_bias"], report["settings"]["far_bias_mode"]) == (0.5, "log")
    assert all(0 <= r["edit_similarity"] <= 100 for r in report["results"])
    from hirope_lsp.research.confidence_calibrate import gate_table
    for r in report["results"]:  # the gate as the calibrator sees it: one definition of "useful"
        assert r["confidence_gate"]["table"] == gate_table(r["predictions"])[0]


def test_evaluations_take_a_folder_relative_to_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "shapes.py").write_text("".join(
        f"def area_{i}(width, height):\n    scaled = width * {i} + height\n    return scaled * scaled\n\n\n"
        for i in range(80)))
    monkeypatch.chdir(tmp_path)
    perplexity = evaluate.eval_perplexity([Path("pkg")], None, ("hirope",), (1,), max_windows=1)
    assert math.isfinite(perplexity["results"][0]["ppl"])
    completion = evaluate.eval_completion([Path("pkg")], None, ("hirope",), prompt_x=1, count=2, workspace=True)
    assert len(completion["results"][0]["predictions"]) == 2, "opened by URI, which a relative path has none of"


def test_edit_similarity():
    assert evaluate.levenshtein("kitten", "sitting") == 3
    assert evaluate.edit_similarity("abc", "abc") == 1.0
    assert evaluate.edit_similarity("", "abcd") == 0.0


def test_completion_samples_leave_out_comment_and_string_lines(tmp_path):
    from transformers import AutoTokenizer

    from hirope_lsp.model.loading import DEFAULT_MODEL_DIR

    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    body = "".join(f"function f{i}(a) {{\n  // note {i} about a\n  /* block {i} */\n   * doc line {i}\n"
                   f"  return computeValue{i}(a) + 1;\n}}\n" for i in range(200))
    (tmp_path / "m.js").write_text(body)
    samples = evaluate.completion_samples(tokenizer, [tmp_path / "m.js"], 256, 128, 50, seed=0)
    assert samples and all(s["target"].strip().startswith(("function", "return", "}")) for s in samples)


def test_completion_samples_split_far_names_and_cap_files(tmp_path):
    from transformers import AutoTokenizer

    from hirope_lsp.model.loading import DEFAULT_MODEL_DIR

    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    filler = "".join(f"value_{i} = compute({i}) + offset\n" for i in range(120))
    for k in range(6):
        (tmp_path / f"f{k}.py").write_text(f"farAwayName{k} = 1\n" + filler + f"result = farAwayName{k} + 2\n")
    files = sorted(tmp_path.glob("*.py"))
    samples = evaluate.completion_samples(tokenizer, files, 256, 128, 20, seed=0)
    far = [s for s in samples if s["far"]]
    assert far and all(s["target"].startswith("result = farAwayName") for s in far)
    assert all(s["prompt"].endswith("\n") and s["target"] not in s["prompt"] for s in samples)
    capped = evaluate.completion_samples(tokenizer, files, 256, 128, 20, seed=0, max_files=2)
    assert len({s["file"] for s in capped}) == 2
    assert capped == evaluate.completion_samples(tokenizer, files, 256, 128, 20, seed=0, max_files=2)


def test_completion_in_a_workspace_copies_from_siblings_and_never_from_the_lines_own_file(tmp_path):
    body = "".join(f"def handler_{i}(request, store):\n    record = store.fetch_record_{i}(request.key_{i}, limit={i * 7})\n"
                   f"    return render_page_{i}(record, theme='slate_{i}')\n\n\n" for i in range(60))
    alone, twins = tmp_path / "alone", tmp_path / "twins"
    for folder in (alone, twins):
        (folder / "pkg").mkdir(parents=True)
        (folder / "pkg" / "views.py").write_text(body)
    (twins / "pkg" / "views_copy.py").write_text(body)
    em = {}
    for name, folder in (("alone", alone), ("twins", twins)):
        for copy in (False, True):
            report = evaluate.eval_completion([folder], None, ("hirope",), prompt_x=2, count=4, workspace=True,
                                              copy_workspace=copy)
            assert report["settings"]["workspace"] and report["settings"]["copy_workspace"] == copy
            em[name, copy] = [p["predicted"] for p in report["results"][0]["predictions"]]
    assert em["alone", True] == em["alone", False], "the line's own file on disk is never read"
    truth = [p["target"] for p in report["results"][0]["predictions"]]
    assert em["twins", True] == truth != em["twins", False], "a sibling holding the lines is copied from"


def test_nested_windows_end_on_the_same_tokens_at_every_length():
    from transformers import AutoTokenizer

    from hirope_lsp.model.loading import DEFAULT_MODEL_DIR

    tokenizer = AutoTokenizer.from_pretrained(str(DEFAULT_MODEL_DIR))
    files = evaluate.tokenize_files(tokenizer, evaluate.collect_files(evaluate.default_eval_data()))
    lengths = [64, 256, 1024]
    nested = evaluate.windows_by_length(files, lengths, 3, 0, None, nested=True)
    longest = nested[1024]
    assert len(longest) == 3
    for length in lengths:
        assert len(nested[length]) == len(longest)
        for (_, name, ids, keys), (_, long_name, long_ids, long_keys) in zip(nested[length], longest):
            assert name == long_name and len(ids) == length
            assert ids == long_ids[-length:] and keys == long_keys[-length:]
    drawn = evaluate.windows_by_length(files, lengths, 3, 0, None)
    assert drawn[64] == evaluate.make_windows(files, 64, 3, 0, None)
    assert drawn[64][0][2] != longest[0][2][-64:], "without nesting each length draws its own windows"
