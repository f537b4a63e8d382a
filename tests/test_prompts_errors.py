"""Bad prompt files fail with a message naming the file, the row and the flag (issue 10, item 7)."""

from __future__ import annotations

from pathlib import Path

import pytest

from safegeom.errors import NotFoundError, SafegeomError
from safegeom.prompts import load_prompts


def _csv(tmp_path: Path, text: str, name: str = "p.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_unterminated_quote_at_eof(tmp_path: Path) -> None:
    path = _csv(tmp_path, 'prompt,label\nfirst,1\n"second,2\nthird,3\nfourth,4\n')
    with pytest.raises(
        SafegeomError,
        match=r"p\.csv' row 1 \(from line 3\): unexpected end of "
        r"data; a quote \(\"\) is not closed",
    ):
        load_prompts(path)


def test_quote_closed_rows_later_is_caught(tmp_path: Path) -> None:
    path = _csv(tmp_path, 'prompt,label\nfirst,1\n"second,2\nthird,3\nfourth",4\nfifth,5\n')
    with pytest.raises(
        SafegeomError,
        match=r"p\.csv' row 1: a quoted field runs over 3 lines "
        r"that look like rows of their own",
    ):
        load_prompts(path)


def test_quoted_multiline_prompt_still_loads(tmp_path: Path) -> None:
    path = _csv(tmp_path, 'prompt,label\n"line one\nline two",1\n"say ""hi""",2\n')
    assert load_prompts(path).prompts == ("line one\nline two", 'say "hi"')


def test_non_utf8_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes("prompt\ncaf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(
        SafegeomError,
        match=r"prompt file '.*latin\.csv' is not UTF-8 text "
        r"\(byte 10 is b'\\xe9'\); re-save it as UTF-8",
    ):
        load_prompts(path)
    jsonl = tmp_path / "latin.jsonl"
    jsonl.write_bytes('{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(SafegeomError, match=r"latin\.jsonl' is not UTF-8 text"):
        load_prompts(jsonl)


def test_utf8_bom_is_not_part_of_the_first_column(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffprompt\nhello\n".encode())
    assert load_prompts(path).prompts == ("hello",)


def test_messages_name_the_flags(tmp_path: Path) -> None:
    with pytest.raises(SafegeomError, match=r"n \(--limit\) must be a positive number"):
        load_prompts("advbench", n=0)
    path = _csv(tmp_path, "text,label\nhello,1\n")
    with pytest.raises(SafegeomError, match=r"no column 'body'.*pick one with --column \(column="):
        load_prompts(path, column="body")


def test_bad_inputs_are_safegeom_errors(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="unknown prompt set 'nosuchset'"):
        load_prompts("nosuchset")
    with pytest.raises(NotFoundError, match="unknown split 'dev'"):
        load_prompts("advbench:dev")
    with pytest.raises(NotFoundError, match=r"prompt file '.*gone\.csv' does not exist"):
        load_prompts(tmp_path / "gone.csv")
    with pytest.raises(SafegeomError, match=r"cannot parse .* as JSON"):
        load_prompts(_csv(tmp_path, "{not json", "bad.json"))
    with pytest.raises(SafegeomError, match="cannot load prompts from int"):
        load_prompts(3)  # type: ignore[arg-type]


# --- moved from test_prompts.py (file size) ---


def test_missing_column(tmp_path: Path) -> None:
    p = tmp_path / "p.csv"
    p.write_text("text,label\nhello,1\n", encoding="utf-8")
    with pytest.raises(
        ValueError,
        match=r"has none of prompt, instruction, goal, question; its "
        r"columns are 'text', 'label'; pick one with --column \(column= in Python\)",
    ):
        load_prompts(str(p))
    with pytest.raises(ValueError, match=r"no column 'body'; its columns are 'text', 'label'"):
        load_prompts(str(p), column="body")
    with pytest.raises(ValueError, match=r"no column 'out'.*completion_column= option"):
        load_prompts(str(p), column="text", completion_column="out")


def test_empty_sets(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="prompt set 'inline' is empty"):
        load_prompts([])
    p = tmp_path / "e.csv"
    p.write_text("prompt\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"e\.csv' is empty; give at least one prompt"):
        load_prompts(str(p))
    j = tmp_path / "e.jsonl"
    j.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="is empty"):
        load_prompts(str(j))
    with pytest.raises(
        ValueError, match=r"n \(--limit\) must be a positive number of prompts, got 0"
    ):
        load_prompts("advbench", n=0)


def test_empty_cell(tmp_path: Path) -> None:
    p = tmp_path / "p.csv"
    p.write_text('prompt\nok\n""\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"row 1: column 'prompt' is missing or empty"):
        load_prompts(str(p))


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.csv"
    with pytest.raises(ValueError, match=r"prompt file '.*missing\.csv' does not exist"):
        load_prompts(str(missing))


def test_unsupported_extension(tmp_path: Path) -> None:
    p = tmp_path / "p.txt"
    p.write_text("hello\n", encoding="utf-8")
    with pytest.raises(
        ValueError, match=r"unsupported prompt file type '\.txt'.*use \.csv, \.json"
    ):
        load_prompts(str(p))


def test_bad_json(tmp_path: Path) -> None:
    p = tmp_path / "p.json"
    p.write_text('{"prompt": "x"}', encoding="utf-8")
    with pytest.raises(ValueError, match="must hold a JSON array"):
        load_prompts(str(p))
    p.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ValueError, match="item 0 is int; expected an object or a string"):
        load_prompts(str(p))
    q = tmp_path / "q.jsonl"
    q.write_text("{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"cannot parse .* as JSONL"):
        load_prompts(str(q))


def test_bad_spec_type() -> None:
    with pytest.raises(ValueError, match="cannot load prompts from int"):
        load_prompts(3)  # type: ignore[arg-type]
