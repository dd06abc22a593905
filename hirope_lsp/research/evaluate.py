"""Long-context evaluation: perplexity by context length, and LCC-style next-line completion,
for every position method on the same model and the same windows.

``truncate`` is the baseline shipping tools use: each token sees at most the model's training
length of context (a sliding window with stride ``L/2``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..hierarchy.document import Document
from ..hierarchy.languages import language_for_path
from ..hierarchy.positions import positions_from_unit_keys, token_unit_keys
from ..model.copying import CopyModel, CopySettings, mix_probability
from ..model.loading import load_model
from ..model.patch import attach, trained_length, with_model_far_bias
from ..model.methods import method_names, position_method
from ..model.rope import RopeMethodConfig, plain_positions
from ..completion.postprocess import PHRASE_LOOP, repeats_line_above
from ..completion.prompt import ContextSettings
from .confidence_calibrate import gate_summary
from .far_eval import TRUNCATE
from .train import read_text

log = logging.getLogger(__name__)

def all_methods() -> tuple[str, ...]:
    """What the evaluation compares: every registered position method and the truncation baseline."""
    return method_names() + (TRUNCATE,)


SOURCE_SUFFIXES = (".py", ".js", ".ts", ".go", ".rs", ".java", ".c", ".h", ".cpp", ".cc", ".hpp")


@dataclass
class TokenizedFile:
    path: Path
    ids: list[int]
    keys: list  # a unit key per token


EVAL_PACKAGES = ("models/llama", "models/mistral", "models/gpt2", "models/bert", "models/t5", "generation")


def default_eval_data() -> list[Path]:
    """Code never seen in training, present wherever hirope-lsp is installed: parts of transformers."""
    import transformers

    root = Path(transformers.__file__).parent
    return [root / p for p in EVAL_PACKAGES if (root / p).exists()]


def collect_files(data: list[Path]) -> list[Path]:
    """The source files of ``data``, absolute (documents are opened by URI, as an editor would)."""
    files: list[Path] = []
    for root in (Path(d).resolve() for d in data):
        if root.is_file():
            files.append(root)
        else:
            files.extend(sorted(p for p in root.rglob("*") if p.suffix in SOURCE_SUFFIXES and p.is_file()))
    return files


def tokenize_files(tokenizer, files: list[Path], units: str = "definition") -> list[TokenizedFile]:
    """Each file's tokens and their unit keys at the grain ``units`` (see ``token_unit_keys``)."""
    out = []
    for path in files:
        text = read_text(path)
        if text is None:
            continue
        doc = Document(path.as_uri(), text, language_id=language_for_path(path))
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        out.append(TokenizedFile(path, enc["input_ids"], token_unit_keys(doc, enc["offset_mapping"], str(path),
                                                                                 grain=units)))
    return out


def make_windows(files: list[TokenizedFile], length: int, max_windows: int, seed: int, sep_id: int | None):
    """Windows of ``length`` tokens: from single long files first, then from the files concatenated
    in reading order (a whole repository), each with its unit keys."""
    rng = random.Random(seed + length)
    windows = []
    long_files = [f for f in files if len(f.ids) >= length]
    rng.shuffle(long_files)
    for f in long_files[: max_windows]:
        start = rng.randrange(0, len(f.ids) - length + 1)
        windows.append(("file", f.path.name, f.ids[start : start + length], f.keys[start : start + length]))
    if len(windows) < max_windows:
        ids, keys = [], []
        for f in files:  # reading order: sorted paths
            if sep_id is not None and ids:
                ids.append(sep_id)
                keys.append(("sep", len(ids)))
            ids.extend(f.ids)
            keys.extend(f.keys)
        for k in range(max_windows - len(windows)):
            if len(ids) < length:
                break
            start = rng.randrange(0, len(ids) - length + 1)
            windows.append(("repo", f"repo@{start}", ids[start : start + length], keys[start : start + length]))
    return windows


def windows_by_length(files: list[TokenizedFile], lengths: list[int], max_windows: int, seed: int,
                      sep_id: int | None, nested: bool = False) -> dict[int, list]:
    """``make_windows`` for each length; ``nested``: each length's windows are the last tokens of the
    longest length's, so every length ends on the same text."""
    if not nested:
        return {length: make_windows(files, length, max_windows, seed, sep_id) for length in lengths}
    longest = make_windows(files, max(lengths), max_windows, seed, sep_id)
    return {length: [(kind, name, ids[-length:], keys[-length:]) for kind, name, ids, keys in longest]
            for length in lengths}


def method_config(method: str, train_len: int, length: int, base: RopeMethodConfig) -> RopeMethodConfig:
    """``base``'s settings for ``method``, sized for inputs of ``length`` tokens as the method's authors
    compare it (a scaling factor, Self-Extend's group size)."""
    position = position_method("rope" if method == TRUNCATE else method)
    return position.size_for(dataclasses.replace(base, factor=None), length, train_len)


def positions_for(method: str, keys: list, length: int) -> torch.Tensor:
    """The syntax hierarchy for methods that read it; the token index alone for the others."""
    if method != TRUNCATE and position_method(method).hierarchical:
        return positions_from_unit_keys(keys)[None]
    return plain_positions(length)


@torch.inference_mode()
def token_nll(handle, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of tokens 1..T-1 given everything before them, ``[T-1]``."""
    logits = handle.forward(ids, positions).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")


@torch.inference_mode()
def truncated_nll(model, ids: torch.Tensor, train_len: int) -> torch.Tensor:
    """Sliding window: every token predicted from at most ``train_len`` tokens before it (stride L/2)."""
    T = ids.shape[1]
    stride = max(1, train_len // 2)
    nll = torch.empty(T - 1)
    first = model(ids[:, : min(T, train_len)]).logits[0, :-1].float()
    n = first.shape[0]
    nll[:n] = torch.nn.functional.cross_entropy(first, ids[0, 1 : n + 1], reduction="none")
    done = n  # predictions made for targets 1..done
    while done < T - 1:
        end = min(T, done + 1 + stride)  # targets done+1 .. end-1
        start = max(0, end - train_len)
        logits = model(ids[:, start:end]).logits[0].float()
        targets = ids[0, done + 1 : end]
        preds = logits[done - start : end - start - 1]
        nll[done : end - 1] = torch.nn.functional.cross_entropy(preds, targets, reduction="none")
        done = end - 1
    return nll


def copy_label(method: str, copy: CopySettings) -> str:
    return f"{method}+copy:{copy.weight:g}/{copy.min_order}"


def copied_nll(ids: list[int], nll: torch.Tensor, copy: CopySettings, span: int | None) -> torch.Tensor:
    """``nll`` (of tokens 1..T-1) with the copy model mixed in, the copy model reading the ``span`` tokens
    before each target (None: all of them), as much as the method itself reads."""
    model = CopyModel(ids, copy)
    p_model = torch.exp(-nll.double())
    out = torch.empty_like(nll)
    for t in range(1, len(ids)):
        prediction = model.predict(end=t, start=0 if span is None else max(0, t - span))
        out[t - 1] = -math.log(max(mix_probability(p_model[t - 1], prediction, ids[t], copy), 1e-30))
    return out


def eval_perplexity(data: list[Path] | None = None, model: str | None = None, methods=None,
                    lengths_x=(1, 4, 16, 32), max_windows: int = 4, seed: int = 0, base: RopeMethodConfig | None = None,
                    device: str = "cpu", units: str = "definition", copies: tuple[CopySettings, ...] = (),
                    nested: bool = False) -> dict:
    """Perplexity by method and length; ``units``: what a syntax unit is for the hierarchical methods
    (the windows are the same text whatever it is, so runs at different grains compare row by row);
    each of ``copies`` adds a row per method with that copy model mixed in.  ``nested``: every length's
    windows end where the longest length's do (each its last tokens), so ``ppl_last`` scores the same
    tokens at every length with more context before them; otherwise each length draws its own windows."""
    lm, tokenizer, fim = load_model(model, device=device, dtype="float32")
    train_len = trained_length(lm.config)
    base = base or RopeMethodConfig()
    methods = methods or all_methods()
    files = tokenize_files(tokenizer, collect_files(data or default_eval_data()), units)
    sep = tokenizer.convert_tokens_to_ids(fim.file_separator) if fim.file_separator else tokenizer.eos_token_id
    results = []
    started = time.time()
    by_length = windows_by_length(files, [int(x * train_len) for x in lengths_x], max_windows, seed, sep, nested)
    for x in lengths_x:
        length = int(x * train_len)
        windows = by_length[length]
        if not windows:
            log.warning("no window of %d tokens in the data", length)
            continue
        for method in methods:
            variants = [(method, None)] + [(copy_label(method, c), c) for c in copies]
            total = {label: torch.zeros(0) for label, _ in variants}
            last = {label: torch.zeros(0) for label, _ in variants}
            per_window = {label: [] for label, _ in variants}  # (ppl, ppl of the last tokens) of each window
            t0 = time.time()
            for kind, name, ids, keys in windows:
                ids_t = torch.tensor([ids], device=lm.device)
                if method == TRUNCATE:
                    nll = truncated_nll(lm, ids_t, train_len)
                else:
                    handle = attach(lm, method_config(method, train_len, length, base))
                    try:
                        nll = token_nll(handle, ids_t, positions_for(method, keys, length))
                    finally:
                        handle.detach()
                nll = nll.cpu()
                for label, copy in variants:
                    mixed = nll if copy is None else copied_nll(ids, nll, copy, train_len if method == TRUNCATE else None)
                    tail = mixed[-min(len(mixed), train_len):]
                    total[label] = torch.cat([total[label], mixed])
                    last[label] = torch.cat([last[label], tail])
                    per_window[label].append((math.exp(mixed.mean().item()), math.exp(tail.mean().item())))
            for label, _ in variants:
                row = {"method": label, "length": length, "x": x, "windows": len(windows),
                       "ppl": math.exp(total[label].mean().item()), "ppl_last": math.exp(last[label].mean().item()),
                       "ppl_windows": [w for w, _ in per_window[label]],
                       "ppl_last_windows": [w for _, w in per_window[label]],
                       "seconds": time.time() - t0}
                results.append(row)
                log.info("%-12s %6d tokens: ppl %.2f, last %.2f (%.0f s)", label, length, row["ppl"], row["ppl_last"],
                         row["seconds"])
    return {"train_length": train_len, "model": model or "default", "data": [str(d) for d in (data or default_eval_data())],
            "settings": {"window": base.window, "split": base.split, "token_index": base.token_index,
                         **far_bias_used(lm, base), "units": units, "unit_size": base.unit_size,
                         "nested": nested},
            "seconds": time.time() - started, "results": results}


def far_bias_used(lm, base: RopeMethodConfig) -> dict:
    """The far bias the hierarchical methods ran with: the one given, else the model card's (else 0)."""
    used = with_model_far_bias(lm, base)
    return {"far_bias": used.far_bias, "far_bias_mode": used.far_bias_mode}


def print_table(report: dict, key: str = "ppl") -> None:
    rows = report["results"]
    lengths = sorted({r["length"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    print(f"perplexity ({key}) by context length; trained on {report['train_length']} tokens")
    print(f"{'method':<14}" + "".join(f"{n:>10}" for n in lengths))
    for m in methods:
        cells = {r["length"]: r[key] for r in rows if r["method"] == m}
        print(f"{m:<14}" + "".join(f"{cells.get(n, float('nan')):>10.2f}" for n in lengths))
    print("the same, lowest-highest of single windows")
    for m in methods:
        spread = {r["length"]: r.get(key + "_windows") or [float("nan")] for r in rows if r["method"] == m}
        print(f"{m:<14}" + "".join(f"{min(spread[n]):>5.1f}-{max(spread[n]):<4.1f}" if n in spread else f"{'':>10}"
                                   for n in lengths))


def plot(report: dict, out: Path, key: str = "ppl") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = list(dict.fromkeys(r["method"] for r in report["results"]))
    for m in methods:
        rows = sorted((r for r in report["results"] if r["method"] == m), key=lambda r: r["length"])
        ax.plot([r["length"] for r in rows], [r[key] for r in rows], marker="o", label=m,
                linewidth=2.5 if m.startswith("hirope") or m == "truncate" else 1.2)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.axvline(report["train_length"], color="grey", linestyle=":", label="training length")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity" + (" (last L tokens)" if key == "ppl_last" else ""))
    ax.set_title("Perplexity vs context length")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


# ---- next-line completion (LCC style) ----


def levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def edit_similarity(a: str, b: str) -> float:
    if not a and not b:
        return 1.0
    return 1.0 - levenshtein(a, b) / max(len(a), len(b))


# lines that are comments or strings in the languages trained on: not what next-line completion measures
COMMENT_OR_STRING_STARTS = ("#", '"', "'", "`", "//", "/*", "* ", "*/")


def completion_samples(tokenizer, files: list[Path], prompt_tokens: int, train_len: int, count: int, seed: int,
                       max_files: int | None = None, indented: bool = False):
    """(file, prompt text, target line) where the target line uses a name last seen beyond the trained window.
    ``max_files``: sample lines from that many files (drawn by the seed) of a large package.  ``indented``:
    the prompt ends after the target line's indentation (where an editor that indents leaves the cursor),
    not at the line's start; the same lines either way."""
    import bisect
    import re

    rng = random.Random(seed)
    if max_files is not None and len(files) > max_files:
        files = sorted(random.Random(seed).sample(files, max_files))
    ident = re.compile(r"[A-Za-z_][A-Za-z0-9_]{3,}")
    texts: dict[Path, str] = {}
    candidates = []
    for path in files:
        text = read_text(path)
        if text is None:
            continue
        lines = text.split("\n")
        offsets = [0]
        for line in lines:
            offsets.append(offsets[-1] + len(line) + 1)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if len(enc["input_ids"]) < prompt_tokens:
            continue
        texts[path] = text
        starts = [s for s, _ in enc["offset_mapping"]]
        for n in range(1, len(lines)):
            target = lines[n].strip()
            if len(target) < 8 or target.startswith(COMMENT_OR_STRING_STARTS):
                continue
            tok_at = bisect.bisect_left(starts, offsets[n])
            if tok_at < prompt_tokens:
                continue
            recent_from = starts[max(0, tok_at - train_len)]
            # the last whole occurrence before the line: in the prompt, but none within the trained window
            last_seen = (text.rfind(w, 0, offsets[n]) for w in set(ident.findall(target)))
            far_only = any(0 <= at < recent_from for at in last_seen)
            at = offsets[n] + (len(lines[n]) - len(lines[n].lstrip()) if indented else 0)
            candidates.append((far_only, path, at, lines[n], tok_at))
    rng.shuffle(candidates)
    # half the lines use a name seen only beyond the trained window (where the far context must help)
    far = [c for c in candidates if c[0]][: count // 2]
    near = [c for c in candidates if not c[0]][: count - len(far)]
    return [{"file": str(path), "prompt": texts[path][:at], "target": target, "far": is_far}
            for is_far, path, at, target, _ in far + near]


def repeats_line(text: str, prompt: str) -> bool:
    """The line the text completes is the line above it again, or assigns a name to itself; closing
    brackets after closing brackets (the end of nested blocks) are no repeat, as for the server's guard."""
    lines = prompt.split("\n")
    above = next((line for line in reversed(lines[:-1]) if line.strip()), "")
    return repeats_line_above(lines[-1] + text.split("\n")[0], above)


def eval_completion(data: list[Path] | None = None, model: str | None = None, methods=("hirope", "truncate", "rope", "rerope"),
                    prompt_x: int = 4, count: int = 40, seed: int = 0, base: RopeMethodConfig | None = None,
                    max_new_tokens: int = 32, max_files: int | None = None,
                    copies: tuple[CopySettings, ...] = (), plain: bool = True,
                    copy_document: bool | None = None, workspace: bool = False,
                    copy_workspace: bool | None = None, indented: bool = False) -> dict:
    """Next-line completion through the server's session (no cross-file context, no suffix: LCC's task);
    each method also with each of ``copies`` mixed in (``0/1``: the copy model off); ``plain=False``: only
    those; ``copy_document``: the copy model also reads the file beyond the prompt, or not (None: the server's
    default).  ``workspace``: the data folders are the workspace (the line's own file open, cut at the line),
    with the server's cross-file context; ``copy_workspace``: the copy model reads its neighbouring files, or
    not (None: the server's default).  ``indented``: the cursor after the line's indentation, and a
    suggestion that indents again counts against it (not stripped)."""
    from .far_eval import Completer, MethodSpec

    loaded = load_model(model, device="cpu", dtype="float32")
    lm, tokenizer, fim = loaded
    train_len = trained_length(lm.config)
    base = base or RopeMethodConfig()
    prompt_tokens = prompt_x * train_len
    data = list(data or default_eval_data())
    samples = completion_samples(tokenizer, collect_files(data), prompt_tokens, train_len,
                                 count, seed, max_files, indented)
    index = None
    if workspace:
        from .far_eval import corpus_index

        index = corpus_index(Path(data[0]))
        for folder in data[1:]:
            index.add_folder(Path(folder))
        log.info("workspace: %d files indexed", index.scan())
    context = {"cross_file": workspace, "suffix_share": 0.0}
    for name, value in (("copy_document", copy_document), ("copy_workspace", copy_workspace)):
        if value is not None:
            context[name] = value
    results = []
    # each method as the server runs it (the card's far bias and copy model), then with each copy model
    specs = [MethodSpec(label, method, base.far_bias, base.far_bias_mode, copy=copy)
             for method in methods
             for label, copy in [(method, None)] * plain + [(copy_label(method, c), c) for c in copies]]
    for spec in specs:
        method = spec.name
        completer = Completer(loaded, spec, prompt_tokens, index, max_new_tokens, base=base, context=context)
        exact, sims, far_sims, loops, shown_repeats, predictions = 0, [], [], 0, 0, []
        try:
            for k, s in enumerate(samples):
                doc = Document(Path(s["file"]).as_uri() + f"#{k}", s["prompt"], language_id=language_for_path(s["file"]))
                shown = completer.complete(doc, *doc.position_at(len(s["prompt"])), multiline="never")
                completer.reset(doc.uri)
                raw = completer.last.raw.lstrip("\n").split("\n")[0]
                predicted = shown.split("\n")[0].rstrip() if indented else shown.strip()
                truth = s["target"].strip()
                exact += predicted == truth
                sim = edit_similarity(predicted, truth)
                sims.append(sim)
                loops += bool(PHRASE_LOOP.search(raw)) or repeats_line(raw, s["prompt"])
                shown_repeats += bool(PHRASE_LOOP.search(shown)) or repeats_line(shown, s["prompt"])
                predictions.append({"target": truth, "predicted": predicted, "raw": raw.strip(), "far": s["far"],
                                    "edit_similarity": sim, "confidence": completer.last.confidence})
                if s["far"]:
                    far_sims.append(sim)
        finally:
            completer.close()
        row = {"method": method, "samples": len(samples), "prompt_tokens": completer.budget,
               "exact_match": exact / max(1, len(samples)),
               "edit_similarity": 100 * sum(sims) / max(1, len(sims)),
               "edit_similarity_far": 100 * sum(far_sims) / max(1, len(far_sims)), "far_samples": len(far_sims),
               "raw_repeats": loops, "shown_repeats": shown_repeats, "confidence_gate": gate_summary(predictions),
               "predictions": predictions}
        results.append(row)
        log.info("%-12s EM %.3f ES %.1f (far-only names: ES %.1f over %d)", method, row["exact_match"],
                 row["edit_similarity"], row["edit_similarity_far"], row["far_samples"])
    return {"train_length": train_len, "prompt_tokens": prompt_tokens,
            "settings": {**far_bias_used(lm, base),
                         "copy_document": ContextSettings().copy_document if copy_document is None else copy_document,
                         "workspace": workspace, "indented": indented,
                         "copy_workspace": ContextSettings().copy_workspace if copy_workspace is None else copy_workspace},
            "results": results}


def save(report: dict, path: Path | None) -> None:
    if path is not None:
        path.write_text(json.dumps(report, indent=2))
