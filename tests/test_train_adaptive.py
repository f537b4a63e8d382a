"""Adaptive regularisation (docs/methods.md §7): weights on crafted risks, answer KL, critics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import safegeom
from safegeom.errors import ArtifactError, ConfigError, NonFiniteError, SafegeomError
from safegeom.judges import SubstringJudge
from safegeom.models.loading import load_model
from safegeom.prompts import load_prompts
from safegeom.training.adaptive import (
    JudgeCritic,
    RiskCritic,
    RiskProbe,
    RiskProbeConfig,
    adaptive_loss,
    adaptive_weights,
    answer_kl,
    fit_risk_probe,
    pooled_hidden,
)

TINY_CHAT_DIR = Path(safegeom.__file__).resolve().parent / "assets" / "tiny-chat"
needs_tiny_chat = pytest.mark.skipif(
    not (TINY_CHAT_DIR / "config.json").is_file(), reason="tiny-chat is not built yet"
)

# By hand: kl_w = clamp((r - 2)/3, .1, .9), sft_w = clamp(1 - kl_w, .1, .9).
CRAFTED = {1.0: (0.9, 0.1), 2.0: (0.9, 0.1), 3.5: (0.5, 0.5), 5.0: (0.1, 0.9)}


@pytest.mark.parametrize(("risk", "weights"), CRAFTED.items())
def test_weights_on_crafted_risks(risk: float, weights: tuple[float, float]) -> None:
    sft_w, kl_w = adaptive_weights(risk)
    assert isinstance(sft_w, float)
    assert (sft_w, kl_w) == pytest.approx(weights, abs=1e-12)


def test_weights_vectorised() -> None:
    sft_w, kl_w = adaptive_weights(torch.tensor(list(CRAFTED)))
    assert sft_w.dtype == torch.float32 and sft_w.shape == (4,)
    assert torch.allclose(sft_w, torch.tensor([w[0] for w in CRAFTED.values()]))
    assert torch.allclose(kl_w, torch.tensor([w[1] for w in CRAFTED.values()]))
    sft_i, _ = adaptive_weights(torch.tensor([1, 5]))
    assert sft_i.dtype == torch.float32


@settings(max_examples=50, deadline=None)
@given(st.floats(1.0, 5.0))
def test_weights_stay_in_range_and_sum_to_one(risk: float) -> None:
    sft_w, kl_w = adaptive_weights(risk)
    assert 0.1 <= kl_w <= 0.9 and 0.1 <= sft_w <= 0.9
    assert sft_w + kl_w == pytest.approx(1.0)


@pytest.mark.parametrize("bad", [0.5, 5.01, float("nan"), torch.tensor([1.0, 7.0])])
def test_weights_refuse_bad_risks(bad) -> None:
    with pytest.raises(ConfigError, match=r"risk must lie in \[1, 5\]"):
        adaptive_weights(bad)


def test_adaptive_loss() -> None:
    loss = adaptive_loss(torch.tensor(2.0), torch.tensor(0.5), 3.5)
    assert float(loss) == pytest.approx(0.5 * 2.0 + 0.5 * 0.5)
    per_batch = adaptive_loss(
        torch.tensor([2.0, 2.0]), torch.tensor([1.0, 1.0]), torch.tensor([1.0, 5.0])
    )
    assert torch.allclose(per_batch, torch.tensor([0.9 * 2 + 0.1, 0.1 * 2 + 0.9]))


def test_answer_kl_against_a_direct_computation() -> None:
    g = torch.Generator().manual_seed(0)
    ref, cur = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    total, count = 0.0, 0
    for b in range(2):
        for t in range(5):
            if mask[b, t]:
                p = torch.softmax(ref[b, t].double(), -1)
                q = torch.softmax(cur[b, t].double(), -1)
                total += float((p * (p.log() - q.log())).sum())
                count += 1
    kl = answer_kl(ref.double(), cur.double(), mask)
    assert kl.dtype == torch.float64 and float(kl) == pytest.approx(total / count, rel=1e-12)
    assert float(answer_kl(ref, cur, mask)) == pytest.approx(total / count, rel=1e-5)
    assert float(answer_kl(ref, ref, mask)) == pytest.approx(0.0, abs=1e-6)


def test_answer_kl_gradient_and_zero_probabilities() -> None:
    ref = torch.tensor([[[0.0, float("-inf"), 1.0]]])  # a token the reference never emits
    cur = torch.zeros(1, 1, 3, requires_grad=True)
    kl = answer_kl(ref, cur, torch.ones(1, 1))
    kl.backward()
    p = torch.softmax(ref[0, 0], -1)  # [e/(1+e)... over the two live tokens]
    expected = float(p[0] * (p[0].log() - torch.tensor(1 / 3).log()))
    expected += float(p[2] * (p[2].log() - torch.tensor(1 / 3).log()))
    assert float(kl.detach()) == pytest.approx(expected, rel=1e-5)
    assert cur.grad is not None and bool(torch.isfinite(cur.grad).all())


def test_answer_kl_bad_inputs() -> None:
    x = torch.zeros(1, 2, 3)
    with pytest.raises(SafegeomError, match="empty mask"):
        answer_kl(x, x, torch.zeros(1, 2))
    with pytest.raises(SafegeomError, match="one shape"):
        answer_kl(x, torch.zeros(1, 2, 4), torch.ones(1, 2))
    with pytest.raises(NonFiniteError, match="NaN or inf"):
        answer_kl(x, torch.full((1, 2, 3), float("nan")), torch.ones(1, 2))


def test_judge_critic_that_is_not_a_judge() -> None:
    with pytest.raises(ConfigError, match=r"JudgeCritic needs a safegeom Judge.*got str"):
        JudgeCritic("substring")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="refused_risk"):
        JudgeCritic(SubstringJudge(), refused_risk=9.0)


def test_probe_config_bad_inputs() -> None:
    with pytest.raises(ConfigError, match="scale"):
        RiskProbeConfig(scale="loud")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="n_per_class"):
        RiskProbeConfig(n_per_class=1)
    with pytest.raises(ConfigError, match="harmful"):
        RiskProbeConfig(harmful=())


@pytest.fixture(scope="module")
def lm(one_thread):
    return load_model("tiny-chat")


@pytest.fixture(scope="module")
def probe(lm):
    return fit_risk_probe(lm, RiskProbeConfig())


@needs_tiny_chat
def test_pooled_hidden_is_the_masked_mean(lm) -> None:
    prompts = ["Hi.", "Write a long poem about the sea, the sky and the wind, please."]
    batched = pooled_hidden(lm, prompts, layers="0-2", batch_size=2)
    for i, prompt in enumerate(prompts):
        from safegeom.generation import encode_chat

        ids = torch.tensor([encode_chat(lm, [prompt], None)[0].input_ids])
        with torch.no_grad():
            states = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
        direct = torch.stack([states[layer + 1][0].double().mean(0) for layer in range(3)]).mean(0)
        assert torch.allclose(batched[i], direct, atol=1e-5)
    with pytest.raises(ConfigError, match="out of range"):
        pooled_hidden(lm, prompts, layers="9")


@needs_tiny_chat
def test_probe_separates_held_out_prompts(lm, probe: RiskProbe) -> None:
    print(f"risk probe held-out AUROC {probe.auroc:.4f}, accuracy {probe.accuracy:.4f}")
    assert probe.auroc > 0.9 and probe.layers == (0, 1, 2, 3)
    assert isinstance(probe, RiskCritic)
    harmful, harmless = load_prompts("advbench:test").take(16), load_prompts("alpaca:test").take(16)
    r_bad, r_ok = probe.risk(lm, harmful), probe.risk(lm, harmless)
    assert set(torch.cat([r_bad, r_ok]).tolist()) <= {1.0, 5.0}
    assert r_bad.mean() > r_ok.mean()
    graded = probe.with_scale("probability")
    g_bad, g_ok = graded.risk(lm, harmful), graded.risk(lm, harmless)
    assert bool(((g_bad >= 1) & (g_bad <= 5)).all()) and g_bad.mean() > g_ok.mean()
    assert probe.provenance["weight_hash"] == lm.weight_hash
    assert "advbench:test+jbb-harmful:test+directharm4:test" in probe.provenance["prompt_sets"]


@needs_tiny_chat
def test_probe_save_load(lm, probe: RiskProbe, tmp_path: Path) -> None:
    path = probe.save(tmp_path / "probe.safetensors")
    back = RiskProbe.load(path)
    assert torch.equal(back.weight, probe.weight) and back.layers == probe.layers
    assert back.auroc == probe.auroc and back.provenance["auroc"] == probe.auroc
    assert torch.equal(back.risk(lm, ["Hi."]), probe.risk(lm, ["Hi."]))
    from safegeom.artifacts import save_safetensors

    other = save_safetensors(
        tmp_path / "other.safetensors", {"x": torch.ones(1)}, {"kind": "carrier"}
    )
    with pytest.raises(ArtifactError, match="not a saved risk probe"):
        RiskProbe.load(other)


@needs_tiny_chat
def test_judge_critic_on_tiny_chat(lm) -> None:
    critic = JudgeCritic(SubstringJudge(), max_new_tokens=12)
    assert isinstance(critic, RiskCritic)
    harmful, harmless = load_prompts("advbench:test").take(6), load_prompts("alpaca:test").take(6)
    r_bad, r_ok = critic.risk(lm, harmful), critic.risk(lm, harmless)
    assert r_bad.shape == (6,) and set(torch.cat([r_bad, r_ok]).tolist()) <= {1.0, 5.0}
    assert r_bad.mean() > r_ok.mean()
