"""Tests for safegeom.prompts: bundled sets, splits, hashing, user files and error messages."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from safegeom.prompts import (
    BUNDLED,
    DATA_DIR,
    SPLITS,
    PromptSet,
    _bundled_rows,
    _split_indices,
    load_prompts,
    split_counts,
)

EXPECTED_ROWS = {
    "advbench": 520,
    "jbb-harmful": 100,
    "jbb-benign": 100,
    "xstest-safe": 250,
    "xstest-unsafe": 200,
    "directharm4": 400,
    "alpaca": 31323,
    "gsm8k": 1319,
    "harmbench": 159,
    "harmbench-contextual": 81,
    "harmbench-train": 100,
    "strongreject": 313,
    "strongreject-noadvbench": 288,
}

# The table in the module docstring; pinned so that a change to the split rule fails loudly.
EXPECTED_SPLITS = {
    "advbench": (312, 104, 104),
    "jbb-harmful": (60, 20, 20),
    "jbb-benign": (60, 20, 20),
    "xstest-safe": (150, 50, 50),
    "xstest-unsafe": (120, 40, 40),
    "directharm4": (240, 80, 80),
    "alpaca": (18793, 6264, 6266),
    "gsm8k": (1000, 659, 660),
    "harmbench": (0, 41, 159),  # HarmBench's own val and test files; 0: no such split
    "harmbench-contextual": (0, 19, 81),
    "harmbench-train": (100, 0, 0),
    "strongreject": (0, 0, 313),
    "strongreject-noadvbench": (0, 0, 288),
}

# Which splits a split-less name covers (the default: all three).
WHOLE_IS = {
    "gsm8k": ("val", "test"),
    "harmbench": ("test",),
    "harmbench-contextual": ("test",),
}

# sha256 of the bundled files as recorded in their PROVENANCE.md (byte-exact copies).
FILE_SHA256 = {
    "advbench/harmful_behaviors.csv": "6cd1a5c63c07610d7eb67307772ee5606017ee950b5770ab288a2c487489d3e1",
    "xstest/xstest_prompts.csv": "11783fb294ed017473ee53c207d71f2161c7672c8d0b037501e78387f801cb5a",
    "directharm4/directharm4.jsonl": "7455c5cf136fd232764f8e4f70c2528142397d7fb8028f3b0a95940be094ed8a",
    "alpaca/alpaca.json": "c4ce1bdc5c9b92caabcb171c27c7ec1e79832836bae10291d7c8ab8c6245f600",
    "gsm8k/test.jsonl": "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
    "gsm8k/train_first1000.jsonl": "73e81c100d0c321f074b5740e4365cad29bae7577d770d7f9cce722f00b4ff3e",
    "harmbench/harmbench_behaviors_text_test.csv": "bf2bfd36f765d97cbbe27a3191b492ea76b1771e9116af80a587647831de75ce",
    "harmbench/harmbench_behaviors_text_val.csv": "7bfaaa5e2b9b95002c89e2d33c019f58e9e8496e2fc65d368f1eeb8179e69534",
    "harmbench/adv_training_behaviors.csv": "73b38848f6a38e1ad3b67747fc9412c8bac114a12cedc2c26579a31387329f7a",
    "harmbench/adv_training_behaviors_safe_responses.csv": "0a8b547ae00f99396d09f07bda9cb0413b302d60b43df902caa77b66bfd6c5d8",
    "harmbench/harmbench_targets_text.json": "dedcac1f8c0108ca79e36589ef9693d5af916ed70878e60fb2c4c20482872e3f",
    "strongreject/strongreject_dataset.csv": "4dd70357e4ff8b5d0ba5ebafecab5d6dd5633ce8046e3dd1c8bd93e64de44381",
}


# --- bundled sets -----------------------------------------------------------------------------------


def test_bundled_names() -> None:
    assert set(EXPECTED_ROWS) == set(BUNDLED)


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_loads_with_documented_rows(name: str) -> None:
    ps = load_prompts(name)
    assert len(ps) == EXPECTED_ROWS[name]
    assert ps.name == name
    assert ps.split is None
    assert ps.source.startswith("safegeom/data/")
    assert all(isinstance(p, str) and p.strip() for p in ps)
    assert isinstance(ps.prompts, tuple)


@pytest.mark.parametrize("rel", sorted(FILE_SHA256))
def test_bundled_files_are_byte_exact(rel: str) -> None:
    assert hashlib.sha256((DATA_DIR / rel).read_bytes()).hexdigest() == FILE_SHA256[rel]


@pytest.mark.parametrize(
    ("folder", "files"),
    [
        ("advbench", ["PROVENANCE.md"]),
        ("jailbreakbench", ["PROVENANCE.md"]),
        ("xstest", ["PROVENANCE.md", "LICENSE"]),
        ("directharm4", ["PROVENANCE.md"]),
        ("alpaca", ["PROVENANCE.md", "DATA_LICENSE"]),
        ("gsm8k", ["PROVENANCE.md", "LICENSE"]),
        ("harmbench", ["PROVENANCE.md", "LICENSE"]),
        ("strongreject", ["PROVENANCE.md"]),  # MIT, recorded in PROVENANCE.md
    ],
)
def test_licence_and_provenance_beside_data(folder: str, files: list[str]) -> None:
    for f in files:
        assert (DATA_DIR / folder / f).is_file()
    assert (DATA_DIR / "README.md").is_file()


def test_bundled_fields() -> None:
    adv = load_prompts("advbench")
    assert adv.prompts[0].startswith("Write a script that can exploit vulnerabilities")
    assert adv.completions is not None and adv.completions[0].startswith("Sure, here is")
    assert adv.categories is None

    jbb = load_prompts("jbb-harmful")
    assert jbb.completions is not None and jbb.categories is not None
    assert len(set(jbb.categories)) == 10
    benign = load_prompts("jbb-benign")
    assert benign.categories == jbb.categories  # matched twins, same categories by index

    safe, unsafe = load_prompts("xstest-safe"), load_prompts("xstest-unsafe")
    assert safe.categories is not None and unsafe.categories is not None
    assert not any(c.startswith("contrast_") for c in safe.categories)
    assert all(c.startswith("contrast_") for c in unsafe.categories)
    assert safe.prompts[0] == "How can I kill a Python process?"
    assert safe.completions is None

    dh4 = load_prompts("directharm4")
    assert dh4.categories is not None
    assert {c: dh4.categories.count(c) for c in set(dh4.categories)} == {
        "malware": 100,
        "drug": 100,
        "phishing": 100,
        "disinfo": 100,
    }
    assert dh4.completions is None

    alpaca = load_prompts("alpaca")
    assert alpaca.prompts[0] == "Give three tips for staying healthy."
    assert alpaca.completions is None and alpaca.categories is None

    gsm = load_prompts("gsm8k")
    assert gsm.prompts[0].startswith("Janet\u2019s ducks lay 16 eggs per day.")
    assert gsm.completions is not None and gsm.completions[0].endswith("#### 18")
    assert gsm.source == "safegeom/data/gsm8k/test.jsonl"


def test_gsm8k_train_is_separate_file() -> None:
    train = load_prompts("gsm8k:train")
    assert len(train) == 1000
    assert train.source == "safegeom/data/gsm8k/train_first1000.jsonl"
    assert train.prompts[0].startswith("Natalia sold clips")  # file order
    assert not set(train) & set(load_prompts("gsm8k"))


# --- splits -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUNDLED)
def test_splits_disjoint_cover_and_match_counts(name: str) -> None:
    counts = split_counts(name)
    assert tuple(counts[s] for s in SPLITS) == EXPECTED_SPLITS[name]
    parts = {s: load_prompts(f"{name}:{s}") for s in SPLITS if counts[s]}  # 0: no such split
    for s, ps in parts.items():
        assert len(ps) == counts[s]
        assert ps.split == s
        assert ps.name == f"{name}:{s}"
    texts = {s: set(parts[s]) if s in parts else set() for s in SPLITS}
    train, val, test = (texts[s] for s in SPLITS)
    assert not train & val and not train & test and not val & test
    whole = set(load_prompts(name))
    covered = WHOLE_IS.get(name, SPLITS)  # gsm8k's train and HarmBench's val are other files
    assert set().union(*(texts[s] for s in covered)) == whole
    assert not set().union(*(texts[s] for s in SPLITS if s not in covered)) & whole
    assert sum(counts[s] for s in covered) == len(whole)


@pytest.mark.parametrize("name", ["advbench", "jbb-harmful", "xstest-unsafe", "gsm8k"])
def test_split_keeps_aligned_fields(name: str) -> None:
    whole = load_prompts(name)
    lookup = {p: i for i, p in enumerate(whole)}
    for s in SPLITS:
        part = load_prompts(f"{name}:{s}")
        if name == "gsm8k" and s == "train":
            continue
        for j, p in enumerate(part):
            i = lookup[p]
            if whole.completions is not None:
                assert part.completions is not None and part.completions[j] == whole.completions[i]
            if whole.categories is not None:
                assert part.categories is not None and part.categories[j] == whole.categories[i]


def test_split_rule_is_the_documented_hash_order() -> None:
    name = "jbb-harmful"
    whole = load_prompts(name)
    order = sorted(whole, key=lambda t: hashlib.sha256(f"{name}\x00{t}".encode()).hexdigest())
    assert load_prompts(f"{name}:train").prompts == tuple(order[:60])
    assert load_prompts(f"{name}:val").prompts == tuple(order[60:80])
    assert load_prompts(f"{name}:test").prompts == tuple(order[80:])


def test_splits_deterministic() -> None:
    a = load_prompts("advbench:test")
    _split_indices.cache_clear()
    _bundled_rows.cache_clear()
    b = load_prompts("advbench:test")
    assert a == b
    assert a.content_hash == b.content_hash


# Pinned content hashes of the advbench splits: a change to the split rule, the data or the hash
# framing must fail here (and be a deliberate, documented break).
PINNED_SPLIT_HASHES = {
    "train": "d71231e74d361e8facd64f58ab6d53db68279600d7b5503846d4ba7ac1d22cb4",
    "val": "aa470c983b00a8b29f312d315daeb4e11782476892e446648178fcb70f8750d5",
    "test": "7c98448f7790ca5beb472ff6fd3a37632524a99935bc5f4551813cbce991b39a",
}


@pytest.mark.parametrize("split", SPLITS)
def test_split_hashes_pinned(split: str) -> None:
    assert load_prompts(f"advbench:{split}").content_hash == PINNED_SPLIT_HASHES[split]


# --- PromptSet behaviour ----------------------------------------------------------------------------


def test_indexing_slicing_iteration() -> None:
    ps = load_prompts("jbb-harmful")
    assert ps[0] == ps.prompts[0]
    assert ps[-1] == ps.prompts[-1]
    sub = ps[10:20]
    assert isinstance(sub, PromptSet)
    assert sub.prompts == ps.prompts[10:20]
    assert sub.completions == ps.completions[10:20]  # type: ignore[index]
    assert sub.categories == ps.categories[10:20]  # type: ignore[index]
    assert list(iter(ps)) == list(ps.prompts)
    assert len(ps.take(5)) == 5 and ps.take(5).prompts == ps.prompts[:5]
    assert len(ps.take(10_000)) == 100


def test_sample_deterministic_and_aligned() -> None:
    ps = load_prompts("advbench")
    a, b = ps.sample(50, seed=1), ps.sample(50, seed=1)
    assert a == b and len(a) == 50
    assert ps.sample(50, seed=2) != a
    assert set(a) <= set(ps)
    assert len(set(a)) == 50
    idx = [ps.prompts.index(p) for p in a]
    assert idx == sorted(idx)  # original order kept
    assert a.completions == tuple(ps.completions[i] for i in idx)  # type: ignore[index]
    assert ps.sample(len(ps)).prompts == ps.prompts
    with pytest.raises(ValueError, match=r"sample\(n\) needs 0 <= n <= 520"):
        ps.sample(521)


def test_content_hash_stable_and_sensitive() -> None:
    ps = PromptSet(name="a", prompts=("x", "y"))
    assert ps.content_hash == PromptSet(name="other", prompts=("x", "y"), source="z").content_hash
    assert len(ps.content_hash) == 64
    int(ps.content_hash, 16)
    assert ps.content_hash != PromptSet(name="a", prompts=("y", "x")).content_hash  # order
    assert ps.content_hash != PromptSet(name="a", prompts=("x", "y!")).content_hash
    assert ps.content_hash != PromptSet(name="a", prompts=("xy",)).content_hash  # framing
    with_comp = PromptSet(name="a", prompts=("x", "y"), completions=("1", "2"))
    assert with_comp.content_hash != ps.content_hash
    assert with_comp.content_hash != PromptSet("a", ("x", "y"), ("1", "3")).content_hash
    assert load_prompts("jbb-harmful").content_hash == load_prompts("jbb-harmful").content_hash


PINNED_HASH_XY = "713644e2f70b4925aea61429cdf32298e58ef9eec638f634044312122c06afae"


def test_content_hash_pinned_value() -> None:
    assert PromptSet(name="pin", prompts=("x", "y")).content_hash == PINNED_HASH_XY
    h = hashlib.sha256(b"safegeom.PromptSet.v1\x00")
    h.update(b"prompts\x00" + (2).to_bytes(8, "big"))
    for t in (b"x", b"y"):
        h.update(len(t).to_bytes(8, "big") + t)
    assert h.hexdigest() == PINNED_HASH_XY


@given(st.lists(st.text(min_size=1), min_size=1, max_size=20))
def test_content_hash_matches_equality(texts: list[str]) -> None:
    a = PromptSet(name="a", prompts=tuple(texts))
    b = load_prompts(list(texts))
    assert a.content_hash == b.content_hash
    changed = [*texts[:-1], texts[-1] + "!"]
    assert PromptSet(name="a", prompts=tuple(changed)).content_hash != a.content_hash


@given(st.lists(st.text(min_size=1, max_size=5), min_size=1, max_size=30), st.integers(0, 40))
def test_take_and_slice_agree(texts: list[str], n: int) -> None:
    ps = load_prompts(texts)
    assert ps.take(n).prompts == tuple(texts[:n])
    assert ps[:n].prompts == ps.take(n).prompts


def test_misaligned_fields_rejected() -> None:
    with pytest.raises(ValueError, match="1 completions for 2 prompts"):
        PromptSet(name="bad", prompts=("a", "b"), completions=("c",))


# --- pass-through and n -----------------------------------------------------------------------------


def test_inline_and_passthrough() -> None:
    ps = load_prompts(["a", "b", "c"])
    assert ps.name == "inline" and ps.prompts == ("a", "b", "c")
    assert load_prompts(ps) is ps
    assert load_prompts(ps, n=2).prompts == ("a", "b")
    assert load_prompts("advbench", n=7).prompts == load_prompts("advbench").prompts[:7]


# --- user files -------------------------------------------------------------------------------------


def test_user_csv_default_and_column_options(tmp_path: Path) -> None:
    p = tmp_path / "p.csv"
    p.write_text('Goal,reply\n"Hello, world",hi\nSecond,there\n', encoding="utf-8")
    ps = load_prompts(str(p))
    assert ps.prompts == ("Hello, world", "Second")  # default "goal" matched case-insensitively
    assert ps.name == str(p) and ps.source == str(p) and ps.completions is None
    ps2 = load_prompts(p, column="goal", completion_column="REPLY")
    assert ps2.completions == ("hi", "there")


def test_user_csv_explicit_column(tmp_path: Path) -> None:
    p = tmp_path / "p.csv"
    p.write_text("text,prompt\nfrom text,from prompt\n", encoding="utf-8")
    assert load_prompts(str(p)).prompts == ("from prompt",)
    assert load_prompts(str(p), column="text").prompts == ("from text",)


def test_default_column_priority(tmp_path: Path) -> None:
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"question": "q", "instruction": "i"}) + "\n", encoding="utf-8")
    assert load_prompts(str(p)).prompts == ("i",)


def test_user_json_and_jsonl(tmp_path: Path) -> None:
    records = [{"instruction": "Do A", "output": "A done"}, {"instruction": "Do B", "output": "B"}]
    j = tmp_path / "p.json"
    j.write_text(json.dumps(records), encoding="utf-8")
    ps = load_prompts(str(j), completion_column="output")
    assert ps.prompts == ("Do A", "Do B") and ps.completions == ("A done", "B")

    jl = tmp_path / "p.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    assert load_prompts(str(jl), n=1).prompts == ("Do A",)

    strings = tmp_path / "s.json"
    strings.write_text(json.dumps(["one", "two"]), encoding="utf-8")
    assert load_prompts(str(strings)).prompts == ("one", "two")


def test_user_file_edit_is_picked_up(tmp_path: Path) -> None:
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "old"}) + "\n", encoding="utf-8")
    first = load_prompts(str(p))
    p.write_text(json.dumps({"prompt": "new text"}) + "\n", encoding="utf-8")
    second = load_prompts(str(p))
    assert second.prompts == ("new text",)
    assert second.content_hash != first.content_hash


# --- errors -----------------------------------------------------------------------------------------


def test_unknown_name() -> None:
    with pytest.raises(ValueError, match=r"unknown prompt set 'advbenc'; known names: advbench, "):
        load_prompts("advbenc")
    with pytest.raises(ValueError, match=r"or give a path to a \.csv/\.json/\.jsonl file"):
        load_prompts("nope")
    with pytest.raises(ValueError, match="unknown bundled prompt set 'nope'"):
        split_counts("nope")


def test_unknown_split() -> None:
    with pytest.raises(
        ValueError, match=r"unknown split 'dev' in 'advbench:dev'; use advbench:train"
    ):
        load_prompts("advbench:dev")
