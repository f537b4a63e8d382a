"""KL-regularised LoRA: ``L_SFT + kl_weight · KL(P_ref ‖ P_θ)`` over answer tokens.

The reference is the frozen model (the adapters disabled; :mod:`.reference`). Its settings are
:class:`~safegeom.training.regularised.RegConfig` (``kl_weight``, ``kl_examples``). With
``kl_examples="harmless"`` the task must mark every example ``harmful`` or ``harmless`` (a JSONL
``kind``, :attr:`~safegeom.training.tasks.Task.kinds`); the harmful ones get the cross-entropy
alone, and the KL stays a mean over the batch's answered examples
(:func:`~safegeom.training.regularised.regularised_loss` says why).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from safegeom.errors import ConfigError
from safegeom.training.methods.base import Method, Prepared, Setup, StepInputs, Terms, fixed
from safegeom.training.methods.reference import regularised_step
from safegeom.training.regularised import RegConfig

__all__ = ["METHOD", "KLState", "harmless_rows"]

KINDS = ("harmful", "harmless")
"""The example classes ``kl_examples="harmless"`` reads."""


class KLState(Prepared):
    """LoRA with a constant-weight KL to the reference."""

    def __init__(
        self, kl_weight: float, record: dict | None = None, kl_rows: Tensor | None = None
    ) -> None:
        super().__init__("lora", record)
        self.kl_weight = kl_weight
        """β: the weight of KL(P_ref ‖ P_θ)."""
        self.kl_rows = kl_rows
        """One bool per training example: its KL counts (``None``: every example's does)."""

    def loss(self, inputs: StepInputs) -> tuple[Tensor, Terms]:
        """The mean per answered example of ``CE + β · KL`` (KL 0 off ``kl_rows``; terms
        ``task``, ``kl``)."""
        return regularised_step(inputs, kl_weight=self.kl_weight, kl_rows=self.kl_rows)


def harmless_rows(kinds: Sequence[str | None] | None) -> Tensor:
    """The examples marked ``harmless``, from the task's per-example kinds.

    Returns:
        A bool tensor, one entry per example, true where the kind is ``harmless``.

    Raises:
        ConfigError: the task marks no example, or an example is not marked harmful or harmless
            (the message names ``--kl-examples`` and the first such row).
    """
    if kinds is None or all(k is None for k in kinds):
        raise ConfigError(
            "kl_examples (--kl-examples) harmless needs a task that marks its examples harmful "
            "or harmless (a JSONL 'kind' field on every line); this task marks none"
        )
    for row, kind in enumerate(kinds):
        if kind not in KINDS:
            raise ConfigError(
                f"kl_examples (--kl-examples) harmless: task row {row} has kind {kind!r}; every "
                "example must be marked harmful or harmless"
            )
    return torch.tensor([k == "harmless" for k in kinds], dtype=torch.bool)


def prepare(setup: Setup, settings: RegConfig) -> KLState:
    """Nothing to fit but the weight (and, with ``kl_examples="harmless"``, which examples carry
    the KL); the record names the method and ``kl_weight`` (and then ``kl_examples`` and the
    number of examples of each kind).

    Raises:
        ConfigError: ``kl_examples="harmless"`` on a task that does not mark every example.
    """
    record = {"method": setup.method, "kl_weight": settings.kl_weight}
    if settings.kl_examples == "all":
        return KLState(settings.kl_weight, record)
    rows = harmless_rows(setup.kinds)
    n_harmless = int(rows.sum())
    record |= {
        "kl_examples": settings.kl_examples,
        "harmless_examples": n_harmless,
        "harmful_examples": len(rows) - n_harmless,
    }
    return KLState(settings.kl_weight, record, rows)


METHOD = Method(
    summary="LoRA with a constant-weight KL to the reference (--kl-weight, --kl-examples)",
    update=fixed("lora"),
    prepare=prepare,
    config=RegConfig,
    group="regularisation",
    uses=("kl_weight", "kl_examples"),
)
"""KL-regularised LoRA."""
