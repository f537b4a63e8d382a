"""What the intervention and edit tests share: a padded batch's logits and a hook count."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from safegeom.models import LoadedModel, collate_left, encode_prompts


def prompt_logits(lm: LoadedModel, prompts: Sequence[str]) -> torch.Tensor:
    """Logits ``[n, seq, vocab]`` of the chat-formatted ``prompts`` as one left-padded batch."""
    batch = collate_left(encode_prompts(lm.tokenizer, list(prompts)), lm.tokenizer.pad_token_id)
    with torch.no_grad():
        return lm.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
        ).logits


def hook_count(lm: LoadedModel) -> int:
    """Forward and forward-pre hooks registered anywhere in the model."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules())
