"""Attacks on tiny-chat: GCG lowers the target loss, the cached candidate losses equal the
uncached ones, kept candidates round-trip, saved sets evaluate to the source's ASR, resume equals
an uninterrupted run, and bad input fails with one line naming the fix."""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch

from safegeom.attacks import AttackOptions, autodan, gcg, load_attack_set, prefill
from safegeom.attacks.attack_set import AttackSet
from safegeom.attacks.gcg import GCGConfig, sample_candidates
from safegeom.attacks.loss import candidate_losses, prefix_cache, uncached_losses
from safegeom.attacks.slots import allowed_tokens, build_slot, round_trips
from safegeom.attacks.targets import behaviours_and_targets
from safegeom.errors import ArtifactError, ConfigError, OutputPathError, SafegeomError
from safegeom.evaluation import EvaluateConfig, evaluate
from safegeom.models import LoadConfig, LoadedModel, load_model
from safegeom.prompts import load_prompts
from tests.tiny_models import build_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = GCGConfig(n_tokens=6, steps=4, search_width=48, top_k=16)


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    return load_model("tiny-chat", LoadConfig(device="cpu"))


@pytest.fixture(scope="module")
def behaviours() -> tuple[tuple[str, ...], tuple[str, ...]]:
    prompts, targets = behaviours_and_targets("advbench:val", limit=3)
    return prompts.prompts, targets


@pytest.fixture(scope="module")
def gcg_set(lm, behaviours) -> AttackSet:
    return gcg.attack(lm, *behaviours, SMALL)


def test_gcg_lowers_the_target_loss(gcg_set: AttackSet) -> None:
    for record in gcg_set.records:
        assert record.steps == len(record.losses) >= 1
        assert record.final_loss < record.initial_loss
        assert record.success is not None and record.completion is not None
    assert gcg_set.provenance.weight_hash and gcg_set.provenance.config["n_tokens"] == 6


def test_gcg_raises_asr_on_the_source(lm) -> None:
    """The target becomes the greedy answer of a refused behaviour within a few dozen steps."""
    prompts, targets = behaviours_and_targets("advbench:val", limit=3)
    plain = evaluate(
        lm, prompts.prompts[2:3], EvaluateConfig(n_resamples=10), progress=False
    ).asr.value
    config = GCGConfig(n_tokens=8, steps=40, search_width=64, top_k=32)
    attacked = gcg.attack(lm, prompts.prompts[2:3], targets[2:3], config)
    assert plain == 0.0
    assert attacked.success_rate == 1.0


def test_cached_candidate_losses_equal_uncached(lm, behaviours) -> None:
    slot = build_slot(lm, behaviours[0][0], behaviours[1][0], n_tokens=6)
    generator = torch.Generator().manual_seed(0)
    top = torch.randint(10, 3000, (6, 16), generator=generator)
    candidates = sample_candidates(torch.tensor(slot.opt_ids), top, 32, 2, generator)
    prefix = prefix_cache(lm.model, slot.before_ids)
    n_target = len(slot.target_ids)
    cached, cached_hits = candidate_losses(
        lm.model, prefix, candidates, slot.tail(), n_target, batch_size=10
    )
    plain, plain_hits = uncached_losses(
        lm.model, slot.before_ids, candidates, slot.tail(), n_target
    )
    torch.testing.assert_close(cached, plain, rtol=1e-5, atol=1e-5)
    assert torch.equal(cached_hits, plain_hits)
    assert cached.std() > 0  # the candidates differ, so a constant loss would not pass


def test_kept_candidates_round_trip(lm, behaviours) -> None:
    slot = build_slot(lm, behaviours[0][0], behaviours[1][0], n_tokens=6)
    allowed = allowed_tokens(lm.tokenizer, 3072).nonzero()[:, 0]
    generator = torch.Generator().manual_seed(1)
    candidates = allowed[torch.randint(0, len(allowed), (200, 6), generator=generator)]
    keep = round_trips(lm.tokenizer, slot, candidates)
    assert 0 < int(keep.sum()) < len(keep)  # random tokens: some merge, some survive
    for row in candidates[keep].tolist():
        text = slot.prompt_text(lm.tokenizer, row)
        rendered = lm.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        assert lm.tokenizer(rendered, add_special_tokens=False)["input_ids"] == list(
            slot.prompt_ids(row)
        )


def test_gcg_records_round_trip_and_exclude_specials(lm, gcg_set: AttackSet) -> None:
    specials = set(lm.tokenizer.all_special_ids)
    for record in gcg_set.records:
        rendered = lm.tokenizer.apply_chat_template(
            [{"role": "user", "content": record.prompt}], tokenize=False, add_generation_prompt=True
        )
        assert (
            tuple(lm.tokenizer(rendered, add_special_tokens=False)["input_ids"]) == record.input_ids
        )
        adversarial = record.input_ids[record.t_inst - SMALL.n_tokens + 1 : record.t_inst + 1]
        assert not specials.intersection(adversarial)
        assert lm.tokenizer.decode(adversarial).isascii()


def test_gcg_is_deterministic_and_prefix_placement_works(lm, behaviours, gcg_set) -> None:
    again = gcg.attack(lm, behaviours[0][:1], behaviours[1][:1], SMALL)
    assert again.records[0].input_ids == gcg_set.records[0].input_ids
    assert again.records[0].losses == gcg_set.records[0].losses
    before = dataclasses.replace(SMALL, placement="prefix", steps=2)
    record = gcg.attack(lm, behaviours[0][:1], behaviours[1][:1], before).records[0]
    assert record.prompt.endswith(behaviours[0][0])


def test_universal_suffix_is_shared(lm, behaviours) -> None:
    config = dataclasses.replace(SMALL, steps=2, universal=True)
    result = gcg.attack(lm, behaviours[0][:2], behaviours[1][:2], config)
    a, b = result.records
    assert a.input_ids[a.t_inst - 5 : a.t_inst + 1] == b.input_ids[b.t_inst - 5 : b.t_inst + 1]
    assert a.losses == b.losses


def test_saved_loaded_evaluated_gives_the_same_asr(lm, gcg_set: AttackSet, tmp_path: Path) -> None:
    gcg_set.save(tmp_path)
    loaded = load_attack_set(tmp_path)
    assert loaded == gcg_set
    result = evaluate(lm, loaded, EvaluateConfig(n_resamples=10), progress=False)
    assert result.asr.value == pytest.approx(gcg_set.success_rate)
    assert result.completions == tuple(r.completion for r in gcg_set.records)
    assert load_prompts(loaded).prompts == gcg_set.prompts


def test_prefill_and_autodan(lm, behaviours) -> None:
    filled = prefill.attack(
        lm, behaviours[0][:2], behaviours[1][:2], prefill.PrefillConfig(n_target_tokens=3)
    )
    record = filled.records[0]
    assert record.prefill and behaviours[1][0].startswith(record.prefill)
    assert record.input_ids[-3:] == tuple(
        lm.tokenizer(record.prefill, add_special_tokens=False)["input_ids"]
    )
    config = autodan.AutoDANConfig(population=6, generations=3)
    first = autodan.attack(lm, behaviours[0][:1], behaviours[1][:1], config)
    second = autodan.attack(lm, behaviours[0][:1], behaviours[1][:1], config)
    found = first.records[0]
    assert found.prompt == second.records[0].prompt and behaviours[0][0].rstrip(".") in found.prompt
    assert list(found.losses) == sorted(found.losses, reverse=True)  # the best so far never rises
    assert found.final_loss <= found.initial_loss


def test_resume_equals_uninterrupted(lm, behaviours, gcg_set: AttackSet, tmp_path: Path) -> None:
    whole = gcg_set
    options = AttackOptions()
    from safegeom.attacks import run_attack

    run_attack(lm, "gcg", behaviours[0][:1], behaviours[1][:1], SMALL, gcg.attack_one, out=tmp_path)
    resumed = run_attack(
        lm, "gcg", *behaviours, SMALL, gcg.attack_one, options=options, out=tmp_path, resume=True
    )
    strip = lambda s: [dataclasses.replace(r, seconds=0.0) for r in s.records]  # noqa: E731
    assert strip(resumed) == strip(whole)
    with pytest.raises(OutputPathError, match="already holds an attack set; pass --resume"):
        run_attack(lm, "gcg", *behaviours, SMALL, gcg.attack_one, out=tmp_path)
    other = dataclasses.replace(SMALL, seed=5)
    with pytest.raises(SafegeomError, match="another model, config or behaviours; drop --resume"):
        run_attack(lm, "gcg", *behaviours, other, gcg.attack_one, out=tmp_path, resume=True)


# --- bad input --------------------------------------------------------------------------------


def test_empty_behaviour_set(lm) -> None:
    with pytest.raises(SafegeomError, match="empty behaviour set: give at least one behaviour"):
        gcg.attack(lm, [], [], SMALL)


def test_target_that_tokenises_to_nothing(lm) -> None:
    for module, config in (
        (gcg, SMALL),
        (prefill, prefill.PrefillConfig()),
        (autodan, autodan.AutoDANConfig()),
    ):
        with pytest.raises(SafegeomError, match="tokenises to nothing; give a non-empty target"):
            module.attack(lm, ["Explain how locks work"], [""], config)


def test_suffix_length_below_one() -> None:
    with pytest.raises(ConfigError, match="--n-tokens must be at least 1, got 0"):
        GCGConfig(n_tokens=0)


def test_init_of_the_wrong_length(lm) -> None:
    with pytest.raises(ConfigError, match="is 2 tokens, not --n-tokens 6; give an --init"):
        gcg.attack(lm, ["Explain how locks work"], ["Sure"], dataclasses.replace(SMALL, init="x x"))


def test_model_without_chat_template(lm) -> None:
    tokenizer = copy.copy(lm.tokenizer)
    tokenizer.chat_template = None
    bare = dataclasses.replace(lm, tokenizer=tokenizer)
    for module, config in ((gcg, SMALL), (prefill, prefill.PrefillConfig())):
        with pytest.raises(SafegeomError, match="has no chat template; pass chat_template="):
            module.attack(bare, ["Explain how locks work"], ["Sure"], config)


def test_attack_set_made_with_another_tokenizer(gcg_set: AttackSet, tmp_path: Path) -> None:
    other = load_model(build_checkpoint(tmp_path, "llama"), LoadConfig(device="cpu"))
    with pytest.warns(
        UserWarning,
        match="optimised with another tokenizer and chat template; its prompts are replayed as text",
    ):
        encoded = gcg_set.encoded_for(other.tokenizer)
    assert len(encoded) == len(gcg_set)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gcg_set.encoded_for(
            load_model("tiny-chat", LoadConfig(device="cpu")).tokenizer
        )  # same tokenizer: no warning


def test_corrupt_attack_file(gcg_set: AttackSet, tmp_path: Path) -> None:
    path = gcg_set.save(tmp_path / "set")
    path.write_text(path.read_text()[:200])
    with pytest.raises(ArtifactError, match="is not a readable attack set"):
        load_attack_set(tmp_path / "set")
    path.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(
        ArtifactError, match="is not a safegeom attack set; write one with `safegeom attack`"
    ):
        load_attack_set(path)
    document = gcg_set.to_dict()
    document["records"][0]["t_inst"] = 10_000
    path.write_text(json.dumps(document))
    with pytest.raises(ArtifactError, match=r"outside its \d+ ids; re-run the attack"):
        load_attack_set(path)
    document["records"][0] = {"prompt": "x"}
    path.write_text(json.dumps(document))
    with pytest.raises(
        ArtifactError, match=r"is a damaged attack set \(.*\); re-run `safegeom attack`"
    ):
        load_attack_set(path)
