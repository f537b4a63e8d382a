"""Load a tokenizer exactly as its ``tokenizer.json`` defines it, and prove it on every load.

transformers 5 saves a tokenizer built from a ``tokenizers.Tokenizer`` with
``"tokenizer_class": "TokenizersBackend"``. ``AutoTokenizer`` ignores that for some architectures
and builds the architecture's own class (``Qwen2Tokenizer``), which rebuilds a BPE pipeline from
the vocabulary and silently re-tokenizes: a WordLevel tokenizer saved beside a Qwen2 turns
``"<|user|> list three prime numbers <|end|> <|assistant|>"`` into ``['<|end|>', 'a', 'a']``.
Such tokenizers are loaded here with :class:`transformers.TokenizersBackend` (the class
``PreTrainedTokenizerFast`` names), which keeps ``tokenizer.json`` as it is and takes the special
tokens and chat template from ``tokenizer_config.json`` / ``chat_template.jinja``.

Whatever the class, :func:`check_tokenizer` then encodes a probe text (the added tokens and
ordinary words) with the loaded tokenizer and with the raw ``tokenizers.Tokenizer`` read from
``tokenizer.json``; a difference is a :class:`~safegeom.errors.ModelLoadError` naming the fix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from safegeom.errors import ModelLoadError

__all__ = ["PROBE_TEXT", "check_tokenizer", "load_tokenizer"]

PROBE_TEXT = (
    "Hello, world! How do I list three prime numbers?\n"
    "  Sure: 2, 3 and 5 (1234567890) — naïve café, tabs\tand   spaces."
)
"""Ordinary text the probe encodes after the tokenizer's own added tokens."""

_RAW_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
"""``tokenizer_class`` values that mean: the pipeline is exactly ``tokenizer.json``."""


def _local_file(location: str, name: str, common: dict[str, Any]) -> Path | None:
    """``location/name`` for a folder, the cached copy for a hub id, or ``None``."""
    path = Path(location) / name
    if path.is_file():
        return path
    if Path(location).is_dir():
        return None
    try:
        from transformers.utils import cached_file

        hit = cached_file(
            location,
            name,
            revision=common.get("revision"),
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
    except Exception:  # a hub id that cannot give this file: no check possible
        return None
    return Path(hit) if hit else None


def load_tokenizer(location: str, common: dict[str, Any]) -> Any:
    """Return the tokenizer at ``location`` (a folder or hub id), checked by :func:`check_tokenizer`.

    A ``tokenizer_config.json`` naming ``TokenizersBackend`` (or ``PreTrainedTokenizerFast``)
    with a ``tokenizer.json`` beside it loads as that file defines it; every other tokenizer
    loads through ``AutoTokenizer``. ``common`` holds ``trust_remote_code`` and ``revision``.

    Raises:
        ModelLoadError: the loaded tokenizer encodes differently from ``tokenizer.json``.
    """
    config_path = _local_file(location, "tokenizer_config.json", common)
    declared = None
    if config_path is not None:
        try:
            declared = json.loads(config_path.read_text(encoding="utf-8")).get("tokenizer_class")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            raise ModelLoadError(
                f"{config_path} is not a JSON object; re-save the tokenizer"
            ) from None
    raw_file = _local_file(location, "tokenizer.json", common)
    if declared in _RAW_CLASSES and raw_file is not None:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(location, **common)
    else:
        tokenizer = AutoTokenizer.from_pretrained(location, **common)
    if raw_file is not None:
        check_tokenizer(tokenizer, raw_file, declared)
    return tokenizer


def check_tokenizer(tokenizer: Any, tokenizer_json: Path, declared: str | None = None) -> None:
    """Check that ``tokenizer`` encodes a probe text exactly as ``tokenizer_json`` does.

    The probe is the file's added tokens (up to 32) followed by :data:`PROBE_TEXT`, encoded
    without special tokens on both sides.

    Raises:
        ModelLoadError: the token ids differ; the message shows both and names the fix.
    """
    from tokenizers import Tokenizer

    try:
        raw = Tokenizer.from_file(str(tokenizer_json))
    except Exception as err:  # the file itself is unreadable: the tokenizer cannot be trusted
        raise ModelLoadError(f"{tokenizer_json} cannot be read by tokenizers ({err})") from None
    added = [t.content for _, t in sorted(raw.get_added_tokens_decoder().items())][:32]
    probe = " ".join([*added, PROBE_TEXT])
    expected = raw.encode(probe, add_special_tokens=False).ids
    got = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    if got == expected:
        return
    n = next((i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b), None)
    n = min(len(got), len(expected)) if n is None else n
    shown = tokenizer.convert_ids_to_tokens(got[n : n + 4])
    wanted = [raw.id_to_token(i) for i in expected[n : n + 4]]
    raise ModelLoadError(
        f"the tokenizer loaded as {type(tokenizer).__name__} (tokenizer_class {declared!r}) "
        f"encodes differently from {tokenizer_json}: from token {n} it gives {shown}, the file "
        f'gives {wanted}; set "tokenizer_class": "TokenizersBackend" in tokenizer_config.json '
        "to load tokenizer.json as it is, or re-save the tokenizer with its own class"
    )
