"""Choose a model's confidence gate on held-out code and record it with the model.

``hirope-lsp calibrate confidence`` runs next-line completion (``eval completion``, HiRoPE, the gate off)
on a corpus used for choosing settings, never the one quality is reported on, and picks the highest
threshold on the mean log-probability per token that still shows a given share (default 80 %) of the
useful suggestions (edit similarity >= 0.5 to the true line); the wrong ones (below 0.5) it hides are the
gain.  ``--write`` records it in the model directory's ``training.json`` under ``min_confidence``, which
the server uses when the ``minConfidence`` setting is left unset; with ``--language L`` only for documents
of that language (``min_confidence.languages.L``).  The suggestions are made as the server makes them, with
the card's copy model for the corpus's language: calibrate the copy model first.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

CARD_KEY = "min_confidence"
USEFUL = 0.5  # edit similarity from which a suggestion saves typing (accepted, then corrected)
DEFAULT_KEEP_USEFUL = 0.8
THRESHOLDS = tuple(-3.0 + 0.125 * k for k in range(23))  # -3.0 .. -0.25


def gate_table(predictions: list[dict], thresholds=THRESHOLDS) -> tuple[list[dict], int, int]:
    """For each threshold: the share of useful suggestions still shown and of wrong ones hidden."""
    shown = [p for p in predictions if p["predicted"] and p["confidence"] is not None]
    useful = [p for p in shown if p["edit_similarity"] >= USEFUL]
    wrong = [p for p in shown if p["edit_similarity"] < USEFUL]
    rows = []
    for t in sorted(thresholds):
        kept = [p for p in shown if p["confidence"] >= t]
        rows.append({"threshold": t,
                     "useful_kept": sum(p["confidence"] >= t for p in useful) / max(1, len(useful)),
                     "wrong_hidden": sum(p["confidence"] < t for p in wrong) / max(1, len(wrong)),
                     "shown": len(kept) / max(1, len(shown)),
                     "edit_similarity_shown": 100 * sum(p["edit_similarity"] for p in kept) / max(1, len(kept))})
    return rows, len(useful), len(wrong)


def gate_summary(predictions: list[dict], thresholds=THRESHOLDS) -> dict:
    """What each threshold would do to these predictions (``eval completion`` reports it with the gate off)."""
    rows, useful, wrong = gate_table(predictions, thresholds)
    return {"useful": useful, "wrong": wrong, "table": rows}


def choose_gate(predictions: list[dict], keep_useful: float = DEFAULT_KEEP_USEFUL, thresholds=THRESHOLDS) -> dict:
    """The highest threshold that shows at least ``keep_useful`` of the useful suggestions."""
    rows, useful, wrong = gate_table(predictions, thresholds)
    if useful == 0:
        raise ValueError("no useful suggestion among the predictions: nothing to choose a gate by")
    passing = [r for r in rows if r["useful_kept"] >= keep_useful]
    if not passing:
        raise ValueError(f"no threshold from {min(thresholds)} up shows {keep_useful:.0%} of the useful suggestions")
    return {"chosen": max(passing, key=lambda r: r["threshold"]), "keep_useful": keep_useful,
            "useful": useful, "wrong": wrong, "table": rows}


def card_record(choice: dict, corpus: str, samples: int, prompt_tokens: int, seed: int) -> dict:
    chosen = choice["chosen"]
    return {"value": chosen["threshold"], "chosen_on": corpus, "rule": f"highest threshold showing >= "
            f"{choice['keep_useful']:.0%} of useful suggestions (edit similarity >= {USEFUL})",
            "useful_kept": chosen["useful_kept"], "wrong_hidden": chosen["wrong_hidden"], "shown": chosen["shown"],
            "useful": choice["useful"], "wrong": choice["wrong"], "samples": samples,
            "prompt_tokens": prompt_tokens, "seed": seed, "calibrated": time.strftime("%Y-%m-%d")}


def format_table(choice: dict) -> str:
    lines = [f"{'gate':>7}{'useful shown':>14}{'wrong hidden':>14}{'shown':>8}{'ES shown':>10}"]
    for r in choice["table"]:
        mark = "  <- chosen" if r is choice["chosen"] else ""
        lines.append(f"{r['threshold']:>7.3f}{r['useful_kept']:>14.0%}{r['wrong_hidden']:>14.0%}{r['shown']:>8.0%}"
                     f"{r['edit_similarity_shown']:>10.1f}{mark}")
    lines.append(f"{choice['useful']} useful and {choice['wrong']} wrong suggestions shown without a gate")
    return "\n".join(lines)


def register_cli(subparsers) -> None:
    from .far_calibrate import add_language_flag

    p = subparsers.add_parser("confidence", help="choose the confidence gate for a model on held-out code (the "
                                                 "corpus settings are chosen on, never the one reported)")
    p.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    p.add_argument("--corpus", type=Path, required=True, help="held-out code for choosing settings")
    p.add_argument("--samples", type=int, default=160)
    p.add_argument("--max-files", type=int, default=300, help="draw the lines from at most this many files")
    p.add_argument("--prompt-x", type=int, default=4, help="prompt length as a multiple of the training length")
    p.add_argument("--keep-useful", type=float, default=DEFAULT_KEEP_USEFUL,
                   help="the share of useful suggestions the gate must still show")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the predictions and the table here")
    p.add_argument("--write", action="store_true",
                   help="record the choice in the model directory's training.json (key min_confidence)")
    add_language_flag(p)


def run_cli(args) -> int:
    from .evaluate import eval_completion
    from .far_calibrate import calibration_target, known_language, write_card_entry

    model_dir = calibration_target(args, [args.corpus])
    if model_dir is None or not known_language(args.language):
        return 2
    if not 0 < args.keep_useful <= 1:
        print("hirope-lsp: --keep-useful is a share in (0, 1]", file=sys.stderr)
        return 2
    report = eval_completion([args.corpus], args.model, ("hirope",), args.prompt_x, args.samples, args.seed,
                             max_files=args.max_files)
    row = report["results"][0]
    try:
        choice = choose_gate(row["predictions"], args.keep_useful)
    except ValueError as err:
        print(f"hirope-lsp: {err}", file=sys.stderr)
        return 2
    print(format_table(choice))
    if args.json:
        args.json.write_text(json.dumps({"completion": report, "choice": choice}, indent=2))
    if args.write:
        record = card_record(choice, args.corpus.name, row["samples"], report["prompt_tokens"], args.seed)
        print(f"recorded in {write_card_entry(model_dir, CARD_KEY, record, args.language)}")
    return 0
