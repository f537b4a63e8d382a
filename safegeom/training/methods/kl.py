"""KL-regularised LoRA: ``L_SFT + kl_weight · KL(P_ref ‖ P_θ)`` over answer tokens.

The reference is the frozen model (the adapters disabled; :mod:`.reference`). Its settings are
:class:`~safegeom.training.regularised.RegConfig` (``kl_weight`` only).
"""

from __future__ import annotations

from torch import Tensor

from safegeom.training.methods.base import Method, Prepared, Setup, StepInputs, Terms, fixed
from safegeom.training.methods.reference import regularised_step
from safegeom.training.regularised import RegConfig

__all__ = ["METHOD", "KLState"]


class KLState(Prepared):
    """LoRA with a constant-weight KL to the reference."""

    def __init__(self, kl_weight: float, record: dict | None = None) -> None:
        super().__init__("lora", record)
        self.kl_weight = kl_weight
        """β: the weight of KL(P_ref ‖ P_θ)."""

    def loss(self, inputs: StepInputs) -> tuple[Tensor, Terms]:
        """The mean per answered example of ``CE + β · KL`` (terms ``task``, ``kl``)."""
        return regularised_step(inputs, kl_weight=self.kl_weight)


def prepare(setup: Setup, settings: RegConfig) -> KLState:
    """Nothing to fit but the weight; the record names the method and ``kl_weight``."""
    record = {"method": setup.method, "kl_weight": settings.kl_weight}
    return KLState(settings.kl_weight, record)


METHOD = Method(
    summary="LoRA with a constant-weight KL to the reference (--kl-weight)",
    update=fixed("lora"),
    prepare=prepare,
    config=RegConfig,
    group="regularisation",
    uses=("kl_weight",),
)
"""KL-regularised LoRA."""
