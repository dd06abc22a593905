"""Prefill and decoding-step cost of two far-bias settings on the embedded model, in one process and one
thread, the settings alternating round by round so that the machine's drift weighs on both alike.

    .venv/bin/python scripts/far_bias_cost.py [--tokens 3320] [--rounds 12] \
        [--baseline log:0.75] [--candidate distance:1]
"""
import argparse
import dataclasses
import inspect
import statistics
import time

import torch
from transformers import DynamicCache

from hirope_lsp.model.loading import load_model
from hirope_lsp.model.patch import attach
from hirope_lsp.model.rope import RopeMethodConfig, fixed_unit_positions

DECODE_STEPS = 8


def setting(text: str) -> RopeMethodConfig:
    mode, bias = text.split(":")
    return RopeMethodConfig(far_bias=float(bias), far_bias_mode=mode)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=3320, help="prompt tokens (of the standard library's argparse.py)")
    p.add_argument("--rounds", type=int, default=12, help="rounds of both settings; the first two warm up")
    p.add_argument("--baseline", default="log:0.75")
    p.add_argument("--candidate", default="distance:1")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    lm, tokenizer, _ = load_model(None, device="cpu", dtype="float32")
    ids = torch.tensor([tokenizer(open(inspect.getsourcefile(argparse)).read())["input_ids"]])
    length = args.tokens
    if ids.shape[1] < length + DECODE_STEPS:
        raise SystemExit(f"argparse.py has {ids.shape[1]} tokens; ask for at most {ids.shape[1] - DECODE_STEPS}")
    positions = fixed_unit_positions(length + DECODE_STEPS, 128)
    settings = {"baseline": setting(args.baseline), "candidate": setting(args.candidate)}
    handle = attach(lm, settings["baseline"])

    def run(name):
        handle.cfg = dataclasses.replace(handle.cfg, far_bias=settings[name].far_bias,
                                         far_bias_mode=settings[name].far_bias_mode)
        cache = DynamicCache()
        start = time.perf_counter()
        handle.forward(ids[:, :length], positions[:, :length], cache, logits_to_keep=1)
        prefilled = time.perf_counter()
        for k in range(DECODE_STEPS):
            handle.forward(ids[:, length + k : length + k + 1], positions[:, : length + k + 1], cache, logits_to_keep=1)
        return prefilled - start, (time.perf_counter() - prefilled) / DECODE_STEPS

    times = {name: [] for name in settings}
    for r in range(args.rounds):
        for name in (("baseline", "candidate") if r % 2 == 0 else ("candidate", "baseline")):
            times[name].append(run(name))
    medians = {name: [statistics.median(t[i] for t in v[2:]) for i in (0, 1)] for name, v in times.items()}
    for name, (prefill, step) in medians.items():
        print(f"{name} ({getattr(args, name)}): prefill median {prefill:.3f} s, decoding step median {1000 * step:.2f} ms")
    (bp, bs), (cp, cs) = medians["baseline"], medians["candidate"]
    print(f"candidate / baseline: prefill {cp / bp:.3f}x, decoding step {cs / bs:.3f}x ({length} prompt tokens)")


if __name__ == "__main__":
    main()
