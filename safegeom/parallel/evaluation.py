"""Generation and refusal scores over several processes, for :mod:`safegeom.evaluation`.

:func:`~safegeom.evaluation.evaluate` (its generation) and :func:`~safegeom.evaluation.refusal_scores`
hand over to these twins when the entry points installed them
(:func:`safegeom.parallel.dispatch.sharding`) and a launcher started more than one process; one
process never does. Each rank takes its share of the batches one process would run (the batch
size one process would pick for the whole set, the smallest over the ranks where it depends on
free memory), runs them, and every rank gets all completions or scores back in input order:
equal to one process's, bit for bit. The intervention is entered by the caller on every rank.

Launch::

    accelerate launch --num_processes 2 -m safegeom.cli evaluate MODEL --prompts SPEC --out FILE
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from safegeom.batching import longest_first
from safegeom.generation import generate, generation_batch_size
from safegeom.models.chat import EncodedSet, encode_set
from safegeom.models.loading import LoadedModel
from safegeom.parallel.encoding import encode_dealt, load_everywhere
from safegeom.parallel.ranks import all_or_none, collect, deal, gather, is_main
from safegeom.prompts import Prompts

__all__ = ["generate_sharded", "my_prompts", "refusal_scores_sharded"]


def my_prompts(
    lm: LoadedModel, lengths: Sequence[int], extra: int, batch_size: int | None
) -> tuple[list[int], int]:
    """This rank's prompts and the batch size every rank uses.

    ``extra`` is added to the longest prompt when sizing batches (``max_new_tokens`` for
    generation, as one process does).

    Returns:
        ``(indices, size)``: this rank's prompt indices in input order (whole batches of the
        one-process plan), and the prompts per batch.
    """
    own = generation_batch_size(lm.model, max(lengths, default=1) + extra, batch_size)
    size = min(collect(own, to="all") or [own])
    mine = sorted(i for batch in deal(longest_first(lengths, size)) for i in batch)
    return mine, size


def _sharded(
    lm: LoadedModel,
    prompts: Prompts,
    system: str | None,
    extra: int,
    batch_size: int | None,
    run: Callable[[EncodedSet, int], Any],
) -> tuple[list[int], Any, int]:
    """This rank's prompt indices, ``run(its prompts, batch size)`` (``None``: it has none), and
    the number of prompts. Each rank tokenizes its share of the prompts once (dealt)."""
    pre_encoded = callable(getattr(prompts, "encoded_for", None))  # an attack set keeps its ids
    texts = prompts if pre_encoded else load_everywhere(prompts)
    encoded = encode_set(
        lm.tokenizer,
        texts,
        system=system,
        chat_template=lm.chat_template,
        max_positions=lm.max_positions,
        encode=encode_dealt,
    )
    mine, size = my_prompts(lm, [len(e) for e in encoded.encoded], extra, batch_size)
    local = all_or_none(lambda: run(encoded.select(mine), size) if mine else None)
    return mine, local, len(encoded)


def generate_sharded(
    lm: LoadedModel,
    prompts: Prompts,
    *,
    max_new_tokens: int,
    batch_size: int | None,
    system: str | None,
    progress: bool,
) -> tuple[str, ...]:
    """Greedy completions (:func:`~safegeom.generation.generate`) over every process.

    Returns:
        On every rank, one completion per prompt, in input order.
    """

    def run(texts: EncodedSet, size: int) -> tuple[str, ...]:
        return generate(
            lm,
            texts,
            max_new_tokens=max_new_tokens,
            batch_size=size,
            system=system,
            progress=progress and is_main(),
        )

    mine, local, n = _sharded(lm, prompts, system, max_new_tokens, batch_size, run)
    return tuple(gather(list(local or ()), mine, n, to="all"))


def refusal_scores_sharded(
    lm: LoadedModel,
    prompts: Prompts,
    local_scores: Callable[..., Tensor],
    *,
    tokens: Sequence[int] | None,
    batch_size: int | None,
    system: str | None,
    progress: bool,
) -> Tensor:
    """Refusal scores over every process; ``local_scores`` is the one-process scorer.

    Returns:
        On every rank, the float64 CPU tensor ``[n]`` of log-odds (nats), in input order.
    """

    def run(texts: EncodedSet, size: int) -> Tensor:
        return local_scores(
            lm,
            texts,
            tokens=tokens,
            batch_size=size,
            system=system,
            progress=progress and is_main(),
        )

    mine, local, n = _sharded(lm, prompts, system, 0, batch_size, run)
    empty = torch.empty(0, dtype=torch.float64)
    return gather(empty if local is None else local, mine, n, to="all")
