"""Choosing the far bias on held-out code: the table is the perplexity the evaluation computes, the choice
is its argmin (ties to the smaller bias), and ``--write`` reaches the engine through the model card."""

import json
import math
import shutil
from pathlib import Path

import pytest
from tiny_models import tiny_model
from transformers import AutoTokenizer

from hirope_lsp import cli
from hirope_lsp.research import evaluate
from hirope_lsp.model.loading import DEFAULT_MODEL_DIR, load_model, recommended_far_bias
from hirope_lsp.research import far_calibrate as fc

TRAIN = 32  # the tiny model's trained length: 16x = 512 tokens, 32x = 1,024
MULTIPLES = (16, 32)
WINDOWS = 2
GRID = "0,2,8,log:1"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random llama with the default model's tokenizer, saved as a model directory with a card."""
    out = tmp_path_factory.mktemp("tiny-model")
    tokenizer = AutoTokenizer.from_pretrained(str(DEFAULT_MODEL_DIR))
    model = tiny_model("llama", train_length=TRAIN, vocab_size=len(tokenizer), initializer_range=0.3, seed=1)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "training.json").write_text(json.dumps({"languages": ["python"], "fim_order": "spm"}))
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Synthetic files whose names recur far apart, and one real source file, about 3,000 tokens in all
    (fewer than the evaluation's file picking asks for, so every file is read in both code paths)."""
    root = tmp_path_factory.mktemp("corpus")
    for k in range(3):
        body = "".join(f"def helper_{k}_{i}(value, scale={i}):\n    total = value * scale + {k}\n"
                       f"    return total - helper_{k}_{max(0, i - 7)}(value)\n\n\n" for i in range(24))
        (root / f"synthetic_{k}.py").write_text(f'"""Synthetic module {k}."""\n\nLIMIT_{k} = {k + 3}\n\n\n{body}')
    shutil.copyfile(Path(fc.__file__).parent / "bits.py", root / "bits.py")
    return root


@pytest.fixture(scope="module")
def result(model_dir, corpus):
    loaded = load_model(str(model_dir), device="cpu", dtype="float32")
    return fc.calibrate_far_bias(loaded, fc.source_files(corpus), multiples=MULTIPLES, windows=WINDOWS, grid=GRID)


def test_table_holds_every_setting_and_truncation_on_the_same_windows(result, corpus):
    assert result["corpus"] == corpus.name and result["train_length"] == TRAIN and result["files"] == 4
    assert [r["setting"] for r in result["table"]] == ["constant:0", "constant:2", "constant:8", "log:1"]
    assert result["multiples"] == [16.0, 32.0] and result["missing_multiples"] == []
    for row in result["table"] + [result["truncate"]]:
        assert set(row["by_multiple"]) == {"16", "32"}
        tokens = 0
        for x, cell in row["by_multiple"].items():
            assert cell["windows"] == WINDOWS and cell["length"] == int(float(x) * TRAIN)
            assert cell["tokens"] == WINDOWS * TRAIN, "the last trained-length tokens of each window"
            assert cell["min"] - 1e-9 <= cell["ppl"] <= cell["max"] + 1e-9 and cell["std"] >= 0
            tokens += cell["tokens"]
        # the overall figure: exp of the mean NLL over every scored token of every multiple
        logs = [math.log(c["ppl"]) * c["tokens"] for c in row["by_multiple"].values()]
        assert math.isclose(row["ppl"], math.exp(sum(logs) / tokens), rel_tol=1e-9)
    ppls = {r["setting"]: r["ppl"] for r in result["table"]}
    assert len(set(ppls.values())) == len(ppls), "the bias changes the perplexity"
    assert all(r["ppl"] != result["truncate"]["ppl"] for r in result["table"])
    json.dumps(result, allow_nan=False)  # JSON as it is (no split without tokens in this table)


def test_zero_bias_row_is_plain_hirope_perplexity(result, model_dir, corpus):
    """The b = 0 row against ``eval perplexity``'s hirope method (its own loading, windows and loop)."""
    report = evaluate.eval_perplexity([corpus], str(model_dir), ("hirope", "truncate"), MULTIPLES, WINDOWS, seed=0)
    plain = {f"{r['x']:g}": r["ppl_last"] for r in report["results"] if r["method"] == "hirope"}
    zero = next(r for r in result["table"] if r["value"] == 0)
    assert set(plain) == set(zero["by_multiple"])
    for x, ppl in plain.items():
        assert math.isclose(zero["by_multiple"][x]["ppl"], ppl, rel_tol=1e-5), x
    assert result["chosen"]["plain_hirope_ppl"] == zero["ppl"]


def test_nested_calibration_scores_what_nested_eval_perplexity_scores(model_dir, corpus):
    """``--nested``: every multiple scores the same last tokens; its b = 0 row is ``eval perplexity
    --nested``'s hirope, and a distance-mode row is there beside it."""
    loaded = load_model(str(model_dir), device="cpu", dtype="float32")
    result = fc.calibrate_far_bias(loaded, fc.source_files(corpus), multiples=MULTIPLES, windows=WINDOWS,
                                   grid="distance:1", nested=True)
    assert result["nested"] and "the same tokens at every length" in result["measure"]
    assert [r["setting"] for r in result["table"]] == ["constant:0", "distance:1"]
    report = evaluate.eval_perplexity([corpus], str(model_dir), ("hirope",), MULTIPLES, WINDOWS, seed=0, nested=True)
    plain = {f"{r['x']:g}": r["ppl_last"] for r in report["results"] if r["method"] == "hirope"}
    zero = result["table"][0]["by_multiple"]
    assert set(plain) == set(zero) == {"16", "32"}
    for x, ppl in plain.items():
        assert math.isclose(zero[x]["ppl"], ppl, rel_tol=1e-5), x
    assert result["table"][1]["ppl"] != result["table"][0]["ppl"]


def test_the_choice_is_the_argmin_and_ties_go_to_the_smaller_bias(result):
    best = min(result["table"], key=lambda r: r["ppl"])
    chosen = result["chosen"]
    assert (chosen["mode"], chosen["value"], chosen["ppl"]) == (best["mode"], best["value"], best["ppl"])
    assert chosen["truncate_ppl"] == result["truncate"]["ppl"]
    assert chosen["beats_truncate"] == (best["ppl"] < result["truncate"]["ppl"])
    table = [{"setting": s, "mode": m, "value": v, "ppl": p} for s, m, v, p in
             [("constant:4", "constant", 4.0, 10.0), ("constant:2", "constant", 2.0, 10.0),
              ("log:2", "log", 2.0, 10.0), ("constant:8", "constant", 8.0, 9.5), ("constant:0", "constant", 0, 11.0)]]
    assert fc.choose(table)["setting"] == "constant:8"
    table[3]["ppl"] = 10.0
    assert fc.choose(table)["setting"] == "constant:2", "a tie: the smaller bias, the constant mode first"
    table[3]["ppl"] = float("nan")
    assert fc.choose(table)["setting"] == "constant:2"


def test_grid_parsing():
    assert [s.label for s in fc.parse_grid("2, log:0, log:1.5, 2")] == ["constant:0", "constant:2", "log:1.5"]
    assert [s.label for s in fc.parse_grid(fc.DEFAULT_GRID)] == ["constant:0", "constant:1", "constant:2",
                                                                 "constant:4", "constant:8", "log:0.5", "log:1",
                                                                 "log:1.5", "distance:0.75", "distance:1",
                                                                 "distance:1.25"]
    with pytest.raises(ValueError):
        fc.parse_grid("-1")
    with pytest.raises(ValueError):
        fc.parse_grid([(1.0, "sqrt")])
    assert [s.label for s in fc.parse_grid("log:0/0.5/1, 1/1, log:0/0")] == ["constant:0", "log:0/0.5/1", "constant:1"], \
        "one value per layer; the same for every layer is the uniform setting"
    assert fc.parse_grid([((0.5, 1.0), "log")])[1].value == (0.5, 1.0)
    assert [s.label for s in fc.parse_grid("distance:0, distance:1")] == ["constant:0", "distance:1"]
    with pytest.raises(ValueError):
        fc.parse_grid("1/-1")


def test_per_layer_pass_keeps_a_layer_change_only_where_it_lowers_the_perplexity():
    """A known perplexity surface: each layer has its own best value; one pass finds it coordinate-wise."""
    best_of_layer = (0.0, 1.5, 1.0)  # with b = 1 and factors (0, 0.5, 1.5, 2)
    asked = []

    def measure(settings):
        asked.append([s.label for s in settings])
        rows = []
        for setting in settings:
            value = setting.value if isinstance(setting.value, tuple) else (setting.value,) * 3
            rows.append({"setting": setting.label, "mode": setting.mode,
                         "value": list(value) if isinstance(setting.value, tuple) else setting.value,
                         "ppl": 10 + sum((v - b) ** 2 for v, b in zip(value, best_of_layer))})
        return rows

    start = fc.Setting(1.0, "log")
    rows = fc.refine_per_layer(measure, start, 11.25, 3)
    assert len(asked) == 3 and all(len(a) == 4 for a in asked), "each layer: the four other values"
    assert asked[0][0] == "log:0/1/1" and asked[1][0] == "log:0/0/1", "layer 1 tried with layer 0's keeper"
    chosen = fc.choose([{"setting": start.label, "mode": "log", "value": 1.0, "ppl": 11.25}] + rows)
    assert chosen["value"] == [0.0, 1.5, 1.0] and chosen["ppl"] == 10
    assert fc.refine_per_layer(measure, fc.Setting(0.0), 11.0, 3) == [], "nothing to refine from plain HiRoPE"
    tie = [{"setting": "log:1", "mode": "log", "value": 1.0, "ppl": 10.0},
           {"setting": "log:0.5/1/1", "mode": "log", "value": [0.5, 1.0, 1.0], "ppl": 10.0}]
    assert fc.choose(tie)["setting"] == "log:1", "a tie goes to the uniform setting"


def test_per_layer_calibration_on_a_model_writes_a_card_the_engine_uses(model_dir, corpus, tmp_path):
    from hirope_lsp.model.patch import attach

    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    loaded = load_model(str(model), device="cpu", dtype="float32")
    layers = loaded[0].config.num_hidden_layers
    result = fc.calibrate_far_bias(loaded, fc.source_files(corpus), multiples=(16,), windows=WINDOWS, grid="2",
                                   per_layer=True, layer_factors=(0.0, 2.0))
    assert len(result["table"]) == 2 + 2 * layers, "b = 0 and 2, then two values for each layer"
    per_layer = [r for r in result["table"] if isinstance(r["value"], list)]
    assert per_layer and all(len(r["value"]) == layers for r in per_layer)
    assert result["chosen"]["ppl"] == min(r["ppl"] for r in result["table"])
    json.dumps(result, allow_nan=False)
    fc.write_far_bias(model, {**result, "chosen": {**result["chosen"], "value": [0.0] + [2.0] * (layers - 1),
                                                   "mode": "log"}})
    lm, _, _ = load_model(str(model), device="cpu", dtype="float32")
    assert recommended_far_bias(lm) == ((0.0,) + (2.0,) * (layers - 1), "log")
    handle = attach(lm)
    try:
        assert handle.cfg.far_bias == (0.0,) + (2.0,) * (layers - 1)
    finally:
        handle.detach()


def test_cli_prints_the_table_and_write_round_trips(model_dir, corpus, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    loaded, _, _ = load_model(str(model), device="cpu", dtype="float32")
    assert recommended_far_bias(loaded) is None, "nothing recorded yet"
    argv = ["calibrate", "far-bias", "--model", str(model), "--corpus", str(corpus), "--multiples", "16", "32",
            "--windows", str(WINDOWS), "--grid", GRID, "--json", str(tmp_path / "cal.json")]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    for word in ("truncate", "constant:0", "constant:2", "constant:8", "log:1", "16x (512)", "32x (1024)", "vs truncate", "chosen:"):
        assert word in out, word
    assert "far_bias" not in json.loads((model / "training.json").read_text()), "no --write, no record"
    assert cli.main(argv + ["--write"]) == 0
    assert "recorded far_bias" in capsys.readouterr().out
    card = json.loads((model / "training.json").read_text())
    assert card["languages"] == ["python"] and card["fim_order"] == "spm", "the card's other keys kept"
    record = card["far_bias"]
    result = json.loads((tmp_path / "cal.json").read_text())
    assert (record["value"], record["mode"]) == (result["chosen"]["value"], result["chosen"]["mode"])
    assert record["chosen_on"] == corpus.name and record["multiples"] == [16, 32] and record["windows"] == WINDOWS
    assert [r["setting"] for r in record["table"]] == ["constant:0", "constant:2", "constant:8", "log:1", "truncate"]
    assert record["table"][-1]["16x"]["ppl"] == result["truncate"]["by_multiple"]["16"]["ppl"]
    lm, _, _ = load_model(str(model), device="cpu", dtype="float32")
    assert recommended_far_bias(lm) == (float(record["value"]), record["mode"])


def test_recommended_far_bias_ignores_bad_records(model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    lm, _, _ = load_model(str(model), device="cpu", dtype="float32")
    card = model / "training.json"
    for record, expected in [({"value": 2, "mode": "log"}, (2.0, "log")), ({"value": 3.5}, (3.5, "constant")),
                             ({"value": -1, "mode": "constant"}, None), ({"value": "2"}, None),
                             ({"value": 2, "mode": "sqrt"}, None), ({"value": True}, None), (4, None),
                             ({"value": [0, 1.5], "mode": "log"}, ((0.0, 1.5), "log")), ({"value": [1, -1]}, None),
                             ({"value": []}, None), ({"value": [1, "2"]}, None),
                             ({"value": [0, 1.5, 3]}, None)]:  # one value per layer or none at all
        card.write_text(json.dumps({"far_bias": record}))
        assert recommended_far_bias(lm) == expected, record
    card.write_text("{not json")
    assert recommended_far_bias(lm) is None
    card.unlink()
    assert recommended_far_bias(lm) is None


def test_cli_refuses_what_it_cannot_do(tmp_path, capsys):
    assert cli.main(["calibrate", "far-bias", "--model", str(tmp_path / "none"), "--write"]) == 2
    assert cli.main(["calibrate", "far-bias", "--corpus", str(tmp_path / "none")]) == 2
    assert cli.main(["calibrate", "far-bias", "--grid", "sqrt:2"]) == 2
    assert "hirope-lsp:" in capsys.readouterr().err
