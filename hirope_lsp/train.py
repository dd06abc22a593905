"""The default model's recipe: a byte-level BPE tokenizer and a small Llama, trained on the
running interpreter's standard library with fill-in-the-middle samples.

Seeded and resumable: the run directory holds ``checkpoint.pt`` (model, optimizer,
step, RNG) and ``loss.jsonl``; running the same command again continues where it
stopped.  ``--export DIR`` writes a standard HuggingFace model directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

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
    vocab_size: int = 4096
    hidden_size: int = 256
    layers: int = 6
    heads: int = 4
    intermediate_size: int = 704
    context: int = 256
    rope_theta: float = 10000.0
    batch_size: int = 16
    steps: int = 3000
    lr: float = 1.5e-3
    warmup: int = 150
    weight_decay: float = 0.1
    fim_rate: float = 0.5
    spm_rate: float = 0.5  # of the FIM samples, the share in suffix-prefix-middle order
    seed: int = 0
    held_out_percent: int = 2
    checkpoint_every: int = 100
    max_minutes: float | None = None
    max_files: int | None = None  # smoke tests train on the first few files only


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
    """Random training windows over tokenized documents, half of them rearranged for FIM."""

    def __init__(self, docs: list[list[int]], cfg: TrainConfig, special: dict[str, int]):
        self.docs = [d for d in docs if len(d) >= 16]
        self.cfg = cfg
        self.special = special
        lengths = torch.tensor([len(d) for d in self.docs], dtype=torch.float64)
        self.weights = lengths / lengths.sum()

    def sample(self, rng: random.Random) -> list[int]:
        L = self.cfg.context + 1
        doc = self.docs[int(torch.multinomial(self.weights, 1, generator=_torch_gen(rng)).item())]
        start = rng.randrange(0, max(1, len(doc) - L + 4))
        if rng.random() < self.cfg.fim_rate:
            piece = doc[start : start + L - 3]
            a, b = sorted(rng.randrange(0, len(piece) + 1) for _ in range(2))
            s = self.special
            if rng.random() < self.cfg.spm_rate:
                # suffix first: the prefix, which grows while typing, sits last before the middle (cache-friendly)
                tokens = [s[FIM_SUFFIX], *piece[b:], s[FIM_PREFIX], *piece[:a], s[FIM_MIDDLE], *piece[a:b]]
            else:
                tokens = [s[FIM_PREFIX], *piece[:a], s[FIM_SUFFIX], *piece[b:], s[FIM_MIDDLE], *piece[a:b]]
            if b == len(piece):
                tokens.append(s[EOS])
        else:
            tokens = doc[start : start + L]
        tokens = tokens[:L]
        return tokens + [self.special[EOS]] * (L - len(tokens))

    def batch(self, rng: random.Random) -> torch.Tensor:
        return torch.tensor([self.sample(rng) for _ in range(self.cfg.batch_size)], dtype=torch.long)


def _torch_gen(rng: random.Random) -> torch.Generator:
    return torch.Generator().manual_seed(rng.randrange(2**62))


def learning_rate(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def tokenize_corpus(tokenizer, files: list[Path]) -> list[list[int]]:
    eos = tokenizer.convert_tokens_to_ids(EOS)
    texts = [t for t in (read_text(f) for f in files) if t]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [ids + [eos] for ids in encoded]


def prepare(run_dir: Path, cfg: TrainConfig):
    """Tokenizer and tokenized corpus, built once per run directory and reused on resume."""
    from transformers import AutoTokenizer

    files = stdlib_files()[: cfg.max_files]
    train_files = [f for f in files if not is_held_out(f, cfg.held_out_percent)]
    held_files = [f for f in files if is_held_out(f, cfg.held_out_percent)]
    tok_dir = run_dir / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        log.info("training tokenizer on %d files", len(train_files))
        train_tokenizer([t for t in (read_text(f) for f in train_files) if t], cfg.vocab_size, tok_dir)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    corpus_path = run_dir / "corpus.pt"
    if corpus_path.exists():
        corpus = torch.load(corpus_path)
    else:
        corpus = {"train": tokenize_corpus(tokenizer, train_files), "held_out": tokenize_corpus(tokenizer, held_files)}
        torch.save(corpus, corpus_path)
    return tokenizer, corpus


@torch.no_grad()
def held_out_loss(model, docs: list[list[int]], context: int, max_windows: int = 64) -> float:
    model.eval()
    total, count = 0.0, 0
    windows = [d[i : i + context] for d in docs for i in range(0, len(d) - 1, context) if len(d[i : i + context]) > 1]
    for w in windows[:max_windows]:
        ids = torch.tensor([w])
        out = model(ids, labels=ids)
        total += out.loss.item() * (len(w) - 1)
        count += len(w) - 1
    model.train()
    return total / max(1, count)


def train(run_dir: Path, cfg: TrainConfig, export: Path | None = None) -> dict:
    """Train (or resume) in ``run_dir``; returns the final summary."""
    from transformers import LlamaForCausalLM

    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "train_config.json"
    if config_path.exists():
        saved = json.loads(config_path.read_text())
        cfg = TrainConfig(**{**asdict(TrainConfig()), **saved, "steps": cfg.steps, "max_minutes": cfg.max_minutes})
    config_path.write_text(json.dumps(asdict(cfg), indent=2))
    torch.manual_seed(cfg.seed)
    tokenizer, corpus = prepare(run_dir, cfg)
    special = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    model = LlamaForCausalLM(model_config(cfg, tokenizer))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )
    rng = random.Random(cfg.seed)
    step = 0
    ckpt_path = run_dir / "checkpoint.pt"
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        rng.setstate(ckpt["rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        step = ckpt["step"]
        log.info("resumed at step %d", step)
    samples = Samples(corpus["train"], cfg, special)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2fM parameters, %d training documents", n_params / 1e6, len(samples.docs))
    loss_log = (run_dir / "loss.jsonl").open("a")
    started = time.time()
    model.train()

    def save():
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng.getstate(),
                    "torch_rng": torch.get_rng_state(), "step": step}, tmp)
        tmp.replace(ckpt_path)

    tokens_seen = 0
    while step < cfg.steps:
        if cfg.max_minutes is not None and time.time() - started > cfg.max_minutes * 60:
            log.info("time limit reached at step %d", step)
            break
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step)
        batch = samples.batch(rng)
        out = model(batch[:, :-1], labels=batch[:, :-1].clone())
        # labels are shifted inside the model: predict token t+1 from tokens <= t
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        tokens_seen += batch.numel()
        record = {"step": step, "loss": round(out.loss.item(), 4), "lr": learning_rate(cfg, step - 1)}
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            record["held_out_loss"] = round(held_out_loss(model, corpus["held_out"], cfg.context), 4)
            save()
        loss_log.write(json.dumps(record) + "\n")
        loss_log.flush()
        if step % 10 == 0 or "held_out_loss" in record:
            rate = tokens_seen / max(1e-6, time.time() - started)
            log.info("step %d/%d loss %.3f %s(%.0f tok/s)", step, cfg.steps, record["loss"],
                     f"held-out {record['held_out_loss']:.3f} " if "held_out_loss" in record else "", rate)
    save()
    summary = {"step": step, "parameters": n_params, "held_out_loss": held_out_loss(model, corpus["held_out"], cfg.context)}
    summary["held_out_ppl"] = math.exp(summary["held_out_loss"])
    if export is not None:
        export_model(model, tokenizer, export, cfg, summary)
    return summary


def export_model(model, tokenizer, out_dir: Path, cfg: TrainConfig, summary: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
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
    steps = sorted(records)
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
