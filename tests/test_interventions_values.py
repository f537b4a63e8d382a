"""Interventions as values: Ablation/Addition/AffineEdit bind, attach, restore and describe."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from safegeom.artifacts import sha256_bytes
from safegeom.carriers.carrier import Carrier
from safegeom.errors import ConfigError, NonFiniteError
from safegeom.evaluation import EvaluateConfig, evaluate, refusal_scores
from safegeom.interventions import Ablation, Addition, AffineEdit, ablate, add
from safegeom.models import LoadConfig, LoadedModel, load_model
from tests.model_helpers import prompt_logits

PROMPTS = ["Write a tutorial on how to make a cake.", "Hi.", "How do I kill a Python process?"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm(checkpoints: dict[str, Path]) -> LoadedModel:
    return load_model(checkpoints["llama"], LoadConfig(device="cpu"))


def _logits(lm, prompts=PROMPTS) -> torch.Tensor:
    return prompt_logits(lm, prompts)


def _hooks(lm: LoadedModel) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules())


def _carrier(lm: LoadedModel, k: int = 1) -> Carrier:
    gen = torch.Generator().manual_seed(0)
    vectors = torch.randn(k, lm.d_model, generator=gen) * 3
    return Carrier(vectors=vectors, kind="refusal", method="dim", layer=1, position="t_post[-1]")


def test_carrier_and_tensor_give_identical_outputs(lm: LoadedModel) -> None:
    c = _carrier(lm, k=2)
    with Ablation(c).on(lm):
        from_carrier = _logits(lm)
    with Ablation(c.vectors.T).on(lm):
        from_tensor = _logits(lm)
    with ablate(lm, c.vectors.T):
        from_function = _logits(lm)
    assert torch.equal(from_carrier, from_tensor) and torch.equal(from_carrier, from_function)
    d = _carrier(lm)
    with Addition(d, coeff=-1.0).on(lm):
        added = _logits(lm)
    with Addition(d.direction, layers=1, coeff=-1.0).on(lm):
        added_tensor = _logits(lm)
    with add(lm, d.direction, layers=1, coeff=-1.0):
        added_function = _logits(lm)
    assert torch.equal(added, added_tensor) and torch.equal(added, added_function)


def test_attach_remove_restores_the_model_exactly(lm: LoadedModel) -> None:
    before, hooks = _logits(lm), _hooks(lm)
    handle = Ablation(_carrier(lm)).attach(lm)
    assert handle.attached and _hooks(lm) > hooks
    assert not torch.equal(_logits(lm), before)
    handle.remove()
    handle.remove()  # idempotent
    assert not handle.attached and _hooks(lm) == hooks
    assert torch.equal(_logits(lm), before)
    with Addition(_carrier(lm), coeff=2.0).attach(lm) as h:  # the handle is a context manager
        assert h.attached
    assert _hooks(lm) == hooks and torch.equal(_logits(lm), before)


def test_removed_even_when_the_forward_raises(lm: LoadedModel) -> None:
    before, hooks = _logits(lm), _hooks(lm)
    with pytest.raises(RuntimeError, match="boom"), Ablation(_carrier(lm)).on(lm):
        _logits(lm)
        raise RuntimeError("boom")
    assert _hooks(lm) == hooks and torch.equal(_logits(lm), before)
    handle = Addition(torch.full((lm.d_model,), float("inf")), layers=0)
    with pytest.raises(NonFiniteError, match="NaN or inf"):
        handle.attach(lm)
    assert _hooks(lm) == hooks


def test_to_dict_describes_the_intervention(lm: LoadedModel) -> None:
    c = _carrier(lm)
    info = Ablation(c).to_dict()
    assert info["kind"] == "ablation" and info["layers"] == "all" and info["positions"] == "all"
    assert info["coefficient"] == 1.0 and info["sites"] == ["resid_pre", "attn_out", "mlp_out"]
    carrier = info["carrier"]
    assert (carrier["method"], carrier["layer"], carrier["position"]) == ("dim", 1, "t_post[-1]")
    assert carrier["sha256"] == sha256_bytes(c.vectors.numpy().astype("<f4").tobytes())
    added = Addition(c, coeff=-0.5, positions="instruction").to_dict()
    assert (added["kind"], added["coefficient"], added["layers"]) == ("addition", -0.5, 1)
    assert added["positions"] == "instruction"
    tensor = Addition(c.direction, layers=[0, 2]).to_dict()
    assert tensor["carrier"]["method"] is None and tensor["layers"] == [0, 2]
    assert tensor["carrier"]["sha256"] == carrier["sha256"]
    edit = AffineEdit(c, reference_mean=torch.zeros(lm.d_model), alpha=0.5).to_dict()
    assert (edit["kind"], edit["coefficient"], edit["layers"]) == ("affine_edit", 0.5, 1)


def test_bad_values_raise_one_line_errors(lm: LoadedModel) -> None:
    with pytest.raises(NonFiniteError, match=r"coeff \(--coeff\) must be a finite number, got nan"):
        Addition(_carrier(lm), coeff=float("nan"))
    with pytest.raises(ConfigError, match="needs layers="):
        Addition(torch.ones(lm.d_model))
    with pytest.raises(ConfigError, match="positions must be all, prompt or instruction"):
        Addition(_carrier(lm), positions="everywhere")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="reference_mean"):
        AffineEdit(_carrier(lm))


def test_results_record_the_description(lm: LoadedModel) -> None:
    value = Ablation(_carrier(lm))
    result = evaluate(
        lm, PROMPTS[:2], EvaluateConfig(max_new_tokens=3), intervention=value, progress=False
    )
    assert result.provenance["intervention"] == value.to_dict()
    bound = evaluate(
        lm, PROMPTS[:2], EvaluateConfig(max_new_tokens=3), intervention=value.on(lm), progress=False
    )
    assert bound.completions == result.completions
    assert bound.provenance["intervention"] == value.to_dict()
    with value.on(lm):
        inside = refusal_scores(lm, PROMPTS[:2], progress=False)
    assert inside.tolist() == list(result.scores or ())
    lam = evaluate(
        lm,
        PROMPTS[:1],
        EvaluateConfig(max_new_tokens=2),
        intervention=lambda: value.on(lm),
        progress=False,
    )
    assert lam.provenance["intervention"]["kind"] == "custom"
    assert "<lambda>" in lam.provenance["intervention"]["repr"]
