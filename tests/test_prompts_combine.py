"""Several prompt sets as one (the audit's carrier sets)."""

from __future__ import annotations

import pytest

from safegeom.errors import SafegeomError
from safegeom.prompts import PromptSet, combine_prompts, load_prompts


def test_sets_are_joined_in_order_with_aligned_fields() -> None:
    a, b = load_prompts("advbench:train"), load_prompts("jbb-harmful:train")
    both = combine_prompts(["advbench:train", b])
    assert both.name == "advbench:train+jbb-harmful:train"
    assert both.prompts == a.prompts + b.prompts
    assert both.completions == a.completions + b.completions  # both sets have targets
    assert combine_prompts(["advbench:train", "alpaca:train"], n_each=3).prompts == (
        a.prompts[:3] + load_prompts("alpaca:train").prompts[:3]
    )


def test_fields_that_one_set_lacks_are_dropped() -> None:
    mixed = combine_prompts([PromptSet("x", ("a",), completions=("b",)), PromptSet("y", ("c",))])
    assert mixed.prompts == ("a", "c") and mixed.completions is None


def test_one_set_is_returned_as_it_is_and_none_is_refused() -> None:
    assert combine_prompts(["advbench:val"]) == load_prompts("advbench:val")
    with pytest.raises(SafegeomError, match="no prompt set to combine"):
        combine_prompts([])
    with pytest.raises(SafegeomError, match="unknown prompt set 'nope'"):
        combine_prompts(["advbench:val", "nope"])
