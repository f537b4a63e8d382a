"""Where a command may write: outputs that never destroy what safegeom did not write.

Every command checks its ``--out`` here before any work, with the same rules:

- **Never an input.** An ``--out`` (or a sidecar written beside it) that is the same file or
  folder as any input (a prompt file, a model folder, a carrier file ...) is refused.
- **File outputs** (``capture --out``, ``capture --stats``, ``evaluate --out``, ``sweep --out
  FILE``): never a device node, a FIFO or a socket (:mod:`safegeom.file_modes`; the atomic
  writer checks again before its rename), and an existing file is replaced only when safegeom
  wrote it, or with ``--overwrite``. A file is safegeom's when it carries safegeom's marker
  (:func:`is_safegeom_file`): a JSON object whose ``format`` starts with ``safegeom.``, a
  safetensors header with ``safegeom`` metadata, a Parquet schema with the ``safegeom`` key.
- **Folder outputs** (``train``, ``audit``, ``carriers``, ``capture --shard-size``, ``sweep``,
  ``figures``, ``demo``): the run claims the folder (:func:`claim_folder`). It takes an advisory
  lock (``fcntl.flock`` on :data:`LOCK`, which records the pid, the command and the start time),
  held for the run and released on any exit, so a second writer fails at once naming the first.
  The folder must be empty or hold only files safegeom wrote (else ``--overwrite``, which lets
  the run write beside the user's files and never deletes them). What each run wrote is kept in
  the folder's record, :data:`RECORD`: at the end of a run every file not there before it began
  is added; a run killed before its end is accounted for by the next claim. ``--overwrite`` of
  ``train`` and ``audit`` deletes only recorded files (:func:`remove_written`). A sub-folder
  holding its own record is another claimed folder (an audit inside a run folder): it is left
  to its own runs.

The pieces: :mod:`~safegeom.outputs.inputs` (an output that is an input),
:mod:`~safegeom.outputs.files` (file outputs and safegeom's marker),
:mod:`~safegeom.outputs.record` (what a run wrote in a folder), :mod:`~safegeom.outputs.claim`
(the lock and the claim).

Example:
    >>> import tempfile, pathlib
    >>> from safegeom.outputs import claim_folder, written_files
    >>> folder = pathlib.Path(tempfile.mkdtemp()) / "run"
    >>> with claim_folder(folder, command="demo"):
    ...     _ = (folder / "table.csv").write_text("a,b\\n")
    >>> written_files(folder)
    ['table.csv']
"""

from safegeom.outputs.claim import LOCK, claim_folder, claims_folder
from safegeom.outputs.files import check_file_output, is_safegeom_file
from safegeom.outputs.inputs import inputs_of
from safegeom.outputs.record import RECORD, remove_written, written_files

__all__ = [
    "LOCK",
    "RECORD",
    "check_file_output",
    "claim_folder",
    "claims_folder",
    "inputs_of",
    "is_safegeom_file",
    "remove_written",
    "written_files",
]
