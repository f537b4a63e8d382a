"""A model's vocabulary, read from its files without loading anything: size and fingerprint.

Two checkpoints share a tokenizer when their token → id maps are equal; the fingerprint hashes
that map (the model's vocabulary and the added tokens), so a re-saved ``tokenizer.json`` whose
other settings moved still matches, and a different vocabulary never does.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from safegeom.errors import ConfigError, ModelLoadError

__all__ = ["Vocabulary", "check_embedding", "check_same_vocabulary", "read_vocabulary"]


@dataclass(frozen=True)
class Vocabulary:
    """What a checkpoint folder says about its vocabulary."""

    embedding_rows: int | None
    """``vocab_size`` in config.json (the rows of the input embedding), if given."""
    tokenizer_size: int | None
    """Largest token id + 1 of the tokenizer, if its files can be read."""
    fingerprint: str | None
    """sha256 of the tokenizer's token → id map (or of its vocabulary file), if readable."""


def _config_rows(folder: Path) -> int | None:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    rows = text.get("vocab_size") if isinstance(text, dict) else None
    return int(rows) if isinstance(rows, int) else None


def _tokenizer_facts(folder: Path) -> tuple[int | None, str | None]:
    file = folder / "tokenizer.json"
    if file.is_file():
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
            vocab = dict(data["model"]["vocab"])
            added = {str(t["content"]): int(t["id"]) for t in data.get("added_tokens") or []}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError):
            return None, None
        if isinstance(next(iter(vocab.values()), 0), list):  # Unigram: [[piece, score], ...]
            vocab = {str(piece[0]): i for i, piece in enumerate(data["model"]["vocab"])}
        mapping = {**{str(k): int(v) for k, v in vocab.items()}, **added}
        digest = hashlib.sha256(json.dumps(sorted(mapping.items())).encode()).hexdigest()
        return (max(mapping.values()) + 1 if mapping else 0), digest
    for name in ("tokenizer.model", "vocab.json"):
        if (folder / name).is_file():
            return None, hashlib.sha256((folder / name).read_bytes()).hexdigest()
    return None, None


def read_vocabulary(
    model_folder: str | Path, tokenizer_folder: str | Path | None = None
) -> Vocabulary:
    """The vocabulary facts of a local checkpoint (``tokenizer_folder``: where its tokenizer
    lives, when elsewhere, e.g. an adapter's base).

    Returns:
        A :class:`Vocabulary`; each fact is ``None`` where the files do not say.
    """
    size, fingerprint = _tokenizer_facts(Path(tokenizer_folder or model_folder))
    return Vocabulary(_config_rows(Path(model_folder)), size, fingerprint)


def check_embedding(model: nn.Module, tokenizer_size: int, name: str) -> None:
    """Refuse a model whose input embedding has fewer rows than its tokenizer has tokens (a
    token id past the table would fail deep in the forward pass).

    Raises:
        ModelLoadError: the embedding is smaller than the tokenizer; the message names both.
    """
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embedding, "num_embeddings", None)
    if rows is not None and rows < tokenizer_size:
        raise ModelLoadError(
            f"{name}: its input embedding has {rows} rows but its tokenizer has {tokenizer_size} "
            "tokens; pass the tokenizer it was trained with (or resize the embedding and save it)"
        )


def check_same_vocabulary(base: Vocabulary, other: Vocabulary, spec: str, base_spec: str) -> None:
    """Refuse a checkpoint whose vocabulary is not its base's, or whose embedding is smaller than
    its tokenizer (facts the files do not give are not compared).

    Raises:
        ModelLoadError: an embedding with fewer rows than its tokenizer has tokens.
        ConfigError: another embedding size or another tokenizer than the base's.
    """
    for vocab, name in ((base, base_spec), (other, spec)):
        rows, size = vocab.embedding_rows, vocab.tokenizer_size
        if rows is not None and size is not None and rows < size:
            raise ModelLoadError(
                f"{name}: its embedding has {rows} rows (vocab_size in config.json) but its "
                f"tokenizer has {size} tokens; pass the tokenizer it was trained with"
            )
    if None not in (base.embedding_rows, other.embedding_rows) and (
        base.embedding_rows != other.embedding_rows
    ):
        raise ConfigError(
            f"checkpoint {spec} has a vocabulary of {other.embedding_rows} tokens but the base "
            f"{base_spec} has {base.embedding_rows}; audit checkpoints fine-tuned from this base"
        )
    if None not in (base.fingerprint, other.fingerprint) and base.fingerprint != other.fingerprint:
        raise ConfigError(
            f"checkpoint {spec} has another tokenizer than the base {base_spec} (their token ids "
            "differ); audit checkpoints fine-tuned from this base"
        )
