"""The defence trainers' set-up on the frozen model, before any update (METHODS §6–7).

:func:`prepare_defence` runs once per run, on the model as loaded (the aligned reference):

- ``refusalguard``: fits the cone bases (:func:`~safegeom.train.guard.fit_guard_cones`), caches
  the frozen calibration coordinates (:class:`~safegeom.train.guard.GeometryPenalty`) and saves the
  bases with the run (``DIR/defence/cones.safetensors``; a resumed run reads them back);
- ``adaptive``: fits the activation risk probe (or wraps the judge) and scores every training
  prompt once (``DIR/defence/risk_probe.safetensors``, ``DIR/defence/risks.safetensors``);
- ``kl``: nothing but its weight;
- ``safe-lora``, ``lox``: loads the unaligned base and builds the checkpoint transform
  (:mod:`safegeom.train.posthoc`).

What it returns is recorded in the run's manifest (``config["defence"]``) and compared on resume.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from safegeom.artifacts import read_safetensors, save_safetensors
from safegeom.config import config_dict
from safegeom.errors import ConfigError
from safegeom.judges import Judge, get_judge
from safegeom.models.loading import LoadConfig, LoadedModel
from safegeom.train.adaptive import JudgeCritic, RiskCritic, RiskProbeConfig, fit_risk_probe
from safegeom.train.guard import (
    READOUT,
    GeometryPenalty,
    GuardConfig,
    calibration_sets,
    fit_guard_cones,
    guard_layers,
)
from safegeom.train.posthoc import PosthocConfig
from safegeom.train.regularised import RegConfig
from safegeom.train.wrap import Update

__all__ = ["DEFENCE_DIR", "METHODS", "Defence", "prepare_defence", "update_of"]

METHODS = ("sft", "lora", "refusalguard", "adaptive", "kl", "safe-lora", "lox")
"""Every training method ``safegeom train`` runs."""
DEFENCE_DIR = "defence"
"""Sub-folder of a run holding what a defence fitted on the frozen model."""


@dataclass
class Defence:
    """What a method fitted on the frozen model, and what the manifest records of it."""

    record: dict[str, Any] | None = None
    """``config["defence"]`` of the manifest (``None`` for sft and lora)."""
    bases: dict[int, Tensor] = field(default_factory=dict)
    """RefusalGuard's cone bases by layer (``READOUT`` = -1: the final hidden state)."""
    penalty: GeometryPenalty | None = None
    """RefusalGuard's geometry penalty (``None`` when ``lambda_geom`` is 0)."""
    risks: Tensor | None = None
    """adaptive: one risk per training example, in [1, 5]."""
    step_options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for :class:`~safegeom.train.step.StepLoss`."""
    export: Callable[[nn.Module, Path], str] | None = None
    """safe-lora, lox: the checkpoint transform (see :mod:`safegeom.train.posthoc`)."""


def update_of(method: str, guard: GuardConfig) -> Update:
    """What ``method`` updates: ``full`` (sft), ``reft`` (RefusalGuard's edit) or ``lora``."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if method == "sft":
        return "full"
    return "reft" if method == "refusalguard" and guard.variant == "reft" else "lora"


def _cones(lm: LoadedModel, guard: GuardConfig, seed: int, folder: Path, resume: bool,
           write: bool):  # fmt: skip
    path = folder / "cones.safetensors"
    harmful, harmless = calibration_sets(guard, seed)
    if resume and path.is_file():
        tensors, _ = read_safetensors(path, what="RefusalGuard cones")
        bases = {int(k.split(".")[1]): v for k, v in tensors.items()}
    else:
        bases = fit_guard_cones(lm, guard, harmful, harmless, seed)
        meta = {"layers": [k for k in bases if k != READOUT], "readout": READOUT in bases,
                "calibration": {harmful.name: harmful.content_hash,
                                harmless.name: harmless.content_hash}}  # fmt: skip
        if write:
            save_safetensors(path, {f"layer.{k}": v.cpu() for k, v in bases.items()}, meta)
    return bases, harmful, harmless


def prepare_defence(
    method: str,
    lm: LoadedModel,
    prompts: list[str],
    *,
    guard: GuardConfig,
    reg: RegConfig,
    critic: RiskCritic | None,
    posthoc: PosthocConfig | None = None,
    load: LoadConfig | None = None,
    seed: int,
    folder: Path,
    resume: bool,
    write: bool = True,
) -> Defence:
    """Fit ``method``'s defence on the frozen ``lm`` (see the module docstring).

    ``prompts`` are the training prompts (scored by the adaptive critic); ``folder`` is
    ``DIR/defence``, written only when ``write`` (the main process).

    Raises:
        ConfigError: bad settings (a layer out of range, a critic that is not a critic ...).
    """
    if method == "refusalguard":
        if write:
            folder.mkdir(parents=True, exist_ok=True)
        layers = guard_layers(lm, guard)
        bases, harmful, harmless = _cones(lm, guard, seed, folder, resume, write)
        penalty = None
        if guard.lambda_geom > 0:
            held = bases if guard.layer_cones else {k: v for k, v in bases.items() if k == READOUT}
            if not held:
                raise ConfigError(
                    "layer_cones (--no-layer-cones) without readout (--no-readout) leaves nothing "
                    "to penalise; keep one, or set lambda_geom (--lambda-geom) to 0"
                )
            kept = harmless if guard.penalise_harmless else None
            penalty = GeometryPenalty(lm, held, harmful, kept, guard.cone_positions)
        record = {"method": "refusalguard", **config_dict(guard), "layers": list(layers),
                  "calibration": {harmful.name: harmful.content_hash,
                                  harmless.name: harmless.content_hash}}  # fmt: skip
        options = {"lambda_geom": guard.lambda_geom, "calib_batch": guard.calib_batch,
                   "penalty_every": guard.penalty_every}  # fmt: skip
        edit_bases = {k: v for k, v in bases.items() if k != READOUT}
        return Defence(record, edit_bases, penalty, step_options=options)
    if method == "kl":
        return Defence({"method": "kl", "kl_weight": reg.kl_weight},
                       step_options={"reference": True, "kl_weight": reg.kl_weight})  # fmt: skip
    if method in ("safe-lora", "lox"):
        from safegeom.train.posthoc import prepare_posthoc

        record, export = prepare_posthoc(method, lm, posthoc or PosthocConfig(), load)
        return Defence(record, export=export)
    if method != "adaptive":
        return Defence()
    if write:
        folder.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"method": "adaptive", **config_dict(reg)}
    risks_path = folder / "risks.safetensors"
    if critic is None:
        if reg.critic == "judge":
            critic = JudgeCritic(get_judge(reg.judge))
        else:
            probe_config = RiskProbeConfig(layers=reg.probe_layers, scale=reg.probe_scale,
                                           n_per_class=reg.probe_n, seed=seed)  # fmt: skip
            critic = fit_risk_probe(lm, probe_config)
    elif not isinstance(critic, RiskCritic) or isinstance(critic, Judge):
        raise ConfigError(
            f"critic must be a RiskCritic (RiskProbe, JudgeCritic(judge) or any object with "
            f"risk(lm, prompts)), got {type(critic).__name__}; wrap a judge as JudgeCritic(judge)"
        )
    name = type(critic).__name__
    record["critic_kind"] = name
    if hasattr(critic, "auroc"):
        record["probe_auroc"] = float(critic.auroc)  # type: ignore[attr-defined]
        if write:
            critic.save(folder / "risk_probe.safetensors")  # type: ignore[attr-defined]
    if resume and risks_path.is_file():
        risks = read_safetensors(risks_path, what="adaptive risks")[0]["risk"]
    else:
        risks = torch.as_tensor(critic.risk(lm, prompts), dtype=torch.float32).cpu()
        if risks.shape != (len(prompts),):
            raise ConfigError(
                f"the critic {name} gave risks of shape {tuple(risks.shape)} for {len(prompts)} "
                "training prompts: risk(lm, prompts) must return one risk per prompt"
            )
        if write:
            save_safetensors(risks_path, {"risk": risks}, {"critic": name})
    record["mean_risk"] = float(risks.mean())
    options = {"reference": True, "risk_unit": reg.risk_unit}
    return Defence(record, risks=risks, step_options=options)
