"""RefusalGuard's geometry: the cone bases, the edit at zero, the penalty's value, gradient and inputs."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import pytest
import torch

from safegeom.errors import ConfigError, SafegeomError
from safegeom.models import LoadConfig, LoadedModel, collate_left, encode_prompts, load_model
from safegeom.models.layout import resolve
from safegeom.training.config import TrainConfig
from safegeom.training.data import collate_right, encode_examples
from safegeom.training.methods.refusalguard import (
    READOUT,
    GeometryPenalty,
    GuardConfig,
    calibration_sets,
    fit_guard_cones,
    guard_layers,
)
from safegeom.training.runner import train
from safegeom.training.trainable import Trainable, wrap_model
from tests.tiny_models import build_checkpoint
from tests.train_helpers import FAST, TINY

pytestmark = pytest.mark.usefixtures("one_thread")
GUARD = GuardConfig(n_calib=3, calib_batch=2)
"""Small calibration: three prompts a class, two a step, guard layers 1: (blocks 1 and 2 of 3)."""
PROMPTS = ["Write a tutorial on how to make a cake.", "Hi.", "How do I kill a Python process?"]
LORA = {"gpt2": ("c_attn", "c_fc"), "llama": ("q_proj", "v_proj", "down_proj")}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random 3-block Llama and GPT-2 checkpoints."""
    root = tmp_path_factory.mktemp("guard")
    return {arch: build_checkpoint(root, arch) for arch in ("llama", "gpt2")}


@pytest.fixture(scope="module")
def calib() -> tuple:
    """The harmful and harmless calibration prompts of :data:`GUARD`."""
    return calibration_sets(GUARD)


def _edit_settings(bases: dict[int, torch.Tensor]) -> dict:
    layers = sorted(k for k in bases if k != READOUT)
    return {"layers": layers, "rank": 4, "first_k": 5, "last_k": 5, "seed": 0}


def _edit_bases(bases: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    return {k: v for k, v in bases.items() if k != READOUT}


def _logits(lm: LoadedModel) -> torch.Tensor:
    batch = collate_left(encode_prompts(lm.tokenizer, PROMPTS), lm.tokenizer.pad_token_id)
    with torch.no_grad():
        return lm.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
        ).logits


def _penalty_of(trainable: Trainable, penalty: GeometryPenalty, indices: list[int], lead=()):
    """The penalty of one forward whose last rows are the calibration rows ``indices``."""
    rows = [*lead, *penalty.rows(indices)]
    batch = collate_right(rows, trainable.lm.tokenizer.pad_token_id)
    with ExitStack() as stack:
        if trainable.edit is not None:
            stack.enter_context(trainable.edit.prompt_lengths([e.n_prompt for e in rows]))
        stack.enter_context(penalty.capture(slice(len(lead), None)))
        trainable.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        )
        return penalty.value(indices, batch.attention_mask[len(lead) :])


# --- cones ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("readout", [True, False])
def test_cones_are_orthonormal_for_every_guarded_layer(ckpts, calib, arch: str, readout: bool):
    lm = load_model(ckpts[arch])
    config = GuardConfig(n_calib=3, calib_batch=2, readout=readout, cone_k=2)
    bases = fit_guard_cones(lm, config, *calib)
    assert guard_layers(lm, config) == (1, 2)
    assert sorted(bases) == ([READOUT, 1, 2] if readout else [1, 2])
    for basis in bases.values():
        assert basis.shape == (lm.d_model, 2) and basis.dtype == torch.float32
        torch.testing.assert_close(basis.T @ basis, torch.eye(2), atol=1e-5, rtol=0)
    layer_two = fit_guard_cones(lm, GuardConfig(n_calib=3, guard_layers="2", readout=False), *calib)
    assert sorted(layer_two) == [2]


def test_the_readout_cone_holds_the_class_mean_difference(ckpts, calib) -> None:
    lm = load_model(ckpts["llama"])
    basis = fit_guard_cones(lm, GUARD, *calib)[READOUT].double()
    harmful, harmless = calib
    norm = resolve(lm.base, lm.layout.final_norm)
    states = []
    for prompts in (harmful, harmless):
        seen: list[torch.Tensor] = []
        handle = norm.register_forward_hook(lambda m, a, out, seen=seen: seen.append(out))
        for text in prompts.prompts:  # one prompt at a time: no padding at all
            (enc,) = encode_prompts(lm.tokenizer, [text])
            with torch.no_grad():
                lm.model(input_ids=torch.tensor([enc.input_ids]))
        handle.remove()
        states.append(torch.stack([s[0, -1] for s in seen]).double())
    diff = states[0].mean(0) - states[1].mean(0)
    torch.testing.assert_close(basis @ (basis.T @ diff), diff, atol=1e-4, rtol=1e-4)


# --- the edit at zero and the penalty at step 0 ------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_edit_at_zero_is_the_base_model_exactly(ckpts, calib, arch: str) -> None:
    lm = load_model(ckpts[arch])
    before = _logits(lm)
    bases = fit_guard_cones(lm, GUARD, *calib)
    trainable = wrap_model(
        lm,
        ckpts[arch],
        "reft",
        _edit_settings(bases),
        dtype="float32",
        resume_from=None,
        bases=_edit_bases(bases),
    )
    assert trainable.edit is not None and trainable.parameters()
    assert torch.equal(_logits(lm), before)
    with torch.no_grad():
        trainable.edit.layer(1).bias.add_(1.0)
    assert not torch.equal(_logits(lm), before)  # the edit is live: moved, it changes the logits


@pytest.mark.parametrize(
    ("arch", "variant"), [("llama", "reft"), ("llama", "lora"), ("gpt2", "reft")]
)
def test_the_penalty_is_zero_before_any_update(ckpts, calib, arch, variant, tmp_path: Path) -> None:
    lm = load_model(ckpts[arch])
    bases = fit_guard_cones(lm, GUARD, *calib)
    penalty = GeometryPenalty(lm, bases, *calib)
    scale = max(float(torch.cat(v).pow(2).sum(-1).mean()) for v in penalty.frozen.values())
    settings = (
        _edit_settings(bases) if variant == "reft" else {"lora_r": 4, "lora_targets": LORA[arch]}
    )
    trainable = wrap_model(
        lm,
        ckpts[arch],
        variant,
        settings,
        dtype="float32",
        resume_from=None,
        bases=_edit_bases(bases),
    )
    values = []
    with torch.no_grad():
        values.append(_penalty_of(trainable, penalty, list(range(len(penalty.examples)))))
        # A task row first, shorter or longer than the calibration rows: other padding and batch.
        for times in (3, 8):
            lead = encode_examples(lm.tokenizer, [PROMPTS[0] * times], ["Sure, here is a poem."])
            values.append(_penalty_of(trainable, penalty, [4, 0], lead=lead))
    assert scale > 1e-2  # the coordinates are not trivially small
    assert all(0 <= float(v) <= 1e-10 * scale for v in values)  # measured: 0, ≤ 5.3e-13, 0
    run = train(
        ckpts[arch],
        TINY,
        TrainConfig(steps=1, **FAST),
        method="refusalguard",
        settings=GuardConfig(variant=variant, n_calib=3, calib_batch=2),
        out=tmp_path / "run",
    )
    first = run.checkpoints[0]
    assert 0 <= first.terms["geom"] <= 1e-10 * scale
    assert first.terms["task"] == pytest.approx(first.loss, rel=1e-9)


# --- the gradient -----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["reft", "lora"])
def test_the_penalty_gradient_matches_central_differences(ckpts, calib, variant: str) -> None:
    # GPT-2 is float64 throughout (LayerNorm); Llama's RMSNorm computes in float32.
    lm = load_model(ckpts["gpt2"], LoadConfig(dtype="float64"))
    bases = fit_guard_cones(lm, GUARD, *calib)
    penalty = GeometryPenalty(lm, bases, *calib)
    g = torch.Generator().manual_seed(3)
    if variant == "reft":
        trainable = wrap_model(
            lm,
            ckpts["gpt2"],
            "reft",
            _edit_settings(bases),
            dtype="float64",
            resume_from=None,
            bases=_edit_bases(bases),
        )
        assert trainable.edit is not None
        trainable.edit.double()
        params = [
            trainable.edit.layer(1).weight,
            trainable.edit.layer(2).bias,
            trainable.edit.layer(2).free,
        ]
    else:
        settings = {"lora_r": 4, "lora_targets": LORA["gpt2"]}
        trainable = wrap_model(
            lm, ckpts["gpt2"], "lora", settings, dtype="float64", resume_from=None
        )
        named = dict(trainable.module.named_parameters())
        params = [named[n] for n in named if ".h.1." in n and "lora_" in n][:3]
    with torch.no_grad():  # move off the minimum at zero, where the gradient is 0
        for p in trainable.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    indices = [0, 4, 2]
    value = _penalty_of(trainable, penalty, indices)
    assert value.dtype == torch.float64 and float(value.detach()) > 1e-3
    value.backward()
    h = 1e-5
    for param in params:
        assert param.dtype == torch.float64 and param.grad is not None
        for entry in [(0, 0), (1, 3)] if param.dim() == 2 else [(0,), (2,)]:
            with torch.no_grad():
                start = float(param[entry])
                param[entry] = start + h
                up = float(_penalty_of(trainable, penalty, indices))
                param[entry] = start - h
                down = float(_penalty_of(trainable, penalty, indices))
                param[entry] = start
            numeric, auto = (up - down) / (2 * h), float(param.grad[entry])
            assert numeric == pytest.approx(auto, rel=1e-6, abs=1e-9)


# --- bad input --------------------------------------------------------------------------------


def test_bad_inputs_fail_with_their_messages(ckpts, calib, tmp_path: Path) -> None:
    lm = load_model(ckpts["llama"])
    narrow = {1: torch.linalg.qr(torch.randn(16, 3))[0]}
    with pytest.raises(SafegeomError, match="layer 1 cone has hidden size 16, the model 32"):
        GeometryPenalty(lm, narrow, *calib)
    with pytest.raises(SafegeomError, match="readout cone has hidden size 16"):
        GeometryPenalty(lm, {READOUT: narrow[1]}, *calib)
    with pytest.raises(SafegeomError, match=r"layer 1 has shape \(16, 3\), but the hidden size"):
        wrap_model(
            lm,
            ckpts["llama"],
            "reft",
            _edit_settings(narrow),
            dtype="float32",
            resume_from=None,
            bases=narrow,
        )
    with pytest.raises(ConfigError, match=r"n_calib \(--n-calib\) must be at least 1 \(an empty"):
        GuardConfig(n_calib=0)
    with pytest.raises(ConfigError, match=r"lambda_geom \(--lambda-geom\) must be 0 or more"):
        GuardConfig(lambda_geom=-1.0)
    with pytest.raises(
        ConfigError, match=r"calib_harmless \(--calib-harmless\) must name at least one prompt set"
    ):
        GuardConfig(calib_harmless=())
    empty = tmp_path / "none.json"
    empty.write_text("[]")
    with pytest.raises(
        ConfigError,
        match=r"calib_harmful \(--calib-harmful\): .*none\.json' is empty; give at least one prompt",
    ):
        calibration_sets(GuardConfig(calib_harmful=(str(empty),)))
    with pytest.raises(ConfigError, match=r"guard_layers \(--guard-layers\): layer 7 out of range"):
        guard_layers(lm, GuardConfig(guard_layers="7"))
    with pytest.raises(ConfigError, match=r"cone_k \(--cone-k\) must be at most the hidden size"):
        fit_guard_cones(lm, GuardConfig(cone_k=33), *calib)
    for guard, message in [
        (GuardConfig(n_calib=3, guard_layers="7"), "guard_layers .*: layer 7 out of range"),
        (GuardConfig(n_calib=3, calib_harmful=(str(empty),)), "is empty; give at least one"),
    ]:
        with pytest.raises(SafegeomError, match=message):
            train(
                ckpts["llama"],
                TINY,
                TrainConfig(steps=1, **FAST),
                method="refusalguard",
                settings=guard,
                out=tmp_path / "run",
                overwrite=True,
            )
