"""benchmarks/bench_attacks.py in its ``--quick`` mode, without nanoGCG (the suite never imports
it): the tables and JSON, the step meter's counts, the ASR rows; and the pieces the nanoGCG side
relies on, checked on tiny-chat: the legacy-cache adapter computes what the model computes, and
nanoGCG's tokenization gives safegeom's ids only with the BOS-adding tokenizer. Never a timing."""

from __future__ import annotations

import contextlib
import io
import json
import statistics
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from safegeom.attacks.slots import build_slot
from safegeom.attacks.targets import behaviours_and_targets
from safegeom.models import LoadConfig, load_model
from tests.script_helpers import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_attacks.py"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_script(SCRIPT)


@pytest.fixture(scope="module")
def sides(bench) -> ModuleType:
    return sys.modules["attack_sides"]  # imported by the script from benchmarks/


@pytest.fixture(scope="module")
def quick(bench, tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("quick") / "attacks.json"
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        assert bench.main(["--quick", "--no-nanogcg", "--no-progress", "--json", str(out)]) == 0
    return json.loads(out.read_text()), text.getvalue()


def test_quick_run_reports_the_safegeom_side_and_says_why_nanogcg_was_skipped(quick) -> None:
    results, text = quick
    assert "nanoGCG side skipped: --no-nanogcg given" in text
    assert results["nanogcg_skipped"] == "--no-nanogcg given"
    assert [c["model"] for c in results["cases"]] == ["tiny-chat", "random Llama (tiny)"]
    for case in results["cases"]:
        assert list(case["runs"]) == ["safegeom"] and case["speedup"] is None
        settings, runs = case["settings"], case["runs"]["safegeom"]
        assert len(runs) == case["behaviours"]
        summary = case["summary"]["safegeom"]
        assert summary["intervals"] == case["behaviours"] * (settings["steps"] - 1)
        # the loss after k steps: the median over behaviours of the best of the first k steps
        assert summary["loss_at"] and all(int(k) <= settings["steps"] for k in summary["loss_at"])
        for k, loss in summary["loss_at"].items():
            assert loss == statistics.median(min(r["losses"][: int(k)]) for r in runs)
        for run in runs:
            assert len(run["losses"]) == settings["steps"]
            assert run["best_loss"] == min(run["losses"])
            # the suffix as text gives the ids safegeom optimised: the same loss, to rounding
            assert run["retokenized_loss"] == pytest.approx(run["best_loss"], rel=1e-5)
        assert f"| {case['model']} | safegeom |" in text


def test_step_meter_counts_one_gradient_forward_and_the_kept_candidates_per_step(
    quick,
) -> None:
    case = quick[0]["cases"][0]
    width, n = case["settings"]["search_width"], case["settings"]["n_tokens"]
    lm = load_model("tiny-chat", LoadConfig(device="cpu"))
    behaviours, targets = behaviours_and_targets("harmbench:val", limit=case["behaviours"])
    for b, t, run in zip(behaviours.prompts, targets, case["runs"]["safegeom"], strict=True):
        slot = build_slot(lm, b, t, n_tokens=n)
        row, head_row = n + len(slot.tail()), len(slot.target_ids) + 1
        for tokens, head in zip(run["tokens"], run["head"], strict=True):
            # (1 gradient row + the kept candidates) x (suffix + after + target) positions fed;
            # the LM head computes the target's positions (and one before) of each row only
            assert tokens % row == 0 and 2 <= tokens // row <= width + 1
            assert head == tokens // row * head_row


def test_asr_rows_cover_every_attack_with_their_counts(quick) -> None:
    results, text = quick
    rows = {r["attack"]: r for r in results["asr"]}
    assert list(rows) == ["no attack", "GCG (safegeom)", "AutoDAN-style", "prefill"]
    for row in rows.values():
        assert row["model"] == "tiny-chat" and row["n"] == 2
        assert row["asr"] == pytest.approx(row["successes"] / row["n"])
        assert f"| tiny-chat | {row['attack']} | 2 |" in text


def test_missing_nanogcg_gives_the_install_line(sides, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "nanogcg", None)  # import fails, as when not installed
    reason = sides.nanogcg_missing()
    assert reason is not None and "pip install --no-deps nanogcg==0.3.0" in reason


def test_legacy_cache_adapter_computes_the_plain_forward(sides) -> None:
    lm = load_model("tiny-chat", LoadConfig(device="cpu"))
    model = sides.LegacyCacheModel(lm.model)
    ids = torch.tensor([[1, 3, 204, 77, 78, 79, 80, 81]])
    with torch.no_grad():
        full = lm.model(input_ids=ids).logits[:, 5:]
        prefix = model(input_ids=ids[:, :5], use_cache=True)["past_key_values"]
        assert isinstance(prefix, tuple) and len(prefix) == lm.model.config.num_hidden_layers
        legacy = [[x.expand(2, -1, -1, -1) for x in layer] for layer in prefix]  # as nanoGCG does
        rest = model(input_ids=ids[:, 5:].expand(2, -1), past_key_values=legacy, use_cache=True)
    # same arithmetic split differently: float32 rounding of logits of size ~10
    assert torch.allclose(rest.logits, full.expand(2, -1, -1), atol=1e-4, rtol=1e-5)
    assert prefix[0][0].shape[2] == 5  # the prefix cache was not extended in place


def test_nanogcg_tokenization_matches_safegeom_only_with_the_bos_adding_copy(sides) -> None:
    lm = load_model("tiny-chat", LoadConfig(device="cpu"))
    slot = build_slot(lm, "Explain how locks work", "Sure, here is how", n_tokens=6)
    side = sides.NanoSide(lm)
    assert sides.nanogcg_ids(lm, side.tokenizer, slot)
    assert not sides.nanogcg_ids(lm, lm.tokenizer, slot)  # nanoGCG would drop the BOS
    assert lm.tokenizer("x")["input_ids"][:1] != [lm.tokenizer.bos_token_id]  # left unchanged
    allowed = torch.ones(lm.model.get_input_embeddings().weight.shape[0], dtype=torch.bool)
    allowed[side.banned] = False
    assert not allowed[lm.tokenizer.bos_token_id] and allowed.sum() > 1000
