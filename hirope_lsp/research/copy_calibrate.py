"""Choose a model's copy model on held-out code and record it with the model.

``hirope-lsp calibrate copy`` runs next-line completion (``eval completion``, HiRoPE, the gate off) on a
corpus used for choosing settings, never the one quality is reported on, with the copy model off and at
each weight of a grid, and keeps the weight with the highest edit similarity when it beats off by at least
``--min-gain`` points (else off: weight 0).  ``--write`` records it in the model directory's
``training.json`` under ``copy``, which the server uses when ``copyWeight`` / ``copyMinOrder`` are unset.
A confidence gate chosen before is stale after the choice changes: calibrate it again (the copy model
raises the probability of what it copies).  ``--language L`` records the choice for documents of that
language only (``copy.languages.L``; the record's own weight stays every other language's): a weight chosen
on Python code can hurt JavaScript or Go.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

CARD_KEY = "copy"
DEFAULT_GRID = "0.3/1,0.5/1,0.8/1"


def choose_copy(report: dict, min_gain: float) -> dict:
    """The best row of an ``eval completion`` report whose first row has the copy model off."""
    rows = report["results"]
    off = rows[0]
    best = max(rows[1:], key=lambda r: r["edit_similarity"], default=off)
    if best["edit_similarity"] - off["edit_similarity"] < min_gain:
        best = off
    return {"chosen": best, "off": off, "rows": rows}


def card_record(choice: dict, copies: dict, corpus: str, report: dict, seed: int, min_gain: float) -> dict:
    chosen, off = choice["chosen"], choice["off"]
    settings = copies[chosen["method"]]  # every row of the report is one of the copy models tried
    return {"weight": settings.weight, "min_order": settings.min_order,
            "chosen_on": corpus, "rule": f"highest next-line edit similarity, at least {min_gain:g} above off",
            "edit_similarity": chosen["edit_similarity"], "edit_similarity_off": off["edit_similarity"],
            "grid": {r["method"]: round(r["edit_similarity"], 2) for r in choice["rows"]},
            "samples": chosen["samples"], "prompt_tokens": report["prompt_tokens"], "seed": seed,
            "calibrated": time.strftime("%Y-%m-%d")}


def register_cli(subparsers) -> None:
    from .far_calibrate import add_language_flag

    p = subparsers.add_parser("copy", help="choose the copy model's weight for a model on held-out code (the "
                                           "corpus settings are chosen on, never the one reported)")
    p.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    p.add_argument("--corpus", type=Path, required=True, help="held-out code for choosing settings")
    p.add_argument("--grid", default=DEFAULT_GRID, help="copy models to try, WEIGHT/MIN_ORDER comma-separated")
    p.add_argument("--min-gain", type=float, default=0.5, help="edit similarity points a weight must add over off")
    p.add_argument("--samples", type=int, default=160)
    p.add_argument("--max-files", type=int, default=300, help="draw the lines from at most this many files")
    p.add_argument("--prompt-x", type=int, default=4, help="prompt length as a multiple of the training length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the report and the choice here")
    p.add_argument("--write", action="store_true", help="record the choice in the model directory's training.json")
    add_language_flag(p)


def run_cli(args) -> int:
    from ..model.copying import CopySettings, parse_copies
    from .evaluate import copy_label, eval_completion
    from .far_calibrate import calibration_target, known_language, write_card_entry

    model_dir = calibration_target(args, [args.corpus])
    if model_dir is None or not known_language(args.language):
        return 2
    try:
        grid = parse_copies(args.grid)
    except ValueError as err:
        print(f"hirope-lsp: {err}", file=sys.stderr)
        return 2
    off = CopySettings()
    report = eval_completion([args.corpus], args.model, ("hirope",), args.prompt_x, args.samples, args.seed,
                             max_files=args.max_files, copies=(off, *grid), plain=False)
    copies = {copy_label("hirope", c): c for c in (off, *grid)}
    choice = choose_copy(report, args.min_gain)
    for row in choice["rows"]:
        mark = "  <- chosen" if row is choice["chosen"] else ""
        print(f"{row['method']:<22}EM {100 * row['exact_match']:5.1f}  ES {row['edit_similarity']:5.1f}{mark}")
    if args.json:
        args.json.write_text(json.dumps({"completion": report, "chosen": choice["chosen"]["method"]}, indent=2))
    if args.write:
        record = card_record(choice, copies, args.corpus.name, report, args.seed, args.min_gain)
        print(f"recorded in {write_card_entry(model_dir, CARD_KEY, record, args.language)}")
    return 0
