"""Benchmarks that print figures (never timing asserts).

Each attention measurement runs in a fresh child process so that its peak
memory (max RSS on CPU, max allocated on CUDA) belongs to it alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time


def _bench_model(device: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=dtype).to(device).eval()


def _attention_child(method: str, length: int, repeats: int, device: str) -> dict:
    import resource

    import torch

    from .model.patch import attach
    from .model.rope import RopeMethodConfig, fixed_unit_positions

    torch.set_grad_enabled(False)
    model = _bench_model(device)
    ids = torch.randint(0, 4096, (1, length), device=device)
    positions = fixed_unit_positions(length, 128)
    handle = attach(model, RopeMethodConfig(method=method, window=128, split=0.4))
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        start = time.perf_counter()
        # logits of the last token only, as a completion server needs
        handle.forward(ids, positions, logits_to_keep=1)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    return {"method": method, "length": length, "seconds": min(times[1:]), "peak_mib": round(peak, 1)}


def bench_attention(lengths: list[int], repeats: int = 2, device: str = "cpu") -> dict:
    rows = []
    print(f"{'length':>7} {'rope s':>8} {'hirope s':>9} {'time x':>7} {'rope MiB':>9} {'hirope MiB':>11}")
    for length in lengths:
        row = {"length": length}
        for method in ("rope", "hirope"):
            out = subprocess.run(
                [sys.executable, "-m", "hirope_lsp.bench", "attention-child", method, str(length), str(repeats), device],
                capture_output=True, text=True, check=True,
            )
            result = json.loads(out.stdout.strip().splitlines()[-1])
            row[f"{method}_seconds"] = result["seconds"]
            row[f"{method}_peak_mib"] = result["peak_mib"]
        row["time_ratio"] = row["hirope_seconds"] / row["rope_seconds"]
        rows.append(row)
        print(f"{length:>7} {row['rope_seconds']:>8.3f} {row['hirope_seconds']:>9.3f} {row['time_ratio']:>7.2f} "
              f"{row['rope_peak_mib']:>9.1f} {row['hirope_peak_mib']:>11.1f}", flush=True)
    return {"device": device, "model": "llama 4x256, 4 heads of 64, window 128, 128-token units", "rows": rows}


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "attention-child":
        method, length, repeats, device = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
        print(json.dumps(_attention_child(method, length, repeats, device)))
