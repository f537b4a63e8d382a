"""The real-model tier (issue 22 item 6) on ``smol-chat``: its refusal carrier, ablated and added
as the library's causal sweep does it, moves the refusal score beyond random controls; LoRA
fine-tuning of it trains, resumes bit for bit and is audited.

Loading the base, its chat positions under the default system prompt and the shipped adapter's
behaviour are in ``tests/test_smollm2.py`` and ``tests/test_smolchat.py``. Here one loaded
``smol-chat`` is shared by the carrier tests, and one merged copy of it by the training tests
(a LoRA on a LoRA adapter trains from the merged model, as ``train`` asks). Carrier prompts come
from train splits, the prompts it is tested on from validation splits; nothing reads a test split.
Everything runs on one thread with short sequences, so the resume comparison is exact.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch

from safegeom.audit import AuditConfig, audit, load_audit
from safegeom.carriers import Carrier, dim_candidates
from safegeom.models import LoadConfig, encode_prompts, load_model
from safegeom.models.smollm2 import SMOL_CHAT
from safegeom.prompts import load_prompts
from safegeom.sweeps import SweepConfig, causal_sweep
from safegeom.training import TrainConfig, train
from safegeom.training.trajectory import load_trajectory
from tests.train_helpers import TINY, saved_weights

pytestmark = pytest.mark.usefixtures("one_thread")
LAYER = 15
"""The middle block, where the issue's pilot found the refusal direction."""
N_CONTROLS = 5
"""Norm-matched random directions per sweep cell (the mechanism analysis uses 20)."""
HARMFUL = load_prompts("advbench:val").sample(6, seed=0)
HARMLESS = load_prompts("alpaca:val").sample(6, seed=0)
LORA = TrainConfig(
    save_every=1,
    batch_size=2,
    max_length=48,
    lora_dropout=0.1,  # the resumed run must restore the dropout RNG too
    progress=False,
)
"""Short sequences and two examples a step: one LoRA step costs about a second."""


@pytest.fixture(scope="module")
def smol():
    return load_model(SMOL_CHAT)


@pytest.fixture(scope="module")
def carrier(smol) -> Carrier:
    """smol-chat's refusal direction: diff-in-means at the last prompt token of block 15's input,
    16 train prompts a class."""
    harmful = load_prompts("advbench:train").sample(16, seed=0)
    harmless = load_prompts("alpaca:train").sample(16, seed=0)
    found = dim_candidates(
        smol, harmful, harmless, positions="-1", layers=str(LAYER), progress=False
    )
    return Carrier(
        vectors=found.vectors[0, 0],
        kind="refusal",
        method="dim",
        layer=LAYER,
        position=found.positions[0],
        provenance=found.provenance,
    )


@pytest.fixture(scope="module")
def sweep(smol, carrier) -> pd.DataFrame:
    """The library's causal sweep of the carrier, by refusal score: ablation at every layer and
    addition at block 15 (strength 1: the carrier's own diff-in-means norm, every position),
    each against ``N_CONTROLS`` norm-matched random directions; indexed by (op, population)."""
    config = SweepConfig(
        add_layers=str(LAYER),
        add_strengths=(1.0,),
        n_random=N_CONTROLS,
        n_prompts=len(HARMFUL),
        n_resamples=200,
    )
    table = causal_sweep(smol, {"refusal": carrier}, HARMFUL, HARMLESS, config, progress=False)
    assert set(table.metric) == {"refusal_score"}
    return table.set_index(["op", "population"])


def test_a_custom_system_prompt_replaces_the_default_one(smol) -> None:
    (enc,) = encode_prompts(smol.tokenizer, ["How do I bake bread?"], system="Answer briefly.")
    ids, decode = list(enc.input_ids), smol.tokenizer.decode
    prefix = decode(ids[: enc.inst_start])
    assert "Answer briefly." in prefix and "SmolLM" not in prefix
    assert decode(ids[enc.inst_start : enc.t_inst + 1]) == "How do I bake bread?"


def test_ablating_the_carrier_lowers_harmful_refusal_beyond_random_controls(sweep) -> None:
    cell = sweep.loc[("ablate", "harmful")]
    assert cell.n_controls == N_CONTROLS and cell.n_prompts == len(HARMFUL)
    assert cell.effect <= -1.5 and cell.control_rank == 0.0, cell.to_dict()  # beyond every control
    assert cell.effect_minus_control <= -1.5 and cell.ci_high < 0.0, cell.to_dict()


def test_adding_the_carrier_raises_harmless_refusal_beyond_random_controls(sweep) -> None:
    cell = sweep.loc[("add", "harmless")]
    assert cell.layer == str(LAYER) and cell.strength == 1.0
    assert cell.effect >= 1.5 and cell.control_rank == 0.0, cell.to_dict()  # beyond every control
    assert cell.effect_minus_control >= 1.5 and cell.ci_low > 0.0, cell.to_dict()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """smol-chat merged into a full checkpoint; LoRA on it for 2 steps at once, and for 1 step
    then resumed for 1 more."""
    root = tmp_path_factory.mktemp("smol-tier")
    merged = load_model(SMOL_CHAT, LoadConfig(merge_adapter=True))
    merged.model.save_pretrained(root / "smol-chat")
    merged.tokenizer.save_pretrained(root / "smol-chat")
    del merged
    base = root / "smol-chat"
    train(base, TINY, replace(LORA, steps=2), method="lora", out=root / "whole")
    train(base, TINY, replace(LORA, steps=1), method="lora", out=root / "cut")
    train(base, TINY, replace(LORA, steps=2), method="lora", out=root / "cut", resume=True)
    return {"base": base, "whole": root / "whole", "cut": root / "cut"}


def test_one_lora_step_writes_a_peft_checkpoint_of_smol_chat(runs) -> None:
    run = load_trajectory(runs["whole"])
    assert run.steps == (0, 1, 2) and run.complete
    step0, step1 = (saved_weights(p) for p in run.paths[:2])
    assert step0.keys() == step1.keys() and any("lora_B" in k for k in step1)
    assert any(not torch.equal(step0[k], step1[k]) for k in step0)  # the step moved the adapter
    assert all(torch.isfinite(torch.tensor(loss)) for loss in run.losses)
    config = json.loads((run.paths[1] / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(runs["base"].resolve())


def test_resuming_on_the_real_model_is_bit_for_bit(runs) -> None:
    whole, cut = load_trajectory(runs["whole"]), load_trajectory(runs["cut"])
    assert cut.steps == whole.steps and cut.complete
    a, b = saved_weights(whole.paths[-1]), saved_weights(cut.paths[-1])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert cut.losses == whole.losses


def test_a_peft_checkpoint_of_smol_chat_is_audited(runs, tmp_path: Path) -> None:
    checkpoint = load_trajectory(runs["whole"]).paths[1]
    config = AuditConfig(
        n_per_class=4,
        n_val=1,  # the base's selection scores 144 candidates (6 positions x 24 layers) on these
        generate=False,
        xstest=False,
        families=("geometry",),
        layers=str(LAYER),
        n_resamples=100,  # the fewest AuditConfig accepts
        interference=False,
        threads=1,
    )
    result = audit([runs["base"], checkpoint], tmp_path / "audit", config, progress=False)
    assert load_audit(tmp_path / "audit").checkpoints == ("base", "step-000001")
    table = result.table
    at_layer = table[table.layer.eq(LAYER).fillna(False)]  # (r0's own layer has rows too)
    assert set(at_layer.checkpoint) == {"base", "step-000001"}
    assert {"cosine_to_base", "direction_drift"} <= set(at_layer.metric)
    assert at_layer.value.notna().any()
