"""What each model shape costs on this machine: the inference budget a shape must fit, and the
training tokens per parameter the CPU can give it (issue 17's "recipe sized to the compute").

    python scripts/recipe_tradeoff.py inference [--shapes 4x256,6x256,...] [--contexts 512,1024] [--json F]  # 2 threads
    python scripts/recipe_tradeoff.py training  [--shapes ...] [--contexts 512,1024] [--json F]  # 1 thread

Shapes are LAYERSxWIDTH: heads of 64, MLP 2.75 x width (the shipped 6x256 has 704), the shipped
tokenizer and model card, random weights (what a shape costs does not depend on what it learned).
``inference``: a cold ~4,000-token prompt (prompt build, prefill, 8 new tokens; issue 17's < 1.5 s)
and a keystroke after it (one character typed, the prompt's KV state reused, 8 new tokens; what
``bench typing`` measures per request), in-process, medians. ``training``: the recipe's step
(forward, backward, clip, AdamW) on random tokens, batches of 16 x 513 tokens or the same token
count at another context, in tokens per second. Every row's ratio is against 6x256 trained at 512 in the
same run; the inference phase runs as the server does (two threads), the training phase on one.
"""

import argparse
import dataclasses
import functools
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_DIR = Path(__file__).resolve().parents[1] / "hirope_lsp" / "model" / "default"
SHIPPED = "6x256"


def parse_shape(text: str) -> tuple[int, int]:
    layers, width = (int(v) for v in text.lower().split("x"))
    if width % 64:
        raise SystemExit(f"width {width} is not a multiple of the 64-wide heads")
    return layers, width


@functools.cache
def shipped_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEFAULT_DIR)


def llama_config(layers: int, width: int, context: int = 512):
    """The recipe's model configuration (``train.model_config``) at this shape, for the shipped tokenizer."""
    from hirope_lsp.research.train import TrainConfig, model_config

    recipe = TrainConfig(layers=layers, hidden_size=width, heads=width // 64,
                         intermediate_size=round(2.75 * width / 64) * 64, context=context)
    return model_config(recipe, shipped_tokenizer())


def random_model_dir(layers: int, width: int, root: Path, context: int = 512) -> Path:
    """The shipped model directory with this shape's random weights (tokenizer and card kept), trained
    length ``context`` (HiRoPE's window is half of it)."""
    from transformers import LlamaForCausalLM

    out = root / f"{layers}x{width}@{context}"
    out.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "training.json", "generation_config.json"):
        if (DEFAULT_DIR / name).exists():
            shutil.copy(DEFAULT_DIR / name, out / name)
    torch.manual_seed(0)
    LlamaForCausalLM(llama_config(layers, width, context)).save_pretrained(out)
    return out


def parameters(layers: int, width: int) -> int:
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(llama_config(layers, width)).parameters())


def inference_row(model_dir: Path, budget: int, rounds: int) -> dict:
    from hirope_lsp.completion.prompt import ContextSettings
    from hirope_lsp.completion.service import CompletionService
    from hirope_lsp.config import Settings
    from hirope_lsp.hierarchy.document import Document
    from hirope_lsp.model.engine import Engine
    from hirope_lsp.research.bench import _typing_file

    settings = Settings(context=ContextSettings(budget_tokens=budget, cross_file=False), max_new_tokens=8)
    engine = Engine(dataclasses.replace(settings.engine, model=str(model_dir), measure_speed=False))
    service = CompletionService.from_settings(engine, None, settings)
    text, _ = _typing_file(budget)
    line = 1200  # the line scripts/cold_prompt.py times: a ~4,000-token prompt at the default budget
    character = len(text.split("\n")[line])
    cold, keystroke, prompt_tokens = [], [], 0
    for round_ in range(rounds + 1):  # the first round warms torch up and is not counted
        engine.pool.clear()
        doc = Document("file:///w/tradeoff.py", text, language_id="python")
        start = time.perf_counter()
        job = service.prepare(doc, line, character)
        service.run(job)
        if round_:
            cold.append(time.perf_counter() - start)
        prompt_tokens = len(job.prompt.token_ids)
        for typed in "xy":  # two keystrokes on the warm state; the second is the one counted
            doc = doc.with_insertion(doc.offset_at(line, character)[0], typed)
            character += 1
            start = time.perf_counter()
            service.run(service.prepare(doc, line, character))
            elapsed = time.perf_counter() - start
        if round_:
            keystroke.append(elapsed)
        character -= 2
    return {"prompt_tokens": prompt_tokens, "cold_s": statistics.median(cold),
            "keystroke_ms": statistics.median(keystroke) * 1000}


def training_row(layers: int, width: int, context: int, steps: int) -> dict:
    from transformers import LlamaForCausalLM

    from hirope_lsp.research.train import TrainConfig, make_optimizer, train_step

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(layers, width, context))
    model.train()
    optimizer = make_optimizer(model, TrainConfig(lr=1e-4))
    batch_size = max(1, 16 * 513 // (context + 1))
    batch = torch.randint(0, model.config.vocab_size, (batch_size, context + 1))
    times = []
    for i in range(steps + 2):  # two warm-up steps not counted
        start = time.perf_counter()
        train_step(model, optimizer, batch)
        if i >= 2:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    return {"context": context, "batch": batch_size, "step_s": step_s, "tokens_per_s": batch.numel() / step_s}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("phase", choices=("inference", "training"))
    p.add_argument("--shapes", default="4x256,6x256,8x256,6x320,6x384,8x384")
    p.add_argument("--contexts", default="512,1024", help="trained lengths (512, the shipped one, is always in)")
    p.add_argument("--budget", type=int, default=4800, help="prompt budget (4,800 gives ~4,000 tokens)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="timed training steps per row")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    shapes = [s.strip() for s in args.shapes.split(",")]
    if SHIPPED not in shapes:
        shapes.insert(0, SHIPPED)
    torch.set_num_threads(2 if args.phase == "inference" else 1)
    rows = []
    contexts = [int(c) for c in args.contexts.split(",")]
    if 512 not in contexts:
        contexts.insert(0, 512)
    with tempfile.TemporaryDirectory() as tmp:
        for shape in shapes:
            layers, width = parse_shape(shape)
            base = {"shape": shape, "parameters": parameters(layers, width)}
            for context in contexts:
                if args.phase == "inference":
                    model_dir = random_model_dir(layers, width, Path(tmp), context)
                    rows.append({**base, "context": context, **inference_row(model_dir, args.budget, args.rounds)})
                    r = rows[-1]
                    print(f"{shape:>7} {r['parameters'] / 1e6:6.2f} M, trained length {context}: "
                          f"{r['prompt_tokens']} tokens cold {r['cold_s']:.2f} s, keystroke {r['keystroke_ms']:.0f} ms",
                          flush=True)
                else:
                    rows.append({**base, **training_row(layers, width, context, args.steps)})
                    r = rows[-1]
                    print(f"{shape:>7} {r['parameters'] / 1e6:6.2f} M, context {context}: "
                          f"{r['tokens_per_s']:.0f} tok/s ({r['step_s']:.2f} s a step of {r['batch']})", flush=True)
    keys = ("cold_s", "keystroke_ms") if args.phase == "inference" else ("tokens_per_s",)
    ref = next(b for b in rows if b["shape"] == SHIPPED and b["context"] == 512)
    for r in rows:
        for key in keys:
            r[f"{key}_vs_shipped"] = r[key] / ref[key]
        if args.phase == "training":  # what 100 hours of one thread give this shape
            r["tokens_per_parameter_100h"] = r["tokens_per_s"] * 360_000 / r["parameters"]
    print(json.dumps(rows, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"phase": args.phase, "threads": torch.get_num_threads(), "rows": rows},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
