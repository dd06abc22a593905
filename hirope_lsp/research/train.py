"""The default model's recipe: a byte-level BPE tokenizer and a small Llama, trained with
fill-in-the-middle samples on a corpus built by ``hirope-lsp corpus build`` (code of many
packages and languages, see ``research/corpus.py``), or on the running interpreter's
standard library when no corpus is given (smoke tests).

Documents are packed into one token stream in package order, files of a package joined by
``<|file_sep|>``, so a training window can run from one file of a package into the next
(cross-file context, as the server's prompts have it).

Seeded and resumable: the run directory holds ``checkpoint.pt`` (model, optimizer,
step, RNG), ``loss.jsonl`` and ``best.safetensors`` (fp16 weights of the lowest held-out
loss); running the same command again continues where it stopped, and ``--init-from``
starts a run from committed weights.  ``--export DIR`` writes a HuggingFace model directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import random
import sysconfig
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
FIM_PREFIX = "<|fim_prefix|>"
FIM_SUFFIX = "<|fim_suffix|>"
FIM_MIDDLE = "<|fim_middle|>"
FILE_SEP = "<|file_sep|>"
SPECIAL_TOKENS = [EOS, FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE, FILE_SEP]


@dataclass(kw_only=True)
class TrainConfig:
    vocab_size: int = 8192
    hidden_size: int = 256
    layers: int = 6
    heads: int = 4
    intermediate_size: int = 704
    context: int = 512
    rope_theta: float = 10000.0
    batch_size: int = 16
    steps: int = 3000
    lr: float = 1.5e-3
    warmup: int = 150
    cycle_start: int = 0  # the step the cosine starts from (a warm restart of a finished schedule; 0: one cycle)
    weight_decay: float = 0.1
    fim_rate: float = 0.5
    spm_rate: float = 0.8  # of the FIM samples, the share in suffix-prefix-middle order (what the server sends)
    seed: int = 0
    held_out_percent: int = 2  # standard-library runs: the share of files held out
    checkpoint_every: int = 100
    max_minutes: float | None = None
    max_files: int | None = None  # smoke tests train on the first few files only
    corpus: str | None = None  # a directory written by `hirope-lsp corpus build`; None: the standard library
    tokenizer_sample_mb: float = 40.0  # text the tokenizer is trained on, drawn evenly across languages
    held_out_windows: int = 64
    device: str = "cpu"  # cpu, cuda, auto (cuda where there is one); on CUDA the forward runs in bf16 autocast
    # sampling share of each language's stream (the corpus is mostly Java and JavaScript by bytes;
    # users and the evaluation are mostly Python); languages absent from the corpus are left out
    language_weights: dict = field(default_factory=lambda: {
        "python": 0.5, "javascript": 0.15, "typescript": 0.05, "go": 0.1, "java": 0.1, "rust": 0.1})


def stdlib_files() -> list[Path]:
    """Every Python file of the running interpreter's standard library, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def is_held_out(path: Path, percent: int) -> bool:
    digest = hashlib.sha1(path.name.encode() + str(path.parent.name).encode()).digest()
    return digest[0] * 100 // 256 < percent


def read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path) -> None:
    """Byte-level BPE with the FIM special tokens, saved so AutoTokenizer loads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS,
        bos_token=EOS,
        unk_token=None,
        pad_token=EOS,
        additional_special_tokens=[FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE, FILE_SEP],
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(out_dir)


def model_config(cfg: TrainConfig, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.context,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids(EOS),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS),
        pad_token_id=tokenizer.convert_tokens_to_ids(EOS),
    )


class Samples:
    """Random training windows over the packed token stream, ``fim_rate`` of them rearranged for FIM.

    A FIM window that crosses into a new file keeps the earlier files' tokens in front of the
    FIM markers, where the server puts cross-file context."""

    def __init__(self, stream: np.ndarray, segments: dict[str, tuple[int, int]], cfg: TrainConfig,
                 special: dict[str, int]):
        L = cfg.context + 1
        usable = {lang: (a, b) for lang, (a, b) in segments.items() if b - a > L and cfg.language_weights.get(lang, 0) > 0}
        if not usable:
            raise ValueError(f"the corpus has no language with more than one window of {L} tokens to sample")
        self.stream = stream
        self.segments = list(usable.values())
        weights = [cfg.language_weights[lang] for lang in usable]
        self.cumulative = np.cumsum(weights) / sum(weights)
        self.cfg = cfg
        self.special = special

    def sample(self, rng: random.Random) -> list[int]:
        L = self.cfg.context + 1
        s = self.special
        a, b = self.segments[int(np.searchsorted(self.cumulative, rng.random(), side="right").clip(0, len(self.segments) - 1))]
        start = rng.randrange(a, b - L)
        if rng.random() >= self.cfg.fim_rate:
            return self.stream[start : start + L].tolist()
        piece = self.stream[start : start + L - 3].tolist()
        context: list[int] = []
        if s[FILE_SEP] in piece:
            cut = len(piece) - piece[::-1].index(s[FILE_SEP])
            context, piece = piece[:cut], piece[cut:]
        a, b = sorted(rng.randrange(0, len(piece) + 1) for _ in range(2))
        if rng.random() < self.cfg.spm_rate:
            # suffix first: the prefix, which grows while typing, sits last before the middle (cache-friendly)
            tokens = [*context, s[FIM_SUFFIX], *piece[b:], s[FIM_PREFIX], *piece[:a], s[FIM_MIDDLE], *piece[a:b]]
        else:
            tokens = [*context, s[FIM_PREFIX], *piece[:a], s[FIM_SUFFIX], *piece[b:], s[FIM_MIDDLE], *piece[a:b]]
        if b == len(piece):
            tokens.append(s[EOS])
        tokens = tokens[:L]
        return tokens + [s[EOS]] * (L - len(tokens))

    def batch(self, rng: random.Random) -> torch.Tensor:
        return torch.tensor([self.sample(rng) for _ in range(self.cfg.batch_size)], dtype=torch.long)


def training_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("training on cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


def learning_rate(cfg: TrainConfig, step: int, optimizer_fresh_at: int = 0) -> float:
    """Cosine from ``cfg.lr`` at ``cfg.cycle_start`` to a tenth of it at ``cfg.steps``, ramped up linearly
    over ``cfg.warmup`` steps from the step the optimizer state started fresh (0 for a new run; a later
    step for one started from committed weights, where a fresh Adam at the schedule's rate would jolt the
    weights), or from ``cfg.cycle_start`` where a new cycle begins on kept optimizer state."""
    start = cfg.cycle_start + cfg.warmup
    progress = max(0.0, (step - start) / max(1, cfg.steps - start))
    decayed = cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
    ramp_from = max(optimizer_fresh_at, cfg.cycle_start if step >= cfg.cycle_start else 0)
    return decayed * min(1.0, (step - ramp_from + 1) / cfg.warmup)


def encode_texts(tokenizer, texts: list[str], batch: int = 512) -> list[list[int]]:
    out: list[list[int]] = []
    for i in range(0, len(texts), batch):
        out.extend(tokenizer(texts[i : i + batch], add_special_tokens=False)["input_ids"])
    return out


def pack(docs: list[list[int]], languages: list[str], separator: int) -> tuple[np.ndarray, dict[str, tuple[int, int]]]:
    """One stream, a segment per language (documents keep their order inside it), every document
    after a separator token; returns the stream and each language's [start, end)."""
    order = sorted(range(len(docs)), key=lambda i: languages[i])  # stable: package order is kept
    total = sum(len(d) + 1 for d in docs)
    stream = np.empty(total, dtype=np.uint16 if separator < 2**16 else np.int32)
    segments: dict[str, list[int]] = {}
    i = 0
    for k in order:
        d = docs[k]
        segments.setdefault(languages[k], [i, i])
        stream[i] = separator
        stream[i + 1 : i + 1 + len(d)] = d
        i += len(d) + 1
        segments[languages[k]][1] = i
    return stream, {lang: (a, b) for lang, (a, b) in segments.items()}


def _stdlib_sources(cfg: TrainConfig) -> tuple[list[str], list[str]]:
    files = stdlib_files()[: cfg.max_files]
    train = [t for f in files if not is_held_out(f, cfg.held_out_percent) and (t := read_text(f))]
    held = [t for f in files if is_held_out(f, cfg.held_out_percent) and (t := read_text(f))]
    return train, held


def _corpus_sources(cfg: TrainConfig) -> tuple[list[dict], list[str]]:
    """Training documents of the corpus, and the held-out files of its tuning split (Python), which
    the training log reports on; the reporting split is kept for the release evaluation."""
    from .corpus import held_out_files, read_documents

    root = Path(cfg.corpus)
    docs = list(read_documents(root))[: cfg.max_files]
    held = [p.read_text() for p in held_out_files(root, "python", "tune")]
    return docs, held


def tokenizer_sample(docs: list[dict], megabytes: float, weights: dict, seed: int) -> list[str]:
    """About ``megabytes`` of text, shared between languages as the training samples are (all of a
    language that has less)."""
    by_language: dict[str, list[str]] = {}
    for d in docs:
        if weights.get(d["language"], 0) > 0:
            by_language.setdefault(d["language"], []).append(d["text"])
    rng = random.Random(seed)
    total_weight = sum(weights[lang] for lang in by_language)
    sample = []
    for lang, texts in by_language.items():
        rng.shuffle(texts)
        share = megabytes * 1e6 * weights[lang] / total_weight
        size = 0
        for t in texts:
            if size >= share:
                break
            sample.append(t)
            size += len(t)
    return sample


def _sources(cfg: TrainConfig) -> tuple[list[str], list[str], list[str], list[str]]:
    """(training texts, their languages, the tokenizer's sample, held-out texts)."""
    if cfg.corpus:
        docs, held_texts = _corpus_sources(cfg)
        sample = tokenizer_sample(docs, cfg.tokenizer_sample_mb, cfg.language_weights, cfg.seed)
        return [d["text"] for d in docs], [d["language"] for d in docs], sample, held_texts
    train_texts, held_texts = _stdlib_sources(cfg)
    return train_texts, ["python"] * len(train_texts), train_texts, held_texts


def prepare(run_dir: Path, cfg: TrainConfig):
    """Tokenizer, packed training stream and held-out documents, built once per run directory (the
    sources are read only for what is missing: a run directory packed elsewhere needs no corpus)."""
    from transformers import AutoTokenizer

    tok_dir = run_dir / "tokenizer"
    stream_path = run_dir / "stream.npy"
    held_path = run_dir / "held_out.pt"
    segments_path = run_dir / "segments.json"
    sources = None
    if not (tok_dir / "tokenizer.json").exists() or not segments_path.exists():
        sources = _sources(cfg)
    if not (tok_dir / "tokenizer.json").exists():
        sample = sources[2]
        log.info("training tokenizer on %.1f MB", sum(map(len, sample)) / 1e6)
        train_tokenizer(sample, cfg.vocab_size, tok_dir)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    if not segments_path.exists():
        train_texts, languages, _, held_texts = sources
        log.info("tokenizing %d training documents", len(train_texts))
        stream, segments = pack(encode_texts(tokenizer, train_texts), languages, tokenizer.convert_tokens_to_ids(FILE_SEP))
        np.save(stream_path, stream)
        torch.save(encode_texts(tokenizer, held_texts), held_path)
        segments_path.write_text(json.dumps(segments))
    stream = np.load(stream_path, mmap_mode="r")
    held = torch.load(held_path)
    segments = {lang: tuple(v) for lang, v in json.loads(segments_path.read_text()).items()}
    return tokenizer, stream, segments, held


def token_byte_lengths(tokenizer) -> torch.Tensor:
    """Bytes of text each token stands for (specials: 0). In a byte-level BPE vocabulary each
    character of a token stands for one byte; other tokenizers are measured by decoding."""
    fast = getattr(tokenizer, "_tokenizer", None)
    byte_level = fast is not None and "ByteLevel" in str(fast.pre_tokenizer)
    lengths = torch.zeros(len(tokenizer), dtype=torch.float64)
    special = set(tokenizer.all_special_ids)
    for token, i in tokenizer.get_vocab().items():
        if i not in special:
            lengths[i] = len(token) if byte_level else len(tokenizer.decode([i]).encode("utf-8"))
    return lengths


def held_out_windows(docs: list[list[int]], context: int, max_windows: int) -> list[list[int]]:
    """The windows ``held_out_loss`` measures: the first ``max_windows`` of ``context`` tokens."""
    windows = []
    for d in docs:
        for i in range(0, len(d) - 1, context):
            if len(windows) == max_windows:
                return windows
            if len(d[i : i + context]) > 1:
                windows.append(d[i : i + context])
    return windows


@torch.no_grad()
def held_out_loss(model, docs: list[list[int]], context: int, max_windows: int = 64,
                  byte_lengths: torch.Tensor | None = None) -> float | tuple[float, float]:
    """Mean loss (nats per token) over the first ``max_windows`` windows of ``context`` tokens;
    with ``byte_lengths`` also bits per byte of the same targets."""
    model.eval()
    device = next(model.parameters()).device
    total, count, nbytes = 0.0, 0, 0.0
    for w in held_out_windows(docs, context, max_windows):
        ids = torch.tensor([w])
        out = model(ids.to(device), labels=ids.to(device))
        total += out.loss.float().item() * (len(w) - 1)
        count += len(w) - 1
        if byte_lengths is not None:
            nbytes += float(byte_lengths[ids[0, 1:]].sum())
    model.train()
    loss = total / max(1, count)
    if byte_lengths is None:
        return loss
    return loss, total / math.log(2) / max(1.0, nbytes)


def save_fp16(model, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)


def load_weights(model, path: Path) -> None:
    from safetensors.torch import load_file

    state = {k: v.float() for k, v in load_file(str(path)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if m != "lm_head.weight"]:
        raise ValueError(f"{path} does not fit the recipe's model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()


def transplant(model, tokenizer, source_dir: Path) -> None:
    """Start from another model of the same shape but another vocabulary (the shipped default
    model): every layer is copied, and each new token's embedding is the mean of the source
    embeddings of its bytes as the source vocabulary splits them (greedy longest match over the
    byte-level token strings); tokens it cannot split keep their random start."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32)
    source_tok = AutoTokenizer.from_pretrained(source_dir)
    state = {k: v for k, v in source.state_dict().items() if "embed_tokens" not in k and "lm_head" not in k}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if "embed_tokens" not in m and "lm_head" not in m]:
        raise ValueError(f"{source_dir} is not of the recipe's shape: missing {missing}, unexpected {unexpected}")
    old = source.get_input_embeddings().weight.detach()
    old_vocab = source_tok.get_vocab()
    longest = max(map(len, old_vocab))
    new = model.get_input_embeddings().weight
    with torch.no_grad():
        for token, i in tokenizer.get_vocab().items():
            if token in old_vocab:
                new[i] = old[old_vocab[token]]
                continue
            pieces, k = [], 0
            while k < len(token):
                for j in range(min(len(token), k + longest), k, -1):
                    if token[k:j] in old_vocab:
                        pieces.append(old_vocab[token[k:j]])
                        k = j
                        break
                else:
                    pieces = []
                    break
            if pieces:
                new[i] = old[pieces].mean(dim=0)
    model.tie_weights()


# what a resumed run may change when the command gives it (the rest of the recipe is the run's: its model
# shape and its data; changing those means a new run directory started with --init-from)
SCHEDULE_FIELDS = ("steps", "lr", "warmup", "cycle_start", "checkpoint_every")
RUN_FIELDS = ("max_minutes", "device")  # how long this command runs and where: always the command's


def resumed_config(saved: dict, cfg: TrainConfig, given: Iterable[str] = ()) -> TrainConfig:
    """The recipe a resumed run goes on with: the saved one, with the command's time limit and device, and
    the schedule fields the command named in ``given`` (``steps`` among them: a resume that names no length
    goes on to the saved one); a named field of the shape or the data that differs from the saved recipe is
    refused (ValueError), never silently dropped."""
    merged = {**asdict(TrainConfig()), **saved, **{name: getattr(cfg, name) for name in RUN_FIELDS}}
    for name in given:
        wanted, kept = getattr(cfg, name), merged[name]
        if name in SCHEDULE_FIELDS:
            merged[name] = wanted
        elif name not in RUN_FIELDS and not _same_setting(name, wanted, kept):
            raise ValueError(f"this run directory was trained with {name} = {kept!r}, the command gives {wanted!r}: "
                             f"a resumed run keeps its model shape and data; to change {name}, start a new run "
                             f"directory with --init-from <its best.safetensors>")
    return TrainConfig(**merged)


def _same_setting(name: str, a, b) -> bool:
    if name == "corpus" and a is not None and b is not None:
        return Path(a).resolve() == Path(b).resolve()
    return a == b


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW at the recipe's learning rate, weight decay on matrices only."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )


def train_step(model, optimizer, batch: torch.Tensor, autocast=contextlib.nullcontext()) -> torch.Tensor:
    """One optimizer step on ``batch`` ([B, context + 1] tokens); returns the loss (detached)."""
    with autocast:
        out = model(batch[:, :-1], labels=batch[:, :-1].clone())
    # labels are shifted inside the model: predict token t+1 from tokens <= t
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return out.loss.detach()


def train(run_dir: Path, cfg: TrainConfig, export: Path | None = None, init_from: Path | None = None,
          given: Iterable[str] = ()) -> dict:
    """Train (or resume) in ``run_dir``; returns the final summary. ``init_from``: fp16 weights
    (``best.safetensors`` of an earlier run, with its tokenizer in ``run_dir/tokenizer``) to start
    from, or a model directory of the same shape with another vocabulary (see ``transplant``).
    ``given``: the fields of ``cfg`` the command set, which a resumed run applies or refuses
    (``resumed_config``); the others come from the run's saved recipe."""
    from transformers import LlamaForCausalLM

    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "train_config.json"
    if config_path.exists():
        cfg = resumed_config(json.loads(config_path.read_text()), cfg, given)
    config_path.write_text(json.dumps(asdict(cfg), indent=2))
    torch.manual_seed(cfg.seed)
    tokenizer, stream, segments, held = prepare(run_dir, cfg)
    special = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    model = LlamaForCausalLM(model_config(cfg, tokenizer))
    device = training_device(cfg.device)
    optimizer = make_optimizer(model, cfg)
    rng = random.Random(cfg.seed)
    step = 0
    optimizer_fresh_at = 0
    best = {"held_out_loss": math.inf}
    ckpt_path = run_dir / "checkpoint.pt"
    best_path = run_dir / "best.safetensors"
    optimizer_state = None
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=False, map_location="cpu")
        model.load_state_dict(ckpt["model"])
        optimizer_state = ckpt["optimizer"]
        rng.setstate(ckpt["rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        step = ckpt["step"]
        optimizer_fresh_at = ckpt.get("optimizer_fresh_at", 0)
        best = ckpt.get("best", best)
        log.info("resumed at step %d", step)
    elif init_from is not None and init_from.is_dir():
        transplant(model, tokenizer, init_from)
        log.info("started from the model in %s (vocabulary transplanted)", init_from)
    elif init_from is not None:
        load_weights(model, init_from)
        meta_path = init_from.with_suffix(".json")
        if meta_path.exists():  # continue the schedule where the committed weights left it
            step = json.loads(meta_path.read_text()).get("step", 0)
        optimizer_fresh_at = step
        log.info("started from %s at step %d (optimizer state starts fresh)", init_from, step)
    model.to(device)
    if optimizer_state is not None:  # loaded once the parameters are on the device: the state follows them
        optimizer.load_state_dict(optimizer_state)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    samples = Samples(stream, segments, cfg, special)
    byte_lengths = token_byte_lengths(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2fM parameters, %.1fM training tokens (%s)", n_params / 1e6, len(stream) / 1e6,
             ", ".join(f"{lang} {(b - a) / 1e6:.1f}M" for lang, (a, b) in segments.items()))
    loss_log = (run_dir / "loss.jsonl").open("a")
    started = time.time()
    model.train()

    def save():
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng.getstate(),
                    "torch_rng": torch.get_rng_state(), "step": step, "best": best,
                    "optimizer_fresh_at": optimizer_fresh_at}, tmp)
        tmp.replace(ckpt_path)

    measured = None  # (step, held-out loss, bits per byte) of the last measurement

    def measure_and_keep() -> tuple[float, float]:
        """Held-out loss now; the weights kept as the best where it is the lowest yet; a checkpoint."""
        nonlocal best, measured
        with autocast:
            loss, bpb = held_out_loss(model, held, cfg.context, cfg.held_out_windows, byte_lengths)
        if loss < best["held_out_loss"]:
            best = {"held_out_loss": loss, "held_out_bpb": bpb, "step": step}
            save_fp16(model, best_path)
            best_path.with_suffix(".json").write_text(json.dumps(best))
        save()
        measured = (step, loss, bpb)
        return loss, bpb

    tokens_seen = 0
    while step < cfg.steps:
        if cfg.max_minutes is not None and time.time() - started > cfg.max_minutes * 60:
            log.info("time limit reached at step %d", step)
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step, optimizer_fresh_at)
        batch = samples.batch(rng).to(device, non_blocking=True)
        step_loss = train_step(model, optimizer, batch, autocast)
        step += 1
        tokens_seen += batch.numel()
        record = {"step": step, "loss": round(step_loss.item(), 4), "lr": learning_rate(cfg, step - 1, optimizer_fresh_at),
                  "tokens": step * cfg.batch_size * (cfg.context + 1), "s": round(time.time() - started, 3)}
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            loss, bpb = measure_and_keep()
            record["held_out_loss"], record["held_out_bpb"] = round(loss, 4), round(bpb, 4)
        loss_log.write(json.dumps(record) + "\n")
        loss_log.flush()
        if step % 10 == 0 or "held_out_loss" in record:
            rate = tokens_seen / max(1e-6, time.time() - started)
            log.info("step %d/%d loss %.3f %s(%.0f tok/s)", step, cfg.steps, record["loss"],
                     f"held-out {record['held_out_loss']:.3f} " if "held_out_loss" in record else "", rate)
    if measured is not None and measured[0] == step:
        _, loss, bpb = measured
        save()
    else:  # stopped by the time limit between checkpoints: its last steps count for the best weights too
        loss, bpb = measure_and_keep()
        record = {"step": step, "held_out_loss": round(loss, 4), "held_out_bpb": round(bpb, 4)}
        loss_log.write(json.dumps(record) + "\n")
    loss_log.close()
    model.to("cpu")
    summary = {"step": step, "parameters": n_params, "tokens_seen": step * cfg.batch_size * (cfg.context + 1),
               "held_out_loss": loss, "held_out_bpb": bpb, "held_out_ppl": math.exp(loss),
               # the server suggests nothing in a language the model never saw
               "languages": sorted(lang for lang in segments if cfg.language_weights.get(lang, 0) > 0)}
    if export is not None:
        if best_path.exists():  # ship the weights of the lowest held-out loss, not the last step's
            load_weights(model, best_path)
            summary.update({"step": best["step"], "tokens_seen": best["step"] * cfg.batch_size * (cfg.context + 1),
                            "held_out_loss": best["held_out_loss"], "held_out_bpb": best["held_out_bpb"],
                            "held_out_ppl": math.exp(best["held_out_loss"])})
        export_model(model, tokenizer, export, cfg, summary)
    return summary


def export_model(model, tokenizer, out_dir: Path, cfg: TrainConfig, summary: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    # fp16 on disk (half the size in the package); loading upcasts to the device's dtype
    model.to(torch.float16).save_pretrained(out_dir, safe_serialization=True)
    model.to(torch.float32)
    tokenizer.save_pretrained(out_dir)
    # the server lays prompts out suffix-first for this model (the growing prefix last: KV reuse)
    info = {"recipe": asdict(cfg), "fim_order": "spm" if cfg.spm_rate > 0 else "psm", **summary}
    (out_dir / "training.json").write_text(json.dumps(info, indent=2))


def plot_loss_curve(run_dir: Path, out: Path) -> None:
    """Training and held-out loss by step (the last record of a step wins: resumed runs repeat steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records: dict[int, dict] = {}
    for line in (run_dir / "loss.jsonl").read_text().splitlines():
        r = json.loads(line)
        records[r["step"]] = {**records.get(r["step"], {}), **r}
    steps = sorted(s for s in records if "loss" in records[s])  # a run stopped at once logs a measurement alone
    window = 25
    losses = [records[s]["loss"] for s in steps]
    smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
              for i in range(len(losses))]
    held = [(s, records[s]["held_out_loss"]) for s in steps if "held_out_loss" in records[s]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, alpha=0.25, color="tab:blue")
    ax.plot(steps, smooth, color="tab:blue", label=f"training loss ({window}-step mean)")
    ax.plot([s for s, _ in held], [v for _, v in held], marker="o", color="tab:orange", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("Default model training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
