"""Adaptive regularisation (docs/methods.md §7): LoRA with a risk-weighted KL to the reference.

Before any update, a critic scores every training prompt on the frozen model once (the reference
never changes): the activation risk probe of §7 (fitted here), a judge on the reference's answers,
or a :class:`~safegeom.training.adaptive.RiskCritic` object given as the ``critic`` of
:class:`~safegeom.training.regularised.RegConfig`. The probe and the risks are saved in
``DIR/defence`` (``risk_probe.safetensors``, ``risks.safetensors``); a resumed run reads the risks
back. Each step mixes the examples'
cross-entropy and KL by the §7 weights of their risks (:mod:`.reference`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from safegeom.artifacts import read_safetensors, save_safetensors
from safegeom.config import config_dict
from safegeom.errors import ConfigError
from safegeom.judges import get_judge
from safegeom.training.adaptive import JudgeCritic, RiskCritic, RiskProbeConfig, fit_risk_probe
from safegeom.training.methods.base import Method, Prepared, Setup, StepInputs, Terms, fixed
from safegeom.training.methods.reference import regularised_step
from safegeom.training.regularised import RegConfig

__all__ = ["METHOD", "AdaptiveState"]

RISKS_FILE = "risks.safetensors"
"""The training prompts' risks, in ``DIR/defence``."""
PROBE_FILE = "risk_probe.safetensors"
"""The fitted risk probe, in ``DIR/defence``."""


class AdaptiveState(Prepared):
    """LoRA with each example's KL weight set by its risk."""

    def __init__(self, risks: Tensor, risk_unit: str, record: dict[str, Any]) -> None:
        super().__init__("lora", record)
        self.risks = risks
        """One risk per training example, in [1, 5]."""
        self.risk_unit = risk_unit
        """``example`` (each example its own weights) or ``batch`` (the batch's mean risk)."""

    def loss(self, inputs: StepInputs) -> tuple[Tensor, Terms]:
        """The §7 mix (terms ``task``, ``kl``, ``risk``, ``sft_w``, ``kl_w``)."""
        unit = self.risk_unit
        return regularised_step(inputs, risks=self.risks, risk_unit=unit)  # type: ignore[arg-type]


def _critic(setup: Setup, settings: RegConfig) -> RiskCritic:
    """The critic ``settings`` gives or names (the probe is fitted here)."""
    if not isinstance(settings.critic, str):
        return settings.critic
    if settings.critic == "judge":
        return JudgeCritic(get_judge(settings.judge))
    probe = RiskProbeConfig(
        layers=settings.probe_layers,
        scale=settings.probe_scale,
        n_per_class=settings.probe_n,
        seed=setup.seed,
    )
    return fit_risk_probe(setup.lm, probe)


def prepare(setup: Setup, settings: RegConfig) -> AdaptiveState:
    """Score every training prompt with the critic (or read the scores back on resume).

    Raises:
        ConfigError: risks not one per prompt.
    """
    folder = setup.folder
    if setup.write:
        folder.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"method": setup.method, **config_dict(settings)}
    critic = _critic(setup, settings)
    name = type(critic).__name__
    if not isinstance(settings.critic, str):
        record["critic"] = name  # a critic object is recorded by its class
    record["critic_kind"] = name
    if hasattr(critic, "auroc"):
        record["probe_auroc"] = float(critic.auroc)  # type: ignore[attr-defined]
        if setup.write:
            critic.save(folder / PROBE_FILE)  # type: ignore[attr-defined]
    risks_path = folder / RISKS_FILE
    if setup.resume and risks_path.is_file():
        risks = read_safetensors(risks_path, what="adaptive risks")[0]["risk"]
    else:
        prompts = list(setup.prompts)
        risks = torch.as_tensor(critic.risk(setup.lm, prompts), dtype=torch.float32).cpu()
        if risks.shape != (len(prompts),):
            raise ConfigError(
                f"the critic {name} gave risks of shape {tuple(risks.shape)} for {len(prompts)} "
                "training prompts: risk(lm, prompts) must return one risk per prompt"
            )
        if setup.write:
            save_safetensors(risks_path, {"risk": risks}, {"critic": name})
    record["mean_risk"] = float(risks.mean())
    return AdaptiveState(risks, settings.risk_unit, record)


METHOD = Method(
    summary="docs/methods.md §7: LoRA, risk-weighted KL to the reference (--critic probe|judge)",
    update=fixed("lora"),
    prepare=prepare,
    config=RegConfig,
    group="regularisation",
    uses=tuple(f for f in RegConfig.__dataclass_fields__ if f not in ("kl_weight", "kl_examples")),
)
"""Adaptive regularisation."""
