"""The capture plan: sites, layers, positions, batch size and the encoded prompts, resolved once.

Both backends (:mod:`safegeom.activations.hooks_backend`, :mod:`safegeom.activations.transformer_lens`)
read only this plan; the batch loop (:mod:`safegeom.activations.loop`) runs either.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from safegeom.activations.config import CaptureConfig
from safegeom.artifacts import Provenance
from safegeom.batching import auto_batch_size
from safegeom.config import config_dict
from safegeom.errors import ConfigError, SafegeomError
from safegeom.models.chat import EncodedPrompt, EncodedSet, Encoder, encode_set, is_pre_encoded
from safegeom.models.loading import LoadedModel
from safegeom.models.positions import PositionPlan, plan_positions
from safegeom.prompts import Prompts, PromptSet, load_prompts

__all__ = [
    "CapturePlan",
    "capture_batch_size",
    "encode_for",
    "plan_capture",
]


@dataclass(frozen=True)
class CapturePlan:
    """A resolved capture request for one model and prompt set."""

    prompts: EncodedSet
    """The prompt set, tokenized once (name, content hash and template hash included)."""
    encoded: tuple[EncodedPrompt, ...]
    """``prompts.encoded``: one encoding per prompt, in input order."""
    sites: tuple[str, ...]
    layers: tuple[int, ...]
    """Model layers, sorted and non-negative."""
    positions: PositionPlan
    dtype: torch.dtype
    """Storage dtype of the captured activations."""
    batch_size: int
    system: str | None
    backend: str = "hooks"
    """``hooks`` or ``transformer_lens``."""
    config: CaptureConfig = field(default_factory=CaptureConfig)
    """The config the plan was resolved from (recorded in the provenance)."""

    def provenance(self, lm: LoadedModel) -> Provenance:
        """Provenance of activations captured with this plan: model, weight hash, prompt-set
        hash, the config, and sites, layers, positions, dtype, backend, template hash, system
        prompt and prompt count in ``extra``."""
        return Provenance(
            model=lm.name,
            weight_hash=lm.weight_hash,
            prompt_sets={self.prompts.name: self.prompts.content_hash},
            config=config_dict(self.config),
            extra={
                "sites": list(self.sites),
                "layers": list(self.layers),
                "positions": list(self.positions.labels),
                "dtype": str(self.dtype).removeprefix("torch."),
                "backend": self.backend,
                "template_hash": self.prompts.template_hash,
                "system": self.system,
                "n_prompts": len(self.encoded),
            },
        )


def capture_batch_size(lm: LoadedModel, max_len: int, n_pos: int, n_layers: int) -> int:
    """Prompts per capture pass, from :func:`safegeom.batching.auto_batch_size` with the
    memory one prompt's forward pass and buffers take.

    Returns:
        A batch size between 1 and 64 (CPU) or 512 (CUDA).
    """
    per_prompt = 0
    if lm.device.type == "cuda":
        config = lm.base.config
        width = getattr(config, "intermediate_size", 4 * lm.d_model) * 3 + lm.d_model * 6
        per_token = width * torch.finfo(lm.dtype).bits // 8
        per_prompt = per_token * max_len + n_layers * n_pos * lm.d_model * 4
    return auto_batch_size(lm.device, max_len, per_prompt, gpu_cap=512)


def _user_error(err: ValueError) -> SafegeomError:
    return err if isinstance(err, SafegeomError) else ConfigError(str(err))


def encode_for(
    lm: LoadedModel,
    prompts: Prompts | EncodedSet,
    system: str | None,
    *,
    load: Callable[[Prompts], PromptSet] = load_prompts,
    encode: Encoder | None = None,
) -> EncodedSet:
    """``prompts`` encoded for ``lm`` (an :class:`EncodedSet` with the same system prompt and
    template is used as it is). ``load`` and ``encode`` replace :func:`~safegeom.prompts.load_prompts`
    and the tokenizing (:func:`~safegeom.models.chat.encode_set`); the sharded capture of
    :mod:`safegeom.parallel` passes its own.

    Raises:
        SafegeomError: an unknown or empty prompt set, or a prompt longer than the model's
            positions.
    """
    limit = lm.max_positions
    try:
        if isinstance(prompts, EncodedSet) or is_pre_encoded(prompts):  # an attack set: its ids
            source: PromptSet | EncodedSet = prompts  # type: ignore[assignment]
        else:
            source = load(prompts)
        encoded = encode_set(
            lm.tokenizer,
            source,
            system=system,
            chat_template=lm.chat_template,
            max_positions=limit,
            encode=encode,
        )
    except ValueError as err:
        raise _user_error(err) from None
    if len(encoded) == 0:
        raise SafegeomError("empty prompt set: pass at least one prompt")
    longest = max(len(e) for e in encoded.encoded)
    if limit is not None and longest > limit:  # an EncodedSet passed through unchecked
        raise SafegeomError(
            f"a prompt is {longest} tokens long but the model takes at most {limit} positions; "
            "shorten or drop it"
        )
    return encoded


def _check_offsets(plan: PositionPlan, encoded: Sequence[EncodedPrompt]) -> None:
    shortest = min(len(e) for e in encoded)
    for item in plan.items:
        if isinstance(item, int) and not -shortest <= item < shortest:
            raise ConfigError(f"position offset {item} lies outside a prompt of {shortest} tokens")


def plan_capture(
    lm: LoadedModel, prompts: Prompts | EncodedSet, config: CaptureConfig = CaptureConfig()
) -> CapturePlan:
    """Resolve sites, layers, positions and batch size, and tokenize the prompts (once).

    ``config`` says what to capture (``plan_capture(lm, p, CaptureConfig(layers="2-5"))``); see
    :class:`CaptureConfig`.

    Returns:
        The :class:`CapturePlan`.

    Raises:
        SafegeomError: an empty or unknown prompt set, a prompt longer than the model's
            positions, an unknown site or position, a layer or offset out of range.
    """
    encoded = encode_for(lm, prompts, config.system)
    try:
        positions = plan_positions(config.positions.items, encoded.encoded)
        layer_ids = config.layers.resolve(lm.n_layers)
    except ValueError as err:
        raise _user_error(err) from None
    _check_offsets(positions, encoded.encoded)
    max_len = max(len(e) for e in encoded.encoded)
    size = config.batch_size or capture_batch_size(
        lm, max_len, positions.n_positions, len(layer_ids)
    )
    return CapturePlan(
        prompts=encoded,
        encoded=encoded.encoded,
        sites=config.sites,
        layers=layer_ids,
        positions=positions,
        dtype=config.torch_dtype or lm.dtype,
        batch_size=size,
        system=config.system,
        backend=config.backend,
        config=config,
    )
