"""Helpers shared by several carrier modules: the prompt alias, provenance, layer and k checks.

- :data:`Prompts`: what every carrier function accepts as a prompt set (a
  :class:`~safegeom.prompts.PromptSet`, a spec such as ``advbench:train``, or strings); the one
  alias of the package, defined in :mod:`safegeom.generation`.
- :func:`prompt_provenance`: the typed :class:`~safegeom.artifacts.Provenance` of a carrier fitted
  on a harmful and a harmless set.
- :func:`default_layer`: the layer a carrier is extracted at.
- :func:`check_k`: a subspace dimension in range.
- :func:`encode` and :func:`subset`: a prompt set tokenized once for a model
  (:class:`~safegeom.models.chat.EncodedSet`) and a part of it, sharing the encodings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from safegeom.artifacts import Provenance
from safegeom.errors import ConfigError
from safegeom.models.chat import EncodedSet, encode_set
from safegeom.models.loading import LoadedModel
from safegeom.models.positions import parse_layers
from safegeom.prompts import Prompts, PromptSet, load_prompts

__all__ = [
    "Prompts",
    "as_prompts",
    "check_k",
    "default_layer",
    "encode",
    "prompt_provenance",
    "subset",
]


def as_prompts(prompts: Prompts | EncodedSet) -> PromptSet | EncodedSet:
    """An :class:`EncodedSet` as it is; anything else loaded as a :class:`PromptSet`."""
    return prompts if isinstance(prompts, EncodedSet) else load_prompts(prompts)


def encode(
    lm: LoadedModel, prompts: Prompts | EncodedSet, system: str | None, *, take: int | None = None
) -> EncodedSet:
    """``prompts`` (the first ``take`` of them) tokenized once for ``lm``'s chat template.

    An :class:`EncodedSet` made with the same system prompt and template is reused as it is.

    Returns:
        The :class:`EncodedSet` (its name and content hash are the prompt set's).

    Raises:
        SafegeomError: an empty or unknown prompt set, or a prompt longer than the model's
            positions.
    """
    if not isinstance(prompts, EncodedSet):
        prompts = load_prompts(prompts)
        if take is not None:
            prompts = prompts.take(take)
    elif take is not None and take < len(prompts):
        prompts = subset(prompts, range(take))
    return encode_set(
        lm.tokenizer,
        prompts,
        system=system,
        chat_template=lm.chat_template,
        max_positions=lm.max_positions,
    )


def subset(
    encoded: EncodedSet, indices: Sequence[int], source: PromptSet | None = None
) -> EncodedSet:
    """The prompts of ``encoded`` at ``indices``, sharing their encodings.

    Returns:
        An :class:`EncodedSet` named as ``encoded`` whose content hash is that of ``source`` (the
        same subset as a :class:`~safegeom.prompts.PromptSet`, when the caller has it), else of
        the kept texts.
    """
    part = encoded.select(list(indices))
    like = source if source is not None else PromptSet(name=encoded.name, prompts=part.prompts)
    return dataclasses.replace(part, name=like.name, content_hash=like.content_hash)


def prompt_provenance(
    lm: LoadedModel,
    harmful: PromptSet | EncodedSet,
    harmless: PromptSet | EncodedSet,
    **extra: Any,
) -> Provenance:
    """Provenance shared by carriers.

    Returns:
        A :class:`~safegeom.artifacts.Provenance` with the model name and weight hash, the two
        prompt sets (name → content hash) and, in ``extra``, the historical flat keys
        (``harmful``, ``harmful_hash``, ``harmless``, ``harmless_hash``, ``n_harmful``,
        ``n_harmless``) plus ``extra``.
    """
    names = (harmful.name, harmless.name)
    if names[0] == names[1]:  # two inline sets: keep both hashes
        names = (f"harmful:{names[0]}", f"harmless:{names[1]}")
    return Provenance(
        model=lm.name,
        weight_hash=lm.weight_hash,
        prompt_sets={names[0]: harmful.content_hash, names[1]: harmless.content_hash},
        extra={
            "harmful": harmful.name,
            "harmful_hash": harmful.content_hash,
            "harmless": harmless.name,
            "harmless_hash": harmless.content_hash,
            "n_harmful": len(harmful),
            "n_harmless": len(harmless),
            **extra,
        },
    )


def default_layer(lm: LoadedModel, layer: int | None, refusal: Any = None) -> int:
    """The layer a carrier is extracted at.

    Returns:
        ``layer`` when given (negative counts from the end), else the layer of ``refusal`` (a
        :class:`~safegeom.carriers.carrier.Carrier`), else the middle layer ``n_layers // 2``.

    Raises:
        SafegeomError: the layer is out of range, or ``refusal`` was found on a model of another
            hidden size.
    """
    if layer is None and refusal is not None:
        refusal.check_model(lm.d_model)
        layer = refusal.layer
    if layer is None:
        layer = lm.n_layers // 2
    return parse_layers(int(layer), lm.n_layers)[0]


def check_k(k: int, upper: int, what: str = "cone dimension k") -> int:
    """Return ``k`` when ``1 ≤ k ≤ upper``.

    Raises:
        ConfigError: ``k`` is not a whole number in ``[1, upper]`` (the message names the range).
    """
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= upper:
        raise ConfigError(f"{what} must be between 1 and {upper}, got {k}")
    return k
