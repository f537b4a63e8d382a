"""Every notebook runs from any folder: the repository's own folders are found from the package
(:func:`safegeom.checkout.repository_root`), never by a search upward from the working directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from safegeom.checkout import repository_root
from safegeom.errors import NotFoundError

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _code(notebook: Path) -> str:
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


def test_repository_root_is_found_from_another_folder(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert repository_root("analyses", "figures") == ROOT


def test_a_folder_the_checkout_lacks_is_named_with_the_fix() -> None:
    with pytest.raises(NotFoundError) as caught:
        repository_root("analyses", "no-such-folder")
    message = str(caught.value)
    assert len(message.splitlines()) == 1
    assert "has no no-such-folder/" in message and "pip install -e ." in message


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_no_notebook_depends_on_its_working_directory(notebook: Path) -> None:
    code = _code(notebook)
    assert "Path.cwd()" not in code and "os.getcwd(" not in code and "chdir(" not in code


def test_defences_notebook_runs_outside_the_repository(tmp_path, monkeypatch) -> None:
    """The notebook that reads analyses/ and figures/, executed with a working directory outside
    the repository (it failed there with a bare StopIteration)."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(ROOT / "notebooks" / "03_defences.ipynb", as_version=4)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel is a child process: one thread there
    NotebookClient(notebook, timeout=600, resources={"metadata": {"path": elsewhere}}).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert not any(elsewhere.iterdir())  # it wrote nothing into the working directory
