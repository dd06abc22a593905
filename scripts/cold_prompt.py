"""A cold prompt on the embedded model, in-process: prompt build, prefill and 8 new tokens, nothing cached.

    python scripts/cold_prompt.py THREADS [BUDGET]     # BUDGET 4800 gives a ~4,000-token prompt

Issue 17's "a cold 4,000-token prompt under 1.5 s on these 2 cores" is this figure; the server runs torch
on its one inference thread with torch's default intra-op threads (the machine's cores)."""

import statistics
import sys
import time

import torch

from hirope_lsp.completion.prompt import ContextSettings
from hirope_lsp.completion.service import CompletionService
from hirope_lsp.config import Settings
from hirope_lsp.hierarchy.document import Document
from hirope_lsp.model.engine import Engine
from hirope_lsp.research.bench import _typing_file

threads = int(sys.argv[1])
budget = int(sys.argv[2]) if len(sys.argv) > 2 else 4800
torch.set_num_threads(threads)
settings = Settings(context=ContextSettings(budget_tokens=budget, cross_file=False), max_new_tokens=8)
engine = Engine(settings.engine)
service = CompletionService.from_settings(engine, None, settings)
text, _ = _typing_file(budget)
line = 1200
character = len(text.split("\n")[line])
doc = Document("file:///w/cold.py", text, language_id="python")
totals = []
for _ in range(5):
    engine.pool.clear()
    start = time.perf_counter()
    job = service.prepare(doc, line, character)
    prepared = time.perf_counter()
    result = service.run(job)
    done = time.perf_counter()
    totals.append(done - start)
    print(f"{len(job.prompt.token_ids)} prompt tokens, {result.generation.computed_tokens} computed: prepare "
          f"{(prepared - start) * 1000:.0f} ms, prefill and decode {(done - prepared) * 1000:.0f} ms", flush=True)
print(f"threads {threads}: median {statistics.median(totals) * 1000:.0f} ms over {len(totals)} cold requests")
