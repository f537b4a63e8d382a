"""RefusalGuard as a training method (docs/methods.md §6): the edit or LoRA, and the cone penalty.

Before any update it fits the refusal-cone bases on the frozen model
(:func:`~.geometry.fit_guard_cones`), saves them with the run (``DIR/defence/cones.safetensors``;
a resumed run reads them back) and caches the frozen calibration coordinates
(:class:`~.geometry.GeometryPenalty`). It trains the cone-projected ReFT edit of its layers
(``variant="reft"``, the base frozen; :class:`~safegeom.models.reft.ReftEdit`) or LoRA
(``variant="lora"``); every ``penalty_every`` steps the loss adds ``λ_geom · penalty`` (term
``geom``) from a second forward of the decoder alone over a calibration mini-batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from safegeom.artifacts import read_safetensors, save_safetensors
from safegeom.config import config_dict
from safegeom.errors import ConfigError
from safegeom.models.loading import LoadedModel
from safegeom.prompts import PromptSet
from safegeom.training.config import RunConfig
from safegeom.training.methods.base import Method, Prepared, Setup, StepInputs, Terms, task_loss
from safegeom.training.methods.refusalguard.geometry import (
    READOUT,
    GeometryPenalty,
    GuardConfig,
    calibration_sets,
    fit_guard_cones,
    guard_layers,
)
from safegeom.training.trainable import Trainable, Update, wrap_model

__all__ = ["CONES_FILE", "METHOD", "GuardState"]

CONES_FILE = "cones.safetensors"
"""The cone bases fitted on the frozen model, in ``DIR/defence``."""


class GuardState(Prepared):
    """The cone bases, the frozen coordinates and the penalty's schedule of one run."""

    def __init__(
        self,
        config: GuardConfig,
        bases: dict[int, Tensor],
        penalty: GeometryPenalty | None,
        seed: int,
        record: dict[str, Any],
    ) -> None:
        super().__init__(update_of(config), record)
        self.config = config
        """The RefusalGuard settings."""
        self.bases = bases
        """The edit's cone bases by layer (the readout cone left out)."""
        self.penalty = penalty
        """The geometry penalty (``None`` when ``lambda_geom`` is 0)."""
        self.seed = seed
        """The run's seed (it draws each step's calibration mini-batch)."""

    def wrap(
        self,
        lm: LoadedModel,
        spec: str | Path,
        run: RunConfig,
        *,
        dtype: str,
        resume_from: Path | None,
    ) -> Trainable:
        """LoRA as for ``lora``, or the edit on the layers of :attr:`bases` (``reft``)."""
        if self.update != "reft":
            return super().wrap(lm, spec, run, dtype=dtype, resume_from=resume_from)
        g = self.config
        settings = {
            "layers": sorted(self.bases),
            "rank": g.reft_rank,
            "first_k": g.reft_first,
            "last_k": g.reft_last,
            "seed": run.train.seed,
            "edit_generated": g.reft_generated,
        }
        return wrap_model(
            lm, spec, "reft", settings, dtype=dtype, resume_from=resume_from, bases=self.bases
        )

    def calibration(self, step: int) -> list[int]:
        """The calibration prompts penalised at ``step`` (none off the penalty's steps)."""
        if self.penalty is None or step % self.config.penalty_every:
            return []
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return self.penalty.sample(self.config.calib_batch, generator)

    def loss(self, inputs: StepInputs) -> tuple[Tensor, Terms]:
        """The task loss, plus ``λ_geom · penalty`` (counted ``1 / world`` on every rank) on the
        penalty's steps (terms ``task`` and ``geom``)."""
        calib = self.calibration(inputs.step)
        geom = self.penalty.value_of(calib, inputs.pad_id) if calib and self.penalty else None
        loss, terms = task_loss(inputs)
        if geom is not None:
            loss = loss + self.config.lambda_geom * geom / inputs.world
            terms["geom"] = geom.detach() / inputs.world
        return loss, terms


def update_of(config: GuardConfig) -> Update:
    """What RefusalGuard trains: the edit (``reft``) or LoRA adapters, as ``variant`` says."""
    return "reft" if config.variant == "reft" else "lora"


def _cones(setup: Setup, config: GuardConfig) -> tuple[dict[int, Tensor], PromptSet, PromptSet]:
    """The cone bases (fitted, or read back on resume) and the calibration prompt sets."""
    path = setup.folder / CONES_FILE
    harmful, harmless = calibration_sets(config, setup.seed)
    if setup.resume and path.is_file():
        tensors, _ = read_safetensors(path, what="RefusalGuard cones")
        return {int(k.split(".")[1]): v for k, v in tensors.items()}, harmful, harmless
    bases = fit_guard_cones(setup.lm, config, harmful, harmless, setup.seed)
    meta = {
        "layers": [k for k in bases if k != READOUT],
        "readout": READOUT in bases,
        "calibration": {
            harmful.name: harmful.content_hash,
            harmless.name: harmless.content_hash,
        },
    }
    if setup.write:
        save_safetensors(path, {f"layer.{k}": v.cpu() for k, v in bases.items()}, meta)
    return bases, harmful, harmless


def prepare(setup: Setup, config: GuardConfig) -> GuardState:
    """Fit the cones and cache the frozen coordinates the penalty holds.

    Raises:
        ConfigError: a layer out of range, a cone wider than the model, or nothing to penalise.
    """
    if setup.write:
        setup.folder.mkdir(parents=True, exist_ok=True)
    layers = guard_layers(setup.lm, config)
    bases, harmful, harmless = _cones(setup, config)
    penalty = None
    if config.lambda_geom > 0:
        held = bases if config.layer_cones else {k: v for k, v in bases.items() if k == READOUT}
        if not held:
            raise ConfigError(
                "layer_cones (--no-layer-cones) without readout (--no-readout) leaves nothing "
                "to penalise; keep one, or set lambda_geom (--lambda-geom) to 0"
            )
        kept = harmless if config.penalise_harmless else None
        penalty = GeometryPenalty(setup.lm, held, harmful, kept, config.cone_positions)
    record = {
        "method": setup.method,
        **config_dict(config),
        "layers": list(layers),
        "calibration": {
            harmful.name: harmful.content_hash,
            harmless.name: harmless.content_hash,
        },
    }
    edit_bases = {k: v for k, v in bases.items() if k != READOUT}
    return GuardState(config, edit_bases, penalty, setup.seed, record)


METHOD = Method(
    summary=(
        "docs/methods.md §6: the cone-projected edit (--variant reft) or LoRA (--variant lora), "
        "with the geometry penalty --lambda-geom on the refusal cones"
    ),
    update=update_of,
    prepare=prepare,
    config=GuardConfig,
    group="refusalguard",
)
"""RefusalGuard."""
