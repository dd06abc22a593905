"""The GPU training run prepared here: packed into a folder small enough to travel, unpacked and run
with no corpus beside it (on the CPU here; on a lent GPU the same code runs with device cuda)."""

import json

import numpy as np
import torch
from safetensors.torch import load_file

from hirope_lsp.research import gpu_run
from hirope_lsp.research import train as train_module
from hirope_lsp.research.train import TrainConfig, held_out_windows, train
from tiny_models import TINY_RECIPE as TINY


def test_a_slice_of_the_stream_keeps_each_languages_share_spread_over_its_segment():
    stream = np.arange(100_000, dtype=np.int32)  # each token is its own position
    segments = {"go": (0, 10_000), "python": (10_000, 100_000)}
    part, parts = gpu_run.stream_slice(stream, segments, {"python": 0.5, "go": 0.5, "rust": 0.1}, 8_000, -1)
    (ga, gb), (pa, pb) = parts["go"], parts["python"]
    assert set(parts) == {"go", "python"} and gb == pa and pb == len(part)
    assert abs((gb - ga) - 4_000) <= 128 and abs((pb - pa) - 4_000) <= 128
    python = part[pa:pb][part[pa:pb] != -1]
    assert python.min() < 12_000 and python.max() > 98_000, "pieces from all over the segment"
    assert set(part[ga:gb][part[ga:gb] != -1]) <= set(range(10_000))


def test_a_packed_run_trains_without_its_corpus_and_brings_back_its_best_weights(tmp_path, monkeypatch):
    source = tmp_path / "cpu_run"
    train(source, TrainConfig(**TINY, steps=5))

    def no_sources(cfg):
        raise AssertionError("the packed run read a corpus")

    loaded = []
    load_weights = train_module.load_weights
    monkeypatch.setattr(train_module, "_sources", no_sources)
    monkeypatch.setattr(train_module, "load_weights", lambda model, path: (loaded.append(path), load_weights(model, path)))
    packed = tmp_path / "pack"
    info = gpu_run.pack(source, packed, tokens=20_000, start=source / "best.safetensors")
    assert 0 < info["tokens"] <= 20_000 + gpu_run.PIECES_PER_LANGUAGE
    recipe = json.loads((packed / "train_config.json").read_text())
    assert recipe["device"] == "cuda" and recipe["batch_size"] == gpu_run.GPU_RECIPE["batch_size"]
    assert recipe["hidden_size"] == 32 and recipe["corpus"] is None  # the model's shape, nothing to read beside
    held = torch.load(packed / "held_out.pt")
    assert held == held_out_windows(torch.load(source / "held_out.pt"), 32, TrainConfig().held_out_windows)
    out = tmp_path / "out"
    summary = gpu_run.run(packed, tmp_path / "gpu_run", out, minutes=0.1, device="cpu")
    assert summary["device"] == "cpu" and summary["planned_steps"] >= recipe["warmup"] + 1
    assert loaded == [packed / "start.safetensors"], "the real run starts from the packed weights"
    weights = load_file(str(out / "best.safetensors"))
    assert all(t.dtype == torch.float16 for t in weights.values())
    steps = [json.loads(line)["step"] for line in (out / "loss.jsonl").read_text().splitlines()]
    assert steps[0] == 1, "a schedule of its own, from the packed weights"
    assert json.loads((out / "best.json").read_text())["step"] <= max(steps)


def test_a_run_stopped_by_its_time_limit_keeps_the_best_weights_of_its_last_steps(tmp_path):
    run = tmp_path / "run"
    train(run, TrainConfig(**TINY, steps=3))  # measured at its last step
    train(run, TrainConfig(**{**TINY, "checkpoint_every": 100}, steps=50, max_minutes=0.02), given=("steps",))
    log = [json.loads(line) for line in (run / "loss.jsonl").read_text().splitlines()]
    last = log[-1]
    assert "held_out_loss" in last and last["step"] > 3 and last["step"] % 100, "measured where it stopped"
    best = json.loads((run / "best.json").read_text())
    assert best["step"] == last["step"] or best["held_out_loss"] <= last["held_out_loss"]


def test_the_schedule_is_sized_by_the_probes_steps_not_its_set_up(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_config.json").write_text(json.dumps({}))

    def fake_train(run_dir, cfg):  # 30 s of set-up, then 0.02 s a step
        (run_dir / "loss.jsonl").write_text("".join(
            json.dumps({"step": k, "loss": 1.0, "s": 30 + 0.02 * k}) + "\n" for k in range(1, cfg.steps + 1)))

    monkeypatch.setattr(gpu_run, "train", fake_train)
    assert gpu_run.steps_for(run, TrainConfig(warmup=10), minutes=1.0) == int(60 * 0.9 / 0.02)
    assert not (tmp_path / "run-probe").exists()
