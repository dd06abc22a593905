"""Load the model the user configured (or the embedded default) as any transformers user would.

Offline unless the user allowed downloads; ``trust_remote_code`` only when the user set it.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .rope import FAR_BIAS_MODES

log = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path(__file__).parent / "default"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class ModelLoadError(RuntimeError):
    """The model cannot be loaded; the message says why and what to do."""


@dataclass
class FimFormat:
    """How a model expects fill-in-the-middle prompts."""

    prefix: str | None
    suffix: str | None
    middle: str | None
    order: str = "psm"  # "psm": prefix, suffix, middle; "spm": suffix, prefix, middle
    file_separator: str | None = None

    @property
    def available(self) -> bool:
        return None not in (self.prefix, self.suffix, self.middle)


# special token spellings of common code model families, tried in order
FIM_SPELLINGS = [
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|file_sep|>"),  # Qwen2.5-Coder, ours
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<file_sep>"),  # StarCoder
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>", None),  # DeepSeek-Coder
    ("<PRE>", "<SUF>", "<MID>", None),  # CodeLlama
]


def fim_format(tokenizer, model_dir: Path | None) -> FimFormat:
    vocab = tokenizer.get_vocab()
    order = "psm"
    if model_dir is not None and (model_dir / "training.json").exists():
        order = json.loads((model_dir / "training.json").read_text()).get("fim_order", "psm")
    for prefix, suffix, middle, sep in FIM_SPELLINGS:
        if prefix in vocab and suffix in vocab and middle in vocab:
            return FimFormat(prefix, suffix, middle, order, sep if sep in vocab else None)
    return FimFormat(None, None, None)


def pick_device(device: str | None) -> str:
    if device in (None, "", "auto"):
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    return device


# on a CPU with bfloat16 instructions, a model this large runs its prompt ~1.7x faster in bfloat16 (0.5B
# shape, 4,096 tokens: 6.5 against 10.8 ms/token, one thread); the embedded model (5.9 M) gains little
# there and keeps float32, the precision every quality figure in the README was measured at
CPU_BF16_MIN_PARAMETERS = 100_000_000


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX), not by converting to float32."""
    return any(getattr(torch.cpu, probe, lambda: False)()
               for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def pick_dtype(dtype: str | None, device: str, parameters: int | None = None) -> torch.dtype:
    """The weights' precision; ``parameters``: the model's size where known (auto on a CPU depends on it)."""
    if dtype in (None, "", "auto"):
        if device == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device == "mps":
            return torch.float16
        if parameters is not None and parameters >= CPU_BF16_MIN_PARAMETERS and cpu_has_bf16():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {', '.join(sorted(DTYPES))} or auto")
    return DTYPES[dtype]


def parameter_count(source: str, **kwargs) -> int | None:
    """The model's parameters, counted on an empty shell built from its config (no weights read);
    None where the config cannot be read or built so (then loading says why, or auto stays float32)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
        with torch.device("meta"):
            shell = AutoModelForCausalLM.from_config(config, trust_remote_code=kwargs.get("trust_remote_code", False))
    except (OSError, ValueError, KeyError, RuntimeError, NotImplementedError):
        return None
    return sum(p.numel() for p in shell.parameters())


# "org/name" or a bare name, as the hub spells ids: dots are part of names (Qwen2.5-Coder-1.5B)
HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


LANGUAGE_FAMILIES = {"typescriptreact": "typescript"}
# where the card has no entry for a language, the entry of the nearest language it has (TypeScript is
# JavaScript with types; no TypeScript package is held out here to choose its own)
CARD_FALLBACKS = {"typescriptreact": "typescript", "typescript": "javascript"}


def trained_languages(lm) -> frozenset[str] | None:
    """The languages a model was trained on where its ``training.json`` names them (the models this
    project trains); None for any other model: it may know any language."""
    card = Path(getattr(lm.config, "_name_or_path", "") or "") / "training.json"
    if not card.is_file():
        return None
    languages = json.loads(card.read_text()).get("languages")
    return frozenset(languages) if languages else None


def _card_entry(lm, key: str, what: str) -> tuple[Path, object]:
    """(the model's ``training.json``, its ``key`` entry); the entry is None where the model has no card,
    the card is unreadable (a warning naming ``what``) or records none."""
    card = Path(getattr(lm.config, "_name_or_path", "") or "") / "training.json"
    if not card.is_file():
        return card, None
    try:
        return card, json.loads(card.read_text()).get(key)
    except (OSError, ValueError, AttributeError) as err:
        log.warning("cannot read the %s recorded in %s: %s", what, card, err)
        return card, None


def recommended_far_bias(lm) -> tuple[float | tuple[float, ...], str] | None:
    """``(far_bias, far_bias_mode)`` chosen for this model on held-out code, where its ``training.json``
    records one (``far_bias``, written by ``hirope-lsp calibrate far-bias --write``; a list is one value per
    layer, given as a tuple); None for any other model, or where the record is unreadable, not numbers
    >= 0 with one of ``FAR_BIAS_MODES``, or a list whose length is not the model's number of layers."""
    card, record = _card_entry(lm, "far_bias", "far bias")
    if record is None:
        return None
    value = record.get("value") if isinstance(record, dict) else None
    mode = record.get("mode", "constant") if isinstance(record, dict) else None
    values = value if isinstance(value, list) and value else [value]
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf") for v in values) \
            or mode not in FAR_BIAS_MODES:
        log.warning("ignoring the far bias recorded in %s: %r", card, record)
        return None
    layers = getattr(lm.config, "num_hidden_layers", None)
    if isinstance(value, list) and layers is not None and len(value) != layers:
        log.warning("ignoring the far bias recorded in %s: %d values for a model of %d layers", card, len(value),
                    layers)
        return None
    return (tuple(float(v) for v in value) if isinstance(value, list) else float(value)), mode


def _recorded(lm, key: str, what: str, language: str | None, parse, main_field: str):
    """``parse`` of the card's ``key`` record: of its entry for ``language`` (``key.languages.<language>``)
    where it has one (or one for the nearest language it has, ``CARD_FALLBACKS``), else of the record's
    own fields (a record with only ``languages`` has none); a bad entry or record is ignored with a
    warning naming ``what``."""
    card, record = _card_entry(lm, key, what)
    if record is None:
        return None
    languages = record.get("languages") if isinstance(record, dict) else None
    while language is not None and isinstance(languages, dict) and language not in languages:
        language = CARD_FALLBACKS.get(language)
    if language is not None and isinstance(languages, dict):
        chosen = parse(languages[language])
        if chosen is not None:
            return chosen
        log.warning("ignoring the %s %s recorded in %s: %r", language, what, card, languages[language])
    if isinstance(languages, dict) and main_field not in record:
        return None
    chosen = parse(record)
    if chosen is None:
        log.warning("ignoring the %s recorded in %s: %r", what, card, record)
    return chosen


def recommended_copy(lm, language: str | None = None):
    """The copy model's settings chosen for this model on held-out code, where its ``training.json``
    records them (``copy``: ``{"weight": w, "min_order": n}``, written by ``hirope-lsp calibrate copy
    --write``); with ``language``, the entry chosen for that language where the record has one
    (``copy.languages.<language>``, written by ``calibrate copy --language``), else the record's own.
    None for any other model or an unreadable record (a warning)."""
    return _recorded(lm, "copy", "copy model", language, _copy_from_record, "weight")


def _copy_from_record(record):
    from .copying import CopySettings

    try:
        weight, order = record["weight"], record.get("min_order", CopySettings.min_order)
        if isinstance(weight, bool) or isinstance(order, bool) or not isinstance(order, int):
            raise TypeError(record)
        settings = CopySettings(weight=float(weight), min_order=order)
        settings.validate()
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    return settings


def recommended_min_confidence(lm, language: str | None = None) -> float | None:
    """The confidence gate chosen for this model on held-out code, where its ``training.json`` records one
    (``min_confidence``, written by ``hirope-lsp calibrate confidence --write``; per language as for
    ``recommended_copy``): a mean log-probability per token (<= 0) below which a suggestion is not shown;
    None for any other model or an unreadable record."""
    return _recorded(lm, "min_confidence", "confidence gate", language, _gate_from_record, "value")


def _gate_from_record(record) -> float | None:
    value = record.get("value") if isinstance(record, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1e6 < value <= 0:
        return None
    return float(value)


def knows_language(languages: frozenset[str] | None, language: str | None) -> bool:
    return languages is None or LANGUAGE_FAMILIES.get(language, language) in languages


def load_model(model: str | None = None, *, device: str | None = "auto", dtype: str | None = "auto",
               trust_remote_code: bool = False, allow_download: bool = False):
    """(model, tokenizer, FimFormat) for a local directory, a hub id (cached, or downloaded if allowed),
    or the embedded default model when ``model`` is empty."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = str(DEFAULT_MODEL_DIR) if not model else model
    path = Path(source).expanduser()
    local = path.is_dir()
    if not local and not HUB_ID.match(source):
        raise ModelLoadError(f"model directory {source} does not exist")
    device = pick_device(device)
    kwargs = dict(trust_remote_code=trust_remote_code, local_files_only=local or not allow_download)
    sized = device == "cpu" and dtype in (None, "", "auto")
    torch_dtype = pick_dtype(dtype, device, parameter_count(str(path) if local else source, **kwargs) if sized else None)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path) if local else source, **kwargs)
        lm = AutoModelForCausalLM.from_pretrained(str(path) if local else source, dtype=torch_dtype,
                                                  attn_implementation="sdpa", **kwargs)
    except OSError as err:
        if not local and not allow_download:
            raise ModelLoadError(
                f"model {source!r} is not in the HuggingFace cache ({_hub_cache()}) and downloads are off: "
                "set allowDownload (hirope-lsp --allow-download) to fetch it from the hub, or give a local directory"
            ) from err
        raise ModelLoadError(f"cannot load model {source!r}: {err}") from err
    except ValueError as err:
        raise ModelLoadError(f"cannot load model {source!r}: {err}") from err
    try:
        lm = lm.to(device)
    except (RuntimeError, torch.OutOfMemoryError) as err:
        raise ModelLoadError(f"cannot place model {source!r} on {device}: {err}") from err
    lm.eval()
    return lm, tokenizer, fim_format(tokenizer, path if local else None)
