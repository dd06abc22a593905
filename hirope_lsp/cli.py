"""Command line: ``hirope-lsp [serve|complete|eval|bench|train|corpus|calibrate] ...`` (no command serves stdio)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train the default model by the project's recipe (resumable)")
    p.add_argument("--run-dir", type=Path, default=Path("runs/default"))
    p.add_argument("--steps", type=int, default=None,
                   help="total steps (a new run: 3,000; a resumed run: its saved length unless given)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (resumably) after this long")
    p.add_argument("--export", type=Path, default=None, help="write a HuggingFace model directory here at the end")
    p.add_argument("--tiny", action="store_true", help="a tiny configuration for smoke tests")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--curve", type=Path, default=None, help="save the loss curve (PNG) at the end")
    p.add_argument("--corpus", type=Path, default=None,
                   help="a corpus directory from `hirope-lsp corpus build` (default: the standard library)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default=None,
                   help="where to train (default cpu; not kept with the run); cuda runs the forward in bf16 autocast")
    p.add_argument("--init-from", type=Path, default=None,
                   help="start from fp16 weights (best.safetensors) or a model directory of the same shape")
    for name, kind in (("context", int), ("vocab-size", int), ("batch-size", int), ("lr", float), ("warmup", int),
                       ("checkpoint-every", int), ("layers", int), ("hidden-size", int), ("heads", int),
                       ("intermediate-size", int), ("cycle-start", int)):
        p.add_argument(f"--{name}", type=kind, default=None,
                       help="recipe override (see TrainConfig); resuming a run directory applies --lr, --warmup, "
                            "--cycle-start, --checkpoint-every and refuses a shape or corpus that differs")


def _add_corpus(sub) -> None:
    p = sub.add_parser("corpus", help="build the training corpus (fetches packages by name from the registries)")
    csub = p.add_subparsers(dest="corpus_command", required=True)
    b = csub.add_parser("build", help="fetch, filter, deduplicate; write documents.jsonl, held_out/, manifest.json")
    b.add_argument("--out", type=Path, default=Path("corpus"))
    b.add_argument("--manifest-copy", type=Path, default=None, help="also copy the manifest here (docs/)")
    b.add_argument("--held-out-only", action="store_true",
                   help="fetch only the held-out packages into OUT/held_out/ (for evaluations; no training data)")
    b.add_argument("--allow-missing", action="store_true",
                   help="build without the sources this machine cannot read (a Debian source package not installed, "
                        "a package not served) instead of stopping; the manifest lists them")


def _run_corpus(args) -> int:
    import shutil

    from .research.corpus import MissingSources, build_corpus

    try:
        manifest = build_corpus(args.out, held_out_only=args.held_out_only, allow_missing=args.allow_missing)
    except MissingSources as e:
        print(f"hirope-lsp corpus build: {e}", file=sys.stderr)
        return 2
    for what in manifest["missing"]:
        print(f"left out: {what}", file=sys.stderr)
    if args.held_out_only:
        for entry in manifest["held_out_packages"]:
            print(f"{entry['language']}:{entry['package']} {entry['version']}: {entry['files']} files")
        return 0
    if args.manifest_copy:
        shutil.copyfile(args.out / "manifest.json", args.manifest_copy)
    print(json.dumps({"totals": manifest["totals"], "dropped": manifest["dropped"]}, indent=2))
    return 0


def _run_train(args) -> int:
    import torch

    from .research.train import TrainConfig, train

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig()
    if args.tiny:
        cfg = TrainConfig(vocab_size=400, hidden_size=32, layers=1, heads=2, intermediate_size=64, context=32,
                          batch_size=4, steps=20, warmup=2, checkpoint_every=10, held_out_percent=10,
                          max_files=60)
    cfg.max_minutes = args.max_minutes
    given = []  # what a resumed run applies (schedule) or refuses where it differs (shape, data)
    for name in ("steps", "corpus", "device", "context", "vocab_size", "batch_size", "lr", "warmup",
                 "checkpoint_every", "layers", "hidden_size", "heads", "intermediate_size", "cycle_start"):
        if getattr(args, name) is not None:
            value = getattr(args, name)
            setattr(cfg, name, str(value) if name == "corpus" else value)
            given.append(name)
    summary = train(args.run_dir, cfg, export=args.export, init_from=args.init_from, given=given)
    print(json.dumps(summary, indent=2))
    if args.curve:
        from .research.train import plot_loss_curve

        plot_loss_curve(args.run_dir, args.curve)
    return 0


def _far_bias(text: str) -> float | list[float]:
    """``--far-bias``: a number, or numbers separated by commas (one per layer)."""
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or a comma-separated list of numbers, got {text!r}")
    return values[0] if len(values) == 1 else values


FAR_BIAS_MODES = ("constant", "log", "distance")  # as in model/rope.py, which the parser does not import (torch)


def _copy_settings(text: str) -> tuple:
    from .model.copying import parse_copies

    try:
        return parse_copies(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_far_bias(p) -> None:
    p.add_argument("--far-bias", type=_far_bias, default=None,
                   help="prior against far keys, subtracted from the score of every key beyond the window "
                        "(0: plain HiRoPE; default: RopeMethodConfig's); a comma-separated list: one per layer")
    p.add_argument("--far-bias-mode", default=None, choices=list(FAR_BIAS_MODES),
                   help="constant: the bias as given; log: bias x log(max(1, far keys / window)), growing with context; "
                        "distance: bias x log(1 + distance / window), each key's own")


def _far_bias_options(args) -> dict:
    """The far-bias flags given (as RopeMethodConfig fields); the defaults stay where none is."""
    return {name: getattr(args, name) for name in ("far_bias", "far_bias_mode") if getattr(args, name) is not None}


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks that print figures")
    bsub = p.add_subparsers(dest="bench", required=True)
    a = bsub.add_parser("attention", help="HiRoPE vs plain RoPE forward time and peak memory by length")
    a.add_argument("--lengths", default="1024,4096,8192,16384")
    a.add_argument("--repeats", type=int, default=2)
    a.add_argument("--device", default="cpu")
    a.add_argument("--query-chunk", type=int, default=256)
    a.add_argument("--rounds", type=int, default=2, help="rope and hirope processes alternate this many times")
    a.add_argument("--json", type=Path, default=None)
    _add_far_bias(a)
    t = bsub.add_parser("typing", help="replay typing against the real server, reuse on and off")
    t.add_argument("--keystrokes", type=int, default=40)
    t.add_argument("--budget", type=int, default=4000)
    t.add_argument("--max-new-tokens", type=int, default=8)
    t.add_argument("--rounds", type=int, default=2,
                   help="blocks of keys per row, the rows in turn and in reverse every other round")
    t.add_argument("--json", type=Path, default=None)
    t.add_argument("--model", default=None, help="a model directory or hub id (default: the embedded model)")
    _add_far_bias(t)
    k = bsub.add_parser("soak", help="one long session: memory and latency over many requests")
    k.add_argument("--requests", type=int, default=10000)
    k.add_argument("--report-every", type=int, default=500)
    k.add_argument("--cache-budget-mb", type=int, default=64)
    k.add_argument("--warm-ahead", choices=("on", "off"), default="on",
                   help="off: no work ahead, to see what it costs the same session")
    k.add_argument("--pause-every", type=int, default=0,
                   help="rest after every N requests (default: never), so that work ahead runs too")
    k.add_argument("--pause-ms", type=float, default=500, help="how long each rest is")
    k.add_argument("--gate", choices=("on", "off"), default="on", help="off: every suggestion is shown")
    k.add_argument("--json", type=Path, default=None)
    _add_far_bias(k)
    r = bsub.add_parser("replay", help="open, type, accept, jump and switch with editor pauses: time from the "
                                       "pause to the suggestion, work ahead on and off")
    r.add_argument("--files", type=int, default=6)
    r.add_argument("--target-ms", type=float, default=150)
    r.add_argument("--budget", type=int, default=4096)
    r.add_argument("--latency-target-ms", type=int, default=400)
    r.add_argument("--model", default=None, help="a model directory or hub id (default: the embedded model)")
    r.add_argument("--big", action="store_true", help="also a random model of Qwen2.5-Coder-0.5B's shape")
    r.add_argument("--big-files", type=int, default=2)
    r.add_argument("--json", type=Path, default=None)
    h = bsub.add_parser("hierarchy", help="per-keystroke hierarchy update time and workspace indexing")
    h.add_argument("--lines", type=int, default=10000)
    h.add_argument("--keystrokes", type=int, default=300)
    h.add_argument("--index-root", type=Path, default=None, help="directory to index (default: the standard library)")
    h.add_argument("--json", type=Path, default=None)


def _run_bench(args) -> int:
    if args.bench == "attention":
        from .research.bench import bench_attention

        result = bench_attention([int(x) for x in args.lengths.split(",")], repeats=args.repeats, device=args.device,
                                 query_chunk=args.query_chunk, rounds=args.rounds, **_far_bias_options(args))
    elif args.bench == "soak":
        from .research.bench import bench_soak

        result = bench_soak(args.requests, args.report_every, args.cache_budget_mb,
                            warm_ahead=args.warm_ahead == "on", pause_every=args.pause_every,
                            pause_s=args.pause_ms / 1000, gate=args.gate == "on", **_far_bias_options(args))
    elif args.bench == "typing":
        from .research.bench import bench_typing

        result = bench_typing(args.keystrokes, args.budget, max_new_tokens=args.max_new_tokens, model=args.model,
                              rounds=args.rounds, **_far_bias_options(args))
    elif args.bench == "replay":
        from .research.replay import bench_replay

        result = bench_replay(args.files, args.target_ms, args.budget, args.latency_target_ms, args.model, args.big,
                              args.big_files)
    else:
        from .research.bench import bench_hierarchy

        result = bench_hierarchy(lines=args.lines, keystrokes=args.keystrokes, index_root=args.index_root)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="long-context evaluation: perplexity and next-line completion by method")
    esub = p.add_subparsers(dest="eval", required=True)
    for name in ("perplexity", "completion"):
        e = esub.add_parser(name)
        e.add_argument("--data", type=Path, action="append", default=None,
                       help="held-out code: a directory or files (repeatable; default: transformers' llama sources)")
        e.add_argument("--model", default=None)
        e.add_argument("--json", type=Path, default=None)
        e.add_argument("--seed", type=int, default=0)
        e.add_argument("--window", type=int, default=None)
        e.add_argument("--split", type=float, default=None)
        e.add_argument("--token-index", default="global", choices=["global", "restart"])
        e.add_argument("--unit-size", type=int, default=128, help="hirope-fixed: a unit every this many tokens")
        _add_far_bias(e)
        e.add_argument("--quick", action="store_true", help="a smoke-test setting (seconds)")
    perplexity = esub.choices["perplexity"]
    perplexity.add_argument("--methods", default="all", help="comma-separated, or all (every position method and truncate)")
    perplexity.add_argument("--lengths-x", default="1,4,16,32", help="multiples of the training length")
    perplexity.add_argument("--windows", type=int, default=4, help="windows per length")
    perplexity.add_argument("--plot", type=Path, default=None)
    from .hierarchy.units import UNIT_GRAINS

    perplexity.add_argument("--units", default=UNIT_GRAINS[0], choices=UNIT_GRAINS,
                            help="what a syntax unit is for hierarchical methods: the run of one innermost "
                                 "definition, the whole top-level run (a class with its methods), or one line")
    perplexity.add_argument("--nested", action="store_true",
                            help="every length's windows are the last tokens of the longest length's: the same "
                                 "last tokens scored with more context before them (ppl_last); default: windows "
                                 "drawn per length")
    perplexity.add_argument("--copy", default="", type=_copy_settings,
                            help="copy models to mix in, each a row per method: WEIGHT/MIN_ORDER, comma-separated "
                                 "(0.3/2: up to 30 %% of the mixture from what followed the last 2+ tokens before)")
    completion = esub.choices["completion"]
    completion.add_argument("--methods", default="hirope,truncate,rope,rerope,hirope-fixed")
    completion.add_argument("--prompt-x", type=int, default=4, help="prompt length as a multiple of the training length")
    completion.add_argument("--samples", type=int, default=40)
    completion.add_argument("--copy", default="", type=_copy_settings, help="as for perplexity: a row per copy model")
    completion.add_argument("--max-files", type=int, default=None,
                            help="draw the lines from at most this many files (by the seed): for large packages")
    completion.add_argument("--copy-document", choices=("on", "off"), default=None,
                            help="the copy model also reads the file beyond the prompt, or only the prompt (the "
                                 "copyDocument setting; default: the server's, on)")
    completion.add_argument("--workspace", action="store_true",
                            help="the --data folders are the workspace: the server's cross-file context in the prompt "
                                 "(without it: none, LCC's task)")
    completion.add_argument("--indented", action="store_true",
                            help="the cursor after the line's indentation, as an editor that indents leaves it (default: "
                                 "at the line's start); a suggestion that indents again loses its edit similarity")
    completion.add_argument("--copy-workspace", choices=("on", "off"), default=None,
                            help="with --workspace: the copy model also reads the neighbouring files (the "
                                 "copyWorkspace setting; default: the server's)")
    from .research.far_eval import register_cli

    register_cli(esub)


def _run_eval(args) -> int:
    if args.eval == "far":
        from .research.far_eval import run_cli

        return run_cli(args)
    from .research import evaluate
    from .model.rope import RopeMethodConfig

    base = RopeMethodConfig(window=args.window, split=args.split, token_index=args.token_index,
                            unit_size=args.unit_size, **_far_bias_options(args))
    try:
        base.validate()
    except ValueError as err:
        print(f"hirope-lsp: {err}", file=sys.stderr)
        return 2
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if methods == ("all",):
        methods = evaluate.all_methods()
    unknown = [m for m in methods if m not in evaluate.all_methods()]
    if unknown:
        print(f"hirope-lsp: unknown methods {unknown}; choose from {', '.join(evaluate.all_methods())}", file=sys.stderr)
        return 2
    if args.eval == "perplexity":
        lengths = (1, 2) if args.quick else tuple(float(x) for x in args.lengths_x.split(","))
        report = evaluate.eval_perplexity(args.data, args.model, methods, lengths, 1 if args.quick else args.windows,
                                          args.seed, base, units=args.units, copies=args.copy, nested=args.nested)
        evaluate.print_table(report, "ppl")
        evaluate.print_table(report, "ppl_last")
        if args.plot:
            evaluate.plot(report, args.plot)
    else:
        report = evaluate.eval_completion(args.data, args.model, methods, 2 if args.quick else args.prompt_x,
                                          4 if args.quick else args.samples, args.seed, base,
                                          max_files=args.max_files, copies=args.copy,
                                          copy_document=None if args.copy_document is None else args.copy_document == "on",
                                          workspace=args.workspace,
                                          copy_workspace=None if args.copy_workspace is None else args.copy_workspace == "on",
                                          indented=args.indented)
        print(f"next-line completion, prompts of {report['prompt_tokens']} tokens (trained on {report['train_length']})")
        print(f"{'method':<14}{'prompt':>8}{'EM':>8}{'ES':>8}{'ES far':>8}")
        for r in report["results"]:
            print(f"{r['method']:<14}{r['prompt_tokens']:>8}{r['exact_match']:>8.3f}{r['edit_similarity']:>8.1f}"
                  f"{r['edit_similarity_far']:>8.1f}")
    evaluate.save(report, args.json)
    return 0


def _add_calibrate(sub) -> None:
    p = sub.add_parser("calibrate", help="choose a model's settings on held-out code and record them with the model")
    csub = p.add_subparsers(dest="calibrate", required=True)
    from .research import confidence_calibrate, copy_calibrate, far_calibrate

    far_calibrate.register_cli(csub)
    confidence_calibrate.register_cli(csub)
    copy_calibrate.register_cli(csub)


def _run_calibrate(args) -> int:
    if args.calibrate == "confidence":
        from .research.confidence_calibrate import run_cli

        return run_cli(args)
    if args.calibrate == "copy":
        from .research.copy_calibrate import run_cli

        return run_cli(args)
    from .research.far_calibrate import run_cli

    return run_cli(args)


def _add_model_options(p) -> None:
    p.add_argument("--model", default=None, help="model directory or hub id (default: the embedded model)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code")
    p.add_argument("--allow-download", action="store_true", help="fetch a hub model id that is not cached")
    from .model.methods import method_names

    p.add_argument("--method", default="hirope", choices=method_names(), help="position method")
    p.add_argument("--budget", type=int, default=None, help="prompt budget in tokens")
    _add_far_bias(p)
    p.add_argument("--copy", type=_copy_settings, default=None, metavar="WEIGHT/MIN_ORDER",
                   help="the copy model mixed into decoding (0.8/1; 0 turns it off; default: the model card's)")


def _settings_from(args):
    from .config import Settings

    settings = Settings()
    settings.engine.model = args.model
    settings.engine.device = args.device
    settings.engine.dtype = args.dtype
    settings.engine.trust_remote_code = args.trust_remote_code
    settings.engine.allow_download = args.allow_download
    settings.engine.rope.method = args.method
    for name, value in _far_bias_options(args).items():
        setattr(settings.engine.rope, name, value)
    if args.budget:
        settings.context.budget_tokens = args.budget
    if args.copy:
        if len(args.copy) != 1:
            raise SystemExit("hirope-lsp: --copy takes one copy model here (WEIGHT/MIN_ORDER)")
        settings.engine.copy_weight, settings.engine.copy_min_order = args.copy[0].weight, args.copy[0].min_order
    settings.engine.rope.validate()
    return settings


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="run the language server (stdio unless --tcp)")
    p.add_argument("--tcp", default=None, metavar="HOST:PORT")
    _add_model_options(p)


def _run_serve(args) -> int:
    from .server import serve

    serve(args.tcp, _settings_from(args))
    return 0


def _add_complete(sub) -> None:
    p = sub.add_parser("complete", help="print the completion at a point of a file")
    p.add_argument("file", type=Path)
    p.add_argument("--line", type=int, required=True, help="0-based line")
    p.add_argument("--character", type=int, required=True, help="0-based column (UTF-16 units, as LSP)")
    p.add_argument("--workspace", type=Path, default=None, help="folder for cross-file context (default: the file's)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--multiline", default="auto", choices=["auto", "always", "never"])
    p.add_argument("--min-confidence", type=float, default=None,
                   help="hide a suggestion whose mean log-probability per token is below this (default: the gate "
                        "recorded with the model; -100 shows all)")
    _add_model_options(p)


def _run_complete(args) -> int:
    """One suggestion through the same session the server runs (no work ahead: one request, full prompt)."""
    import asyncio

    from .hierarchy.languages import language_for_path
    from .session import Session

    path = args.file.resolve()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        print(f"hirope-lsp: cannot read {args.file}: {err}", file=sys.stderr)
        return 2
    settings = _settings_from(args)
    settings.max_new_tokens, settings.multiline = args.max_new_tokens, args.multiline
    settings.watch_files, settings.warm_ahead, settings.type_along = False, False, False
    if args.min_confidence is not None:
        if not args.min_confidence <= 0:
            print("hirope-lsp: --min-confidence is a mean log-probability: 0 or below", file=sys.stderr)
            return 2
        settings.min_confidence = args.min_confidence

    async def complete():
        session = Session(settings)
        session.add_folders([(args.workspace or path.parent).resolve().as_uri()])
        indexed = session.start()
        try:
            await session.ready_service()
            await indexed
            session.open(path.as_uri(), text, 0, language_for_path(path), "utf-16")
            return session, await session.complete(path.as_uri(), args.line, args.character)
        finally:
            session.shutdown()

    try:
        session, found = asyncio.run(complete())
    except (RuntimeError, ValueError) as err:
        print(f"hirope-lsp: {err}", file=sys.stderr)
        return 2
    print(found.text if found else "")
    if found is not None:
        gate = session.service.confidence_gate(language_for_path(path))
        if found.hidden_by_gate:
            print(f"hirope-lsp: nothing shown: the suggestion's confidence {found.confidence:.2f} is below the "
                  f"gate {gate:g} (--min-confidence -100 shows all)", file=sys.stderr)
        gate_text = "no gate" if gate is None else f"gate {gate:g}"
        confidence = "" if found.confidence is None else f", confidence {found.confidence:.2f} ({gate_text})"
        print(f"[{session.service.engine.description}; prompt {found.prompt_tokens} tokens, {found.ms:.0f} ms"
              f"{confidence}]", file=sys.stderr)
    return 0


COMMANDS = {"serve": (_add_serve, _run_serve), "complete": (_add_complete, _run_complete), "eval": (_add_eval, _run_eval),
            "train": (_add_train, _run_train), "corpus": (_add_corpus, _run_corpus), "bench": (_add_bench, _run_bench),
            "calibrate": (_add_calibrate, _run_calibrate)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hirope-lsp", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command")
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv or ["serve"])
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        logging.getLogger("pygls").setLevel(logging.WARNING)
    _, run = COMMANDS[args.command]
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
