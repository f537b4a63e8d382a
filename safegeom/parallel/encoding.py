"""Tokenizing a prompt set over several processes: each rank its share, the whole set on every rank.

:func:`encode_dealt` is the ``encode`` the sharded twins pass to
:func:`~safegeom.models.chat.encode_set` (and :func:`~safegeom.activations.plan.encode_for`): each
rank encodes its round-robin share of the prompts (:func:`~safegeom.parallel.ranks.shard`) and
every rank gets the whole set back in input order, the same encodings as one process's for
``1/N`` of the tokenizing. :func:`load_everywhere` loads a prompt spec on every rank, a failure
on one stopping them all before the collective that follows.
"""

from __future__ import annotations

from collections.abc import Sequence

from safegeom.errors import SafegeomError
from safegeom.models import chat
from safegeom.models.chat import EncodedPrompt
from safegeom.parallel.ranks import all_or_none, gather, shard
from safegeom.prompts import Prompts, PromptSet, load_prompts

__all__ = ["encode_dealt", "load_everywhere"]


def encode_dealt(
    tokenizer, texts: Sequence[str], *, system: str | None, chat_template: str | None
) -> list[EncodedPrompt]:
    """:func:`~safegeom.models.chat.encode_prompts`, each rank encoding its round-robin share.

    A collective: every rank calls it with the same texts. In one process it is a plain call.

    Returns:
        Every prompt's encoding, in input order, on every rank.

    Raises:
        SafegeomError: an empty prompt set (on every rank), or what encoding raised on any rank.
    """
    if not texts:  # every rank holds the same texts, so every rank says it
        raise SafegeomError("empty prompt set: pass at least one prompt")
    mine = shard(len(texts))

    def own() -> list[EncodedPrompt]:  # a rank with no share (fewer prompts than ranks) has []
        chosen = [texts[i] for i in mine]
        if not chosen:
            return []
        return chat.encode_prompts(tokenizer, chosen, system=system, chat_template=chat_template)

    return gather(all_or_none(own), mine, len(texts), to="all")


def load_everywhere(prompts: Prompts) -> PromptSet:
    """:func:`~safegeom.prompts.load_prompts` on every rank; a failure on one stops every rank.

    Returns:
        The prompt set.
    """
    return all_or_none(load_prompts, prompts)
