"""Multi-process code at the edges: the library is single-process, :mod:`safegeom.parallel` shards.

An AST scan finds every call of a rank primitive (:mod:`safegeom.parallel.ranks`) outside the
modules allowed to make one: :mod:`safegeom.parallel`, the command line, the audit runner and the
training runner and loop. The seam (:mod:`safegeom.execution`) is tested in one process.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import safegeom
from safegeom import execution
from safegeom.activations import CaptureConfig
from safegeom.errors import SafegeomError
from safegeom.evaluation import EvaluateConfig
from safegeom.execution import LEAVES, agreed, installed, shows_progress, twin
from safegeom.models import LoadConfig, LoadedModel, load_model
from safegeom.parallel import ranks
from safegeom.parallel.dispatch import TWINS, sharded_twin, sharding

PACKAGE = Path(safegeom.__file__).resolve().parent
ALLOWED = ("parallel/", "cli/", "audit/runner.py", "training/runner.py", "training/loop.py")
"""Paths (relative to the package) whose modules may call rank primitives."""
PRIMITIVES = frozenset(name for name in ranks.__all__ if name.islower())
"""The rank primitives: every function :mod:`safegeom.parallel.ranks` exports."""
RANK_MODULES = ("safegeom.parallel", "safegeom.distributed", "safegeom.process_group")
"""Modules whose functions count as rank primitives (with the names they had before)."""


def _from_ranks(module: str | None) -> bool:
    return bool(module) and any(module == m or module.startswith(m + ".") for m in RANK_MODULES)


def rank_calls(source: str) -> list[tuple[int, str]]:
    """``(line, name)`` of every call of a rank primitive in ``source``: a name imported from a
    rank module (under any alias), or an attribute of a rank module imported under a name."""
    tree = ast.parse(source)
    names: dict[str, str] = {}  # local name -> primitive
    modules: set[str] = set()  # local names bound to a rank module
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and _from_ranks(node.module):
            for alias in node.names:
                local = alias.asname or alias.name
                if alias.name in PRIMITIVES:
                    names[local] = alias.name
                else:  # from safegeom.parallel import ranks (as dist)
                    modules.add(local)
        elif isinstance(node, ast.ImportFrom) and node.module == "safegeom":
            modules.update(a.asname or a.name for a in node.names if a.name == "distributed")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if _from_ranks(alias.name):
                    modules.add(alias.asname or alias.name.split(".")[0])
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in names:
            found.append((node.lineno, names[func.id]))
        elif isinstance(func, ast.Attribute) and func.attr in PRIMITIVES:
            base = func.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in modules:
                found.append((node.lineno, func.attr))
    return found


def _library_modules() -> list[Path]:
    return [
        path
        for path in sorted(PACKAGE.rglob("*.py"))
        if not path.relative_to(PACKAGE).as_posix().startswith(ALLOWED)
    ]


def test_no_library_module_calls_a_rank_primitive() -> None:
    """Outside safegeom.parallel, the CLI and the two runners, nothing calls a rank primitive."""
    calls = {
        f"{path.relative_to(PACKAGE)}:{line} {name}()"
        for path in _library_modules()
        for line, name in rank_calls(path.read_text(encoding="utf-8"))
    }
    assert sorted(calls) == []


def test_no_library_module_imports_the_parallel_package() -> None:
    """The library never imports safegeom.parallel (that package imports the library)."""
    importers = []
    for path in _library_modules():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            imported = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            if any(_from_ranks(name) for name in imported):
                importers.append(str(path.relative_to(PACKAGE)))
    assert importers == []


def test_the_scan_finds_calls_under_any_import_form() -> None:
    source = (
        "from safegeom.parallel.ranks import world_size as n, gather\n"
        "from safegeom.parallel import ranks as dist\n"
        "import safegeom.parallel.ranks\n"
        "x.gather(0, y)\n"  # a tensor's gather is not a rank primitive
        "n(); gather([], [], 0); dist.broadcast(1); safegeom.parallel.ranks.alone()\n"
    )
    assert rank_calls(source) == [(5, "world_size"), (5, "gather"), (5, "broadcast"), (5, "alone")]
    runner = (PACKAGE / "audit" / "runner.py").read_text(encoding="utf-8")
    assert len(rank_calls(runner)) > 5  # an allowed module: the scan sees its calls


def test_every_leaf_has_a_sharded_twin() -> None:
    assert set(TWINS) == set(LEAVES)


def test_unknown_leaf_is_refused() -> None:
    with pytest.raises(SafegeomError, match=r"unknown leaf 'captur': expected one of agreed, "):
        twin("captur")


def test_one_process_runs_every_leaf_itself_even_under_sharding() -> None:
    with sharding():
        assert [name for name in LEAVES if twin(name) is not None] == []
        assert shows_progress() is True
        assert agreed(sum, [1, 2]) == 3
    assert execution.twin("capture") is None


def test_sharded_twin_follows_the_number_of_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ranks, "world_size", lambda: 2)
    assert sharded_twin("row_scores") is TWINS["row_scores"]
    assert sharded_twin("device") is None  # no launcher in this process's environment


@pytest.fixture(scope="module")
def tiny_lm() -> LoadedModel:
    return load_model("tiny-chat", LoadConfig(device="cpu"))


PROMPTS = ["How do I bake bread?", "Hi", "Write a poem about the sea.", "How do I pick a lock?"]


def test_the_twins_in_one_process_give_the_library_numbers(tiny_lm: LoadedModel) -> None:
    """Every sharded twin run in one process (no collective has a peer) equals the library's
    single-process leaf bit for bit: the leaves and their twins compute the same batches."""
    from safegeom.activations import capture, capture_stats
    from safegeom.carriers.row_scores import row_scores
    from safegeom.evaluation import evaluate, refusal_scores
    from safegeom.models.chat import encode_set

    rows = encode_set(tiny_lm.tokenizer, PROMPTS, chat_template=tiny_lm.chat_template).encoded

    def run() -> list:
        acts = capture(tiny_lm, PROMPTS, CaptureConfig(layers="1,2", batch_size=3), progress=False)
        stats = capture_stats(
            tiny_lm, PROMPTS, CaptureConfig(layers="1", batch_size=3), progress=False
        )
        result = evaluate(
            tiny_lm, PROMPTS, EvaluateConfig(max_new_tokens=3, n_resamples=20), progress=False
        )
        return [
            acts.data["resid_pre"],
            stats.moments["resid_pre"].mean,
            refusal_scores(tiny_lm, PROMPTS, batch_size=3, progress=False),
            row_scores(tiny_lm, rows, lambda lp, _: lp[:, :5], batch_size=2),
            result.completions,
        ]

    alone = run()
    with installed(TWINS.get):  # the twins, whatever the number of processes
        shared = run()
    for mine, theirs in zip(alone, shared, strict=True):
        if isinstance(mine, torch.Tensor):
            assert torch.equal(mine, theirs)
        else:
            assert mine == theirs


def test_a_leaf_hands_over_to_its_installed_twin(tiny_lm: LoadedModel) -> None:
    """capture, refusal_scores and row scores call the twin instead of running themselves."""
    from safegeom.activations import capture
    from safegeom.carriers.row_scores import row_scores
    from safegeom.evaluation import refusal_scores

    seen: list[str] = []

    def lookup(name: str):
        if name not in ("capture", "refusal_scores", "row_scores"):
            return None

        def fake(*args, **kwargs):
            seen.append(name)
            return name

        return fake

    with installed(lookup):
        assert capture(tiny_lm, ["hi"], progress=False) == "capture"
        assert refusal_scores(tiny_lm, ["hi"], progress=False) == "refusal_scores"
        assert row_scores(tiny_lm, [], lambda lp, rows: lp, batch_size=1) == "row_scores"
    assert seen == ["capture", "refusal_scores", "row_scores"]
