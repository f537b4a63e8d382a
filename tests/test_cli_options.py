"""Config dataclasses become command-line options: types, defaults, help, lists, one-line errors."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal

import pytest

from safegeom.cli import Parser, main
from safegeom.cli.options import add_config, config_from_args, configs_of
from safegeom.config import check, field_docs
from safegeom.errors import ConfigError
from safegeom.models.positions import LayerSpec, PositionSpec


@dataclass(frozen=True)
class Example:
    """A config with every kind of field."""

    path: str = field(metadata={"positional": True})
    """Where to read from."""
    n_val: int = 8
    """Prompts per class."""
    coeff: float = 1.0
    """A coefficient."""
    progress: bool = True
    """Show a progress bar."""
    mode: Literal["a", "b"] = "a"
    """Which mode."""
    strengths: tuple[float, ...] = (0.5, 1.0)
    """Multiples of the norm."""
    files: tuple[str, ...] = field(default=(), metadata={"repeat": True})
    """Repeatable files."""
    layers: LayerSpec = LayerSpec("all")
    """Layers."""
    positions: PositionSpec = PositionSpec("t_post")
    """Positions."""
    system: str | None = None
    """A system prompt."""

    def __post_init__(self) -> None:
        check(self.n_val >= 1, "n_val", "must be at least 1", self.n_val)


def _parser() -> argparse.ArgumentParser:
    parser = Parser(prog="t", exit_on_error=False)
    add_config(parser, Example)
    return parser


def test_fields_become_options_with_types_and_defaults() -> None:
    parser = _parser()
    assert configs_of(parser) == (Example,)
    c = config_from_args(Example, parser.parse_args(["p"]))
    assert c == Example(path="p")
    argv = ["p", "--n-val", "3", "--coeff", "-2", "--no-progress", "--mode", "b"]
    argv += ["--strengths", "-1,2", "--files", "x,y", "--files", "z", "--layers", "2-3"]
    argv += ["--positions", "t_inst,-1", "--system", "Be brief."]
    c = config_from_args(Example, parser.parse_args(argv))
    assert (c.n_val, c.coeff, c.progress, c.mode) == (3, -2.0, False, "b")
    assert c.strengths == (-1.0, 2.0) and c.files == ("x", "y", "z")
    assert c.layers.resolve(4) == (2, 3) and c.positions.items == ("t_inst", -1)
    assert c.system == "Be brief."


def test_help_is_the_field_docstring_with_the_default() -> None:
    text = _parser().format_help()
    assert (
        "Prompts per class. (default: 8)" in text
        and "Multiples of the norm. (default: 0.5,1.0)" in text
    )
    assert "--progress, --no-progress" in text
    assert field_docs(Example)["files"] == "Repeatable files."


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["p", "--strengths", "a,b"], "'a' is not a number"),
        (["p", "--strengths", ""], "'' is not a comma-separated list"),
        (["p", "--coeff", "nan"], "'nan' is not a finite number"),
        (["p", "--n-val", "x"], "'x' is not a whole number"),
        (["p", "--layers", "x"], "bad layer spec 'x'"),
        (["p", "--positions", "first"], "unknown position 'first'"),
    ],
)
def test_bad_values_are_named(argv: list[str], message: str) -> None:
    with pytest.raises(argparse.ArgumentError, match=message):
        _parser().parse_args(argv)


def test_range_errors_name_field_and_flag() -> None:
    with pytest.raises(ConfigError, match=r"n_val \(--n-val\) must be at least 1, got 0"):
        config_from_args(Example, _parser().parse_args(["p", "--n-val", "0"]))


def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["capture", "tiny-chat", "--prompts", "advbench:val", "--out", "x", "--layers", "x"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad layer spec 'x'" in err[0] and "--help" in err[0]


def _run_with(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> int:
    import safegeom.cli.capture as capture_cli

    def fail(args: argparse.Namespace) -> int:
        raise error

    monkeypatch.setattr(capture_cli, "run", fail)
    return main(["capture", "tiny-chat", "--prompts", "advbench:val", "--out", "x.safetensors"])


def test_only_library_errors_become_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    assert _run_with(monkeypatch, ConfigError("n_val (--n-val) must be positive\nmore")) == 2
    assert capsys.readouterr().err == "safegeom capture: error: n_val (--n-val) must be positive\n"
    with pytest.raises(KeyError, match="a bug"):  # a bug keeps its traceback
        _run_with(monkeypatch, KeyError("a bug"))
    assert _run_with(monkeypatch, KeyboardInterrupt()) == 130
    assert capsys.readouterr().err == "safegeom capture: interrupted\n"


def test_a_command_module_that_fails_to_import_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    from safegeom import cli

    real = importlib.import_module

    def broken(name: str, *args: object) -> object:
        if name == "safegeom.cli.sweep":
            raise ImportError("sweep is broken")
        return real(name, *args)

    monkeypatch.setattr(cli.importlib, "import_module", broken)
    with pytest.raises(ImportError, match="sweep is broken"):
        cli.build_parser()


def test_a_tuple_positional_takes_one_or_more_values() -> None:
    @dataclass(frozen=True)
    class Paths:
        """Paths."""

        paths: tuple[str, ...] = field(metadata={"positional": True})
        """One or more folders."""

    parser = Parser(prog="t", exit_on_error=False)
    add_config(parser, Paths)
    assert config_from_args(Paths, parser.parse_args(["a", "b"])).paths == ("a", "b")
    with pytest.raises(SystemExit):
        parser.parse_args([])


@dataclass(frozen=True)
class PromptOptions:
    """A config with a prompt SPEC option and a positional one."""

    source: str = field(metadata={"positional": True})
    """Where: a bundled set[:split] or a file."""
    harmful: str = "advbench:val"
    """Harmful prompt set: bundled set[:split] or a CSV/JSON/JSONL file."""
    note: str = "x"
    """Not a prompt set."""


def test_a_prompt_spec_help_lists_every_bundled_set(capsys: pytest.CaptureFixture) -> None:
    from safegeom.prompts import BUNDLED

    parser = argparse.ArgumentParser()
    add_config(parser, PromptOptions)
    helps = {a.dest: a.help for a in parser._actions}
    names = f"bundled set[:train|val|test] ({', '.join(BUNDLED)})"
    assert helps["PromptOptions.harmful"] == (
        f"Harmful prompt set: {names} or a CSV/JSON/JSONL file. (default: advbench:val)"
    )
    assert helps["PromptOptions.source"] == f"Where: a {names} or a file."
    assert helps["PromptOptions.note"] == "Not a prompt set. (default: x)"
    assert {"harmbench", "harmbench-train", "strongreject-noadvbench"} <= set(BUNDLED)
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    out = "".join(capsys.readouterr().out.split())  # argparse wraps lines, at hyphens too
    assert "(" + ",".join(BUNDLED) + "),aCSV/JSON/JSONLfile,oranattackset'sfolder" in out
