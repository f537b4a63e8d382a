"""RefusalGuard's geometry (docs/methods.md §6, a proposal): settings, refusal-cone bases, penalty.

From the frozen aligned model, before any update, :func:`fit_guard_cones` fits one refusal-cone
basis ``B_l`` (``d × k``, orthonormal columns) per layer of the set S at ``resid_pre``, and, when
``readout`` is on, the *readout cone* ``B_out`` of the final hidden state (the output of the final
norm, the LM head's input) at the last prompt token. :class:`GeometryPenalty` caches the frozen
model's cone coordinates ``Bᵀ h_frozen`` on a calibration set of harmful and harmless prompts once,
and scores the trained model with

    penalty = Σ_sites mean_{prompts, positions} ‖Bᵀ (h_θ − h_frozen)‖²      (squared activation units)

where the block sites use every real prompt token (or only the last one, ``cone_positions``) and
the readout site uses the last prompt token. The loss adds ``λ_geom · penalty``.

Why the readout (measured on ``tiny-chat``, docs/methods.md §6): a LoRA on a harmful + benign
mixture keeps the block inputs' cone coordinates in place under the penalty and still loses refusal,
because the later layers and the head learn to read them differently. Holding the readout cone's
coordinates is what keeps the refusal behaviour; ``readout=False`` gives the block-only penalty
for comparison.

Our choices where the paper is silent (all in :class:`GuardConfig`): the cheap cone (the RDO cone
is an option), the readout cone (diff-in-means and top singular vectors of the per-prompt
differences at the last prompt token, orthonormalised), calibration prompts drawn from the bundled
``:train`` splits, and a random calibration mini-batch per step (``calib_batch``, or the whole set
when 0) every ``penalty_every`` steps, so the step cost stays near a LoRA step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from safegeom.carriers.cones import cheap_cone, gram_schmidt
from safegeom.config import check
from safegeom.errors import ConfigError, SafegeomError
from safegeom.generation import encode_chat
from safegeom.hooks import Hook, attach
from safegeom.models.layout import resolve
from safegeom.models.loading import LoadedModel
from safegeom.models.positions import parse_layers
from safegeom.prompts import PromptSet, combine_prompts
from safegeom.training.data import Example, collate_right

__all__ = [
    "READOUT",
    "GeometryPenalty",
    "GuardConfig",
    "calibration_sets",
    "fit_guard_cones",
    "guard_layers",
]

READOUT = -1
"""Key of the readout cone (final hidden state) among the per-layer bases."""


@dataclass(frozen=True)
class GuardConfig:
    """RefusalGuard settings (``safegeom train refusalguard``; docs/methods.md §6, our proposal)."""

    variant: Literal["reft", "lora"] = "lora"
    """lora: LoRA with the geometry penalty (the default: on tiny-chat ``mix`` it holds refusal at
    full task accuracy); reft: a cone-projected LoReFT edit per layer, base frozen (the paper's
    representation form; on tiny-chat it learns the benign task to ~0.55 held-out accuracy only)."""
    guard_layers: str = "1:"
    """The layer set S (a layer spec: 1: = every block but the first, 2:6 end-exclusive, 2-5
    inclusive, 1,3, all): edited
    layers and penalised cones. Block 0's input is the token embedding, where the chat template's
    tokens after the instruction are the same for every prompt: it has no refusal cone."""
    cone: Literal["cheap", "rdo"] = "cheap"
    """How each layer's refusal cone is found: the cheap cone, or RDO (gradient descent, slower)."""
    cone_k: int = 3
    """Cone dimension k of every basis."""
    readout: bool = True
    """Also hold the cone of the final hidden state (the head's input) at the last prompt token."""
    layer_cones: bool = True
    """Penalise the layer cones of S (at resid_pre); off: the readout cone alone (the reft edit
    still keeps off its layers' cones by construction)."""
    cone_positions: Literal["all", "last"] = "all"
    """Prompt tokens where the layer cones are penalised: every real prompt token, or the last."""
    lambda_geom: float = 0.3
    """λ_geom: weight of the geometry penalty (0: no penalty)."""
    calib_harmful: tuple[str, ...] = ("advbench:train", "jbb-harmful:train", "directharm4:train")
    """Harmful calibration prompt sets (combined, then sampled); also fit the cones."""
    calib_harmless: tuple[str, ...] = ("alpaca:train",)
    """Harmless calibration prompt sets."""
    n_calib: int = 48
    """Calibration prompts per class."""
    penalise_harmless: bool = False
    """Also hold the coordinates on the harmless calibration prompts (default: harmful prompts
    only; the harmless ones still fit the cones). On tiny-chat ``mix`` (LoRA, λ 0.3, lr 2e-3)
    holding both gave 0.695 held-out task accuracy, harmful only 0.79, at equal refusal."""
    calib_batch: int = 8
    """Calibration prompts per penalised step (half from each class); 0: all of them."""
    penalty_every: int = 2
    """Compute the penalty every this many steps (1: every step; 2 keeps the step cost near a
    LoRA step's; see benchmarks/bench_train.py)."""
    reft_rank: int = 8
    """Rank r of each layer's edit (reft variant)."""
    reft_first: int = 5
    """Edit the first this many prompt tokens (reft variant)."""
    reft_last: int = 5
    """Edit the last this many prompt tokens (reft variant)."""
    reft_generated: bool = True
    """Also edit the answer (and generated) tokens (reft variant). LoReFT edits prompt tokens
    only; on tiny-chat that learns sentiment to a loss of 2.1 in 150 steps, against 0.26 with
    this on (rank 8, lr 1e-2): the edit cannot carry the answer through attention alone."""

    def __post_init__(self) -> None:
        """Coerce the prompt-set lists to tuples and check every range.

        Raises:
            ConfigError: a value out of range; the message names the field and its flag.
        """
        for name in ("calib_harmful", "calib_harmless"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
            check(bool(getattr(self, name)), name, "must name at least one prompt set", value)
        check(self.variant in ("reft", "lora"), "variant", "must be reft or lora", self.variant)
        check(self.cone in ("cheap", "rdo"), "cone", "must be cheap or rdo", self.cone)
        check(self.cone_k >= 1, "cone_k", "must be at least 1", self.cone_k)
        ok = self.cone_positions in ("all", "last")
        check(ok, "cone_positions", "must be all or last", self.cone_positions)
        lam = self.lambda_geom
        check(math.isfinite(lam) and lam >= 0, "lambda_geom", "must be 0 or more", lam)
        check(
            self.n_calib >= 1,
            "n_calib",
            "must be at least 1 (an empty calibration set)",
            self.n_calib,
        )
        check(self.calib_batch >= 0, "calib_batch", "must be 0 (all) or more", self.calib_batch)
        check(self.penalty_every >= 1, "penalty_every", "must be at least 1", self.penalty_every)
        check(self.reft_rank >= 1, "reft_rank", "must be at least 1", self.reft_rank)
        check(self.reft_first >= 0, "reft_first", "must be 0 or more", self.reft_first)
        check(self.reft_last >= 0, "reft_last", "must be 0 or more", self.reft_last)
        some = self.reft_first + self.reft_last > 0
        check(some, "reft_last", "and reft_first are both 0: nothing would be edited", 0)


def calibration_sets(config: GuardConfig, seed: int = 0) -> tuple[PromptSet, PromptSet]:
    """The harmful and harmless calibration prompts (a deterministic sample of ``n_calib`` each).

    Raises:
        ConfigError: a calibration set is empty or cannot be read (the message names its flag).
    """
    out = []
    for name, specs in (
        ("calib_harmful", config.calib_harmful),
        ("calib_harmless", config.calib_harmless),
    ):
        flag = f"{name} (--{name.replace('_', '-')})"
        try:
            pool = combine_prompts(list(specs))
        except SafegeomError as err:
            raise ConfigError(f"{flag}: {err}") from None
        if len(pool) == 0:
            raise ConfigError(f"{flag} gives an empty calibration set")
        out.append(pool.sample(min(config.n_calib, len(pool)), seed=seed))
    return out[0], out[1]


def guard_layers(lm: LoadedModel, config: GuardConfig) -> tuple[int, ...]:
    """The layer set S resolved against ``lm`` (a layer out of range is a ConfigError)."""
    try:
        return tuple(parse_layers(config.guard_layers, lm.n_layers))
    except SafegeomError as err:
        raise ConfigError(f"guard_layers (--guard-layers): {err}") from None


def _final_norm(lm: LoadedModel) -> torch.nn.Module:
    return resolve(lm.base, lm.layout.final_norm)


def _readout_states(lm: LoadedModel, prompts: PromptSet) -> Float[Tensor, "n d"]:
    """Final-norm outputs at the last prompt token, float64, from the frozen model."""
    encoded = encode_chat(lm, prompts, None)
    rows = [Example(tuple(e.input_ids), len(e.input_ids)) for e in encoded]
    out = []
    for start in range(0, len(rows), 32):
        chunk = rows[start : start + 32]
        batch = collate_right(chunk, _pad(lm)).to(lm.device)
        seen: list[Tensor] = []
        with torch.no_grad(), attach([Hook(_final_norm(lm), "post", seen.append)]):
            lm.model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
            )
        last = batch.attention_mask.sum(-1) - 1
        out.append(seen[0][torch.arange(len(chunk)), last].double().cpu())
    return torch.cat(out)


def _pad(lm: LoadedModel) -> int:
    pad = lm.tokenizer.pad_token_id
    return int(pad if pad is not None else lm.tokenizer.eos_token_id)


def fit_guard_cones(
    lm: LoadedModel, config: GuardConfig, harmful: PromptSet, harmless: PromptSet, seed: int = 0
) -> dict[int, Tensor]:
    """Refusal-cone bases of the frozen model: ``{layer: [d, k]}`` for S, plus ``READOUT``.

    Each basis has orthonormal float32 columns. Layer cones come from
    :func:`~safegeom.carriers.cones.cheap_cone` (or :func:`~safegeom.carriers.rdo.rdo_cone`);
    the readout cone orthonormalises the diff-in-means of the final hidden state at the last
    prompt token and the top ``cone_k`` singular vectors of the per-prompt differences.

    Raises:
        ConfigError: a layer out of range or a cone wider than the hidden size.
    """
    check(
        config.cone_k <= lm.d_model,
        "cone_k",
        f"must be at most the hidden size {lm.d_model}",
        config.cone_k,
    )
    bases: dict[int, Tensor] = {}
    for layer in guard_layers(lm, config):
        carrier = cheap_cone(lm, harmful, harmless, k=config.cone_k, layer=layer, score=False)
        if config.cone == "rdo":
            from safegeom.carriers.rdo import RDOConfig, rdo_cone

            rdo = RDOConfig(k=config.cone_k, seed=seed)
            carrier = rdo_cone(lm, harmful, harmless, carrier, rdo, progress=False)
        bases[layer] = carrier.vectors.T.to(torch.float32).contiguous()
    if config.readout:
        h, s = _readout_states(lm, harmful), _readout_states(lm, harmless)
        diffs = h - s.mean(0)
        _, sv, vh = torch.linalg.svd(diffs, full_matrices=False)
        raw = torch.cat(
            [(h.mean(0) - s.mean(0))[None], vh[: config.cone_k] * sv[: config.cone_k, None]]
        )
        bases[READOUT] = gram_schmidt(raw, min(config.cone_k, len(raw))).T.float().contiguous()
    return bases


class GeometryPenalty:
    """The frozen model's cone coordinates on the calibration prompts, and the penalty against them.

    Build it from the frozen model before any update; :meth:`value_of` is then the penalty of the
    model as it is trained (or, after a forward inside :meth:`capture` whose rows ``rows`` are
    calibration rows, :meth:`value`).
    """

    def __init__(
        self,
        lm: LoadedModel,
        bases: dict[int, Tensor],
        harmful: PromptSet,
        harmless: PromptSet | None,
        positions: Literal["all", "last"] = "all",
    ) -> None:
        self.lm, self.positions = lm, positions
        self.bases = {k: v.to(lm.device) for k, v in bases.items()}
        for key, basis in self.bases.items():
            if basis.shape[0] != lm.d_model:
                where = "readout" if key == READOUT else f"layer {key}"
                raise SafegeomError(
                    f"the {where} cone has hidden size {basis.shape[0]}, the model {lm.d_model}: "
                    "fit the cones on the model being trained"
                )
        encoded = [*encode_chat(lm, harmful, None)]
        if harmless is not None:
            encoded += encode_chat(lm, harmless, None)
        if not encoded:
            raise SafegeomError("the calibration set is empty: give harmful and harmless prompts")
        self.examples = [Example(tuple(e.input_ids), len(e.input_ids)) for e in encoded]
        self.n_harmful = len(harmful)
        self._seen: dict[int, Tensor] = {}
        self._rows: slice = slice(0, 0)
        self.frozen = self._frozen_coordinates()

    def rows(self, indices: Sequence[int]) -> list[Example]:
        """The calibration examples at ``indices`` (prompt only: every label is ignored)."""
        return [self.examples[i] for i in indices]

    def sample(self, n: int, generator: torch.Generator) -> list[int]:
        """``n`` calibration indices, half harmful and half harmless (all when ``n`` is 0; all
        harmful when the penalty holds harmful prompts only)."""
        total = len(self.examples)
        if n <= 0 or n >= total:
            return list(range(total))
        n_h = min(self.n_harmful, max(1, n // 2) if total > self.n_harmful else n)
        harm = torch.randperm(self.n_harmful, generator=generator)[:n_h]
        rest = torch.randperm(total - self.n_harmful, generator=generator)[: n - n_h]
        return [*harm.tolist(), *(rest + self.n_harmful).tolist()]

    def _hooks(self) -> list[Hook]:
        def keep(key: int):
            def fn(h: Tensor) -> None:
                self._seen[key] = h[self._rows]

            return fn

        hooks = [Hook(self.lm.blocks[x], "pre", keep(x)) for x in self.bases if x != READOUT]
        if READOUT in self.bases:
            hooks.append(Hook(_final_norm(self.lm), "post", keep(READOUT)))
        return hooks

    @contextmanager
    def capture(self, rows: slice) -> Iterator[None]:
        """Record the hidden states of batch rows ``rows`` at every penalised site for one forward
        (the states stay available to :meth:`value` after the block)."""
        self._rows, self._seen = rows, {}
        try:
            with attach(self._hooks()):
                yield
        finally:
            self._rows = slice(0, 0)

    def _coordinates(self, mask: Tensor) -> dict[int, list[Tensor]]:
        lengths = mask.sum(-1).tolist()
        out: dict[int, list[Tensor]] = {}
        for key, basis in self.bases.items():
            seen = self._seen[key]  # at least float32; a float64 model keeps float64
            dtype = torch.promote_types(seen.dtype, torch.float32)
            coords = seen.to(dtype) @ basis.to(dtype)  # [rows, seq, k]
            if key == READOUT or self.positions == "last":
                out[key] = [coords[i, n - 1 : n] for i, n in enumerate(lengths)]
            else:
                out[key] = [coords[i, :n] for i, n in enumerate(lengths)]
        return out

    def _decoder_forward(self, rows: list[Example], pad_id: int) -> Tensor:
        """Run the decoder (blocks and final norm, no LM head) on ``rows`` inside :meth:`capture`;
        return the attention mask."""
        batch = collate_right(rows, pad_id).to(self.lm.device)
        parent = self.lm.layout.blocks.rpartition(".")[0]
        decoder = resolve(self.lm.base, parent) if parent else self.lm.base
        with self.capture(slice(None)):
            decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        return batch.attention_mask

    def value_of(self, indices: Sequence[int], pad_id: int) -> Float[Tensor, ""]:
        """The penalty of the model as it is now on the calibration prompts ``indices``.

        One forward of the decoder alone over those prompts (padded among themselves); the
        gradient flows to whatever is trained (LoRA adapters, the edit).
        """
        seen_mask = self._decoder_forward(self.rows(indices), pad_id)
        return self.value(indices, seen_mask)

    def _frozen_coordinates(self) -> dict[int, list[Tensor]]:
        frozen: dict[int, list[Tensor]] = {key: [] for key in self.bases}
        for start in range(0, len(self.examples), 32):
            chunk = self.examples[start : start + 32]
            with torch.no_grad():
                mask = self._decoder_forward(chunk, _pad(self.lm))
                coords = self._coordinates(mask)
            for key, values in coords.items():
                frozen[key].extend(v.detach().clone() for v in values)
        return frozen

    def value(self, indices: Sequence[int], mask: Tensor) -> Float[Tensor, ""]:
        """The penalty of the last forward's calibration rows (``indices``, their ``mask``)."""
        coords = self._coordinates(mask)
        total = torch.zeros((), device=mask.device)
        for key, values in coords.items():
            diffs = [
                ((v - self.frozen[key][i].to(v.device)) ** 2).sum(-1)
                for v, i in zip(values, indices, strict=True)
            ]
            total = total + torch.cat(diffs).mean()
        return total
