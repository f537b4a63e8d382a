"""Task–safety interference rows (issue 21 item 6) on tiny-chat: every interference metric has a
CI around its value and a floor row; the representation share is 1 inside the cone and 0
orthogonal to it; the gradient cosine equals one computed by hand, example by example; the
hooks and flags are restored; the other rows do not change; the figure panel renders."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch

from safegeom.audit.activations import carrier_prompts
from safegeom.audit.config import AuditConfig
from safegeom.audit.gradients import block_linears, example_gradients
from safegeom.audit.interference import METRICS, cone_share, gradient_cosines
from safegeom.audit.measure import measure_checkpoint
from safegeom.audit.reference import Reference, build_reference
from safegeom.audit.schema import UNITS, frame
from safegeom.errors import SafegeomError
from safegeom.evaluation import refusal_log_odds, refusal_token_ids
from safegeom.figure_files import write_figures
from safegeom.generation import encode_chat
from safegeom.models import load_model
from safegeom.plots import plot_interference
from safegeom.training.data import encode_examples
from safegeom.training.tasks import get_task

CONFIG = AuditConfig(
    n_per_class=16,
    n_val=4,
    n_behaviour=4,
    cone_k=2,
    n_resamples=200,
    generate=False,
    xstest=False,
    families=("geometry",),
    interference_n=6,
)


@pytest.fixture(scope="module")
def base(one_thread):
    return load_model("tiny-chat")


@pytest.fixture(scope="module")
def checkpoint(one_thread):
    """tiny-chat with every weight moved by 1% of its RMS (seeded)."""
    lm = load_model("tiny-chat")
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lm.model.parameters():
            p.add_(0.01 * p.pow(2).mean().sqrt() * torch.randn(p.shape, generator=generator))
    return lm


@pytest.fixture(scope="module")
def ref(base) -> Reference:
    return build_reference(base, CONFIG, progress=False)


@pytest.fixture(scope="module")
def task():
    return get_task("arith:8")


def _table(lm, ref: Reference, base, task, config: AuditConfig = CONFIG) -> pd.DataFrame:
    rows = measure_checkpoint(lm, ref, config, base=base, task=task, progress=False).rows
    return frame({**r, "checkpoint": "c", "step": 0} for r in rows)


@pytest.fixture(scope="module")
def measured(checkpoint, base, ref: Reference, task) -> pd.DataFrame:
    return _table(checkpoint, ref, base, task)


def _floor(rows: pd.DataFrame) -> pd.Series:
    return rows.source.eq("floor").fillna(False).astype(bool)


def test_rows_have_cis_and_floors(measured: pd.DataFrame, ref: Reference) -> None:
    rows = measured[measured.metric.isin(METRICS)]
    for metric in METRICS:
        mine = rows[(rows.metric == metric) & ~_floor(rows)]
        floor = rows[(rows.metric == metric) & _floor(rows)]
        assert len(mine) == 1 and len(floor) == 1, metric
        row = mine.iloc[0]
        assert row.ci_low <= row.value <= row.ci_high and row.ci_low < row.ci_high, metric
        assert row.unit == UNITS[metric] and floor.iloc[0].unit == UNITS[metric]
        assert floor.iloc[0].note.startswith("random"), metric
        assert floor.iloc[0].ci_low < floor.iloc[0].value < floor.iloc[0].ci_high
    resid = rows[(rows.metric == "interference_grad_resid") & _floor(rows)].iloc[0]
    weights = rows[(rows.metric == "interference_grad_weights") & rows.layer.isna()]
    assert len(weights) == 2  # the row and its floor: the weights are not per layer
    assert resid.layer == ref.refusal.layer
    half = 1.96 / math.sqrt(ref.refusal.d_model)  # the null cosine's 95% band, ±1.96/√d
    assert abs(resid.ci_high - half) < 0.2 * half and abs(resid.ci_low + half) < 0.2 * half
    share = rows[(rows.metric == "interference_cone_share") & _floor(rows)].iloc[0]
    k, d = ref.cone.vectors.shape
    assert abs(share.value - k / d) < 0.15 * k / d
    assert share.layer == ref.cone.layer
    grads = rows[rows.metric.str.startswith("interference_grad") & ~_floor(rows)]
    assert (grads.n == 2 * CONFIG.interference_n).all()


def test_base_itself_and_no_task(base, ref: Reference, task) -> None:
    """The base against itself has no change to share; without a task no gradient rows."""
    itself = _table(base, ref, base, task)
    assert not itself.metric.eq("interference_cone_share").any()
    assert itself.metric.eq("interference_grad_weights").sum() == 2
    no_task = _table(base, ref, base, None)
    assert not no_task.metric.isin(METRICS).any()


def test_other_rows_do_not_change(checkpoint, base, ref: Reference, measured) -> None:
    off = _table(checkpoint, ref, base, None, dataclasses.replace(CONFIG, interference=False))
    assert not off.metric.isin(METRICS).any()
    kept = measured[~measured.metric.isin(METRICS)].reset_index(drop=True)
    pd.testing.assert_frame_equal(kept, off.reset_index(drop=True))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_share_is_one_inside_the_cone_and_zero_orthogonal(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    d, k, n = 48, 3, 20
    basis = torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64)).Q.T
    inside = torch.randn(n, k, generator=gen, dtype=torch.float64) @ basis
    other = torch.randn(n, d, generator=gen, dtype=torch.float64)
    orthogonal = other - (other @ basis.T) @ basis
    one, low, high, random = cone_share(inside, basis, n_resamples=200, seed=seed)
    assert abs(one - 1.0) < 1e-12 and abs(low - 1.0) < 1e-12 and abs(high - 1.0) < 1e-12
    zero = cone_share(orthogonal, basis, n_resamples=200, seed=seed)[0]
    assert zero < 1e-20
    mixed = cone_share(inside + orthogonal, basis, n_resamples=200, seed=seed)[0]
    energy = inside.pow(2).sum() / (inside.pow(2).sum() + orthogonal.pow(2).sum())
    assert abs(mixed - float(energy)) < 1e-12
    assert abs(float(random.mean()) - k / d) < 0.2 * k / d  # a random subspace takes k/d


def _hand(lm, layer: int, task, prompts) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ task-loss and Σ refusal-score gradients, example by example, w.r.t. a shared δ at
    ``layer`` and the block weights: ``(resid [2, d], weights [2, D])``."""
    linears = block_linears(lm)
    weights = [m.weight for m in linears]
    flags = [w.requires_grad for w in weights]
    delta = torch.zeros(lm.d_model, requires_grad=True)
    handle = lm.blocks[layer].register_forward_pre_hook(
        lambda _m, args, kwargs: (
            ((args[0] + delta, *args[1:]), kwargs)
            if args
            else (args, {**kwargs, "hidden_states": kwargs["hidden_states"] + delta})
        ),
        with_kwargs=True,
    )
    tokens = refusal_token_ids(lm)
    out = []
    try:
        for w in weights:
            w.requires_grad_(True)
        for kind in ("task", "refusal"):
            total = torch.zeros((), dtype=torch.float64)
            if kind == "task":
                for e in encode_examples(lm.tokenizer, *task):
                    ids = torch.tensor([e.input_ids])
                    logits = lm.model(input_ids=ids, use_cache=False).logits[0, :-1]
                    labels = torch.tensor(e.labels[1:])
                    total = total + torch.nn.functional.cross_entropy(logits, labels)
            else:
                for e in encode_chat(lm, prompts, None):
                    ids = torch.tensor([e.input_ids])
                    logits = lm.model(input_ids=ids, use_cache=False).logits[:, -1]
                    total = total + refusal_log_odds(logits, tokens)[0]
            grads = torch.autograd.grad(total, [delta, *weights])
            out.append((grads[0].double(), torch.cat([g.reshape(-1).double() for g in grads[1:]])))
    finally:
        handle.remove()
        for w, flag in zip(weights, flags, strict=True):
            w.requires_grad_(flag)
    return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])


def test_gradient_cosine_equals_a_hand_computed_one(checkpoint, task) -> None:
    layer, n = 2, 4
    pairs = (task.prompts[:n], task.responses[:n])
    prompts = carrier_prompts(CONFIG)[0].take(n)
    grads = example_gradients(checkpoint, layer, pairs, prompts)
    found = gradient_cosines(grads, n_resamples=100, seed=0)
    resid, weights = _hand(checkpoint, layer, pairs, prompts)
    for space, (t, r) in (("resid", resid), ("weights", weights)):
        expected = float(-(t @ r) / (t.norm() * r.norm()))
        assert abs(found[space][0] - expected) < 1e-5, (space, found[space][0], expected)
    sums = torch.stack([grads.resid[:n].sum(0), grads.resid[n:].sum(0)])
    torch.testing.assert_close(sums, resid, rtol=1e-4, atol=1e-6)
    gram = weights @ weights.T  # the Gram of the two sums = block sums of the example Gram
    blocks = [[grads.weights[:n, :n], grads.weights[:n, n:]], [grads.weights[n:, :n], None]]
    assert math.isclose(float(blocks[0][0].sum()), float(gram[0, 0]), rel_tol=1e-4)
    assert math.isclose(float(blocks[0][1].sum()), float(gram[0, 1]), rel_tol=1e-4)
    assert grads.n_weights == weights.shape[1]


def test_hooks_and_flags_restored(checkpoint, task) -> None:
    linears = block_linears(checkpoint)
    before = [m.weight.requires_grad for m in linears]
    for m in linears:
        m.weight.requires_grad_(False)
    pairs = (task.prompts[:2], task.responses[:2])
    example_gradients(checkpoint, 1, pairs, carrier_prompts(CONFIG)[0].take(2))
    assert not any(m.weight.requires_grad for m in linears)
    assert not any(m._forward_hooks for m in linears)
    assert not any(b._forward_pre_hooks for b in checkpoint.blocks)
    for m, flag in zip(linears, before, strict=True):
        m.weight.requires_grad_(flag)


def test_bad_inputs(checkpoint) -> None:
    with pytest.raises(SafegeomError, match=r"interference_n .*must be at least 1, got 0"):
        AuditConfig(interference_n=0)
    with pytest.raises(SafegeomError, match="empty task: pass at least one prompt/response pair"):
        example_gradients(checkpoint, 1, ((), ()), carrier_prompts(CONFIG)[0].take(2))


def test_panel_renders(measured: pd.DataFrame, tmp_path) -> None:
    later = measured.assign(step=40, checkpoint="step-40")
    both = pd.concat([measured.assign(step=0), later], ignore_index=True)
    fig = plot_interference(both)
    assert len(fig.axes) == 3
    labels = {t.get_text() for t in fig.legends[0].get_texts()}
    assert {"random-direction floor", "random-subspace floor"} <= labels
    assert [ax.get_xticks().tolist() for ax in fig.axes] == [[0.0, 40.0]] * 3
    empty = plot_interference(both[~both.metric.str.startswith("interference_grad")])
    texts = [t.get_text() for t in empty.axes[0].texts]
    assert any("no interference_grad_resid rows" in t and "--task" in t for t in texts)
    written, _ = write_figures({"run": both}, tmp_path, formats=("png",))
    assert tmp_path / "fig8_interference.png" in written
    assert np.isfinite(both[both.metric.isin(METRICS)].value).all()
