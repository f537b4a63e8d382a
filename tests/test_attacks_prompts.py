"""``capture`` and ``sweep`` take an attack set wherever a prompt spec goes, from the library and
the command line (``--prompts DIR``, ``--harmful DIR``): its token ids as optimised, here a
prefilling set whose ids end with the prefilled answer tokens that its text alone lacks; a model
with another tokenizer gets the text, with a warning naming the mismatch."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from safegeom.activations import CaptureConfig, capture, load_activations
from safegeom.attacks import AttackOptions, AttackSet, prefill
from safegeom.attacks.targets import behaviours_and_targets
from safegeom.carriers import Carrier, load_carrier
from safegeom.cli import main
from safegeom.evaluation import EvaluateConfig, evaluate, refusal_scores
from safegeom.models import LoadConfig, LoadedModel, load_model
from safegeom.sweeps import SweepConfig, causal_sweep_result
from tests.tiny_models import build_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

LAST = CaptureConfig(layers="1,3", positions="-1", batch_size=2)
"""The last prompt token: a prefilled answer token when the ids are replayed, the assistant
header's last token when only the text is."""
SWEEP = SweepConfig(ops=("ablate",), n_random=2, n_prompts=3, batch_size=4, n_resamples=100)


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return load_model("tiny-chat", LoadConfig(device="cpu"))


@pytest.fixture(scope="module")
def attacks(lm: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> tuple[AttackSet, Path]:
    prompts, targets = behaviours_and_targets("advbench:val", limit=3)
    made = prefill.attack(
        lm,
        prompts.prompts,
        targets,
        prefill.PrefillConfig(2),
        options=AttackOptions(judge_source=False),
    )
    folder = tmp_path_factory.mktemp("attack") / "prefill"
    made.save(folder)
    return made, folder


def test_capture_replays_the_ids(lm: LoadedModel, attacks) -> None:
    made, _ = attacks
    got = capture(lm, made, LAST, progress=False)
    ids = capture(lm, made.encoded_for(lm.tokenizer), LAST, progress=False)
    text = capture(lm, made.as_prompt_set(), LAST, progress=False)
    assert torch.equal(got["resid_pre"], ids["resid_pre"])
    assert not torch.allclose(got["resid_pre"], text["resid_pre"])  # the prefill is replayed
    assert got.provenance.prompt_sets == {"attack:prefill": made.content_hash()}


def test_capture_cli_takes_an_attack_folder(lm: LoadedModel, attacks, tmp_path: Path) -> None:
    made, folder = attacks
    out = tmp_path / "acts.safetensors"
    args = ["capture", "tiny-chat", "--prompts", str(folder), "--layers", "1,3"]
    args += ["--positions", "-1", "--batch-size", "2", "--out", str(out), "--device", "cpu"]
    assert main([*args, "--limit", "2"]) == 0
    loaded = load_activations(out)
    expected = capture(lm, made.take(2), LAST, progress=False)
    assert torch.equal(loaded["resid_pre"], expected["resid_pre"])


def test_another_tokenizer_gets_the_text_with_a_warning(attacks, tmp_path: Path) -> None:
    made, _ = attacks
    other = load_model(build_checkpoint(tmp_path, "llama"), LoadConfig(device="cpu"))
    with pytest.warns(UserWarning, match="optimised with another tokenizer.*replayed as text"):
        acts = capture(other, made, CaptureConfig(layers="1", positions="-1"), progress=False)
    assert acts["resid_pre"].shape[0] == len(made)


def _carrier(lm: LoadedModel, folder: Path) -> Path:
    generator = torch.Generator().manual_seed(0)
    vectors = torch.randn(lm.d_model, generator=generator)
    carrier = Carrier(vectors=vectors, kind="refusal", method="dim", layer=1, position="t_post[-1]")
    return carrier.save(folder / "r.safetensors")


def test_sweep_replays_the_ids(lm: LoadedModel, attacks, tmp_path: Path) -> None:
    made, _ = attacks
    carrier = _carrier(lm, tmp_path)
    config = dataclasses.replace(SWEEP, generate=True, max_new_tokens=6)
    result = causal_sweep_result(lm, load_carrier(carrier), made, "alpaca:val", config)
    table = result.table
    harmful = table[table.population == "harmful"]
    scores = refusal_scores(lm, made, progress=False).numpy()
    plain = refusal_scores(lm, made.as_prompt_set(), progress=False).numpy()
    base = harmful[harmful.metric == "refusal_score"].base.iloc[0]
    assert base == pytest.approx(scores.mean(), rel=1e-6) and base != pytest.approx(plain.mean())
    refused = evaluate(
        lm, made, EvaluateConfig(max_new_tokens=6, n_resamples=100), progress=False
    ).refused
    rate = harmful[harmful.metric == "refusal_rate"].base.iloc[0]
    assert rate == pytest.approx(np.mean(refused))
    assert "attack:prefill" in result.provenance.prompt_sets


def test_sweep_cli_takes_an_attack_folder(
    lm: LoadedModel, attacks, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    made, folder = attacks
    carrier = _carrier(lm, tmp_path)
    args = ["sweep", "tiny-chat", "--carrier", str(carrier), "--harmful", str(folder)]
    args += ["--ops", "ablate", "--n-random", "2", "--n-prompts", "3", "--batch-size", "4"]
    args += ["--n-resamples", "100", "--no-progress", "--json", "--device", "cpu"]
    assert main(args) == 0
    rows = json.loads(capsys.readouterr().out)
    harmful = [r for r in rows if r["population"] == "harmful"]
    scores = refusal_scores(lm, made, progress=False).numpy()
    assert harmful[0]["base"] == pytest.approx(scores.mean(), rel=1e-6)
