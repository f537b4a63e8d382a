"""Activation capture at (site, layer, position), at close to the cost of a plain forward pass.

The package is a plan, one batch loop and two backends:

- :mod:`~safegeom.capture.config`: :class:`CaptureConfig`, what to capture and how;
- :mod:`~safegeom.capture.plan`: :func:`plan_capture` resolves a config against a model and
  tokenizes the prompts once (:class:`CapturePlan`);
- :mod:`~safegeom.capture.engine`: the batch loop (:func:`iter_capture`) and the shard writer;
- :mod:`~safegeom.capture.loop`: its consumers :func:`capture` (tensors), :func:`capture_stats`
  (float64 moments) and :func:`capture_to_disk` (shards);
- :mod:`~safegeom.capture.sharded`: the same three over several processes, which they hand over
  to by themselves under a launcher (each rank runs its share of the batches; rank 0 writes);
- :mod:`~safegeom.capture.hooks_backend` (``backend="hooks"``, the default) and
  :mod:`~safegeom.capture.transformer_lens` (``backend="transformer_lens"``), which depend on the
  plan only; the loop picks one from :data:`~safegeom.capture.engine.RECORDERS`.

Several processes (one per GPU; on a machine without GPUs add ``--multi_gpu`` and set
``OMP_NUM_THREADS``)::

    accelerate launch --num_processes 2 -m safegeom.cli capture MODEL --prompts SPEC --out FILE

Example:
    >>> from safegeom.capture import capture
    >>> from safegeom.models import load_model
    >>> from safegeom.prompts import load_prompts
    >>> lm = load_model("tiny-chat")
    >>> prompts = load_prompts("advbench:val", n=4)
    >>> acts = capture(lm, prompts, layers="2-3", positions="t_inst,-1", progress=False)
    >>> tuple(acts["resid_pre"].shape)  # prompts × layers × positions × hidden size
    (4, 2, 2, 256)
"""

from safegeom.activations import Activations, ActivationStats, load_activations
from safegeom.callable_module import make_callable
from safegeom.capture.config import BACKENDS, CaptureConfig, parse_sites
from safegeom.capture.loop import (
    RECORDERS,
    capture,
    capture_stats,
    capture_to_disk,
    iter_capture,
)
from safegeom.capture.loop import _runs as _runs  # re-exported for the run-splitting test
from safegeom.capture.plan import (
    CapturePlan,
    auto_batch_size,
    encode_for,
    plan_capture,
)

__all__ = [
    "BACKENDS",
    "RECORDERS",
    "ActivationStats",
    "Activations",
    "CaptureConfig",
    "CapturePlan",
    "auto_batch_size",
    "capture",
    "capture_stats",
    "capture_to_disk",
    "encode_for",
    "iter_capture",
    "load_activations",
    "parse_sites",
    "plan_capture",
]

make_callable(__name__, capture)  # sg.capture(lm, prompts) runs capture (see callable_module)
