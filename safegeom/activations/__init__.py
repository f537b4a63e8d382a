"""Activation capture at (site, layer, position), at close to the cost of a plain forward pass.

The package is a plan, one batch loop and two backends:

- :mod:`~safegeom.activations.config`: :class:`CaptureConfig`, what to capture and how;
- :mod:`~safegeom.activations.plan`: :func:`plan_capture` resolves a config against a model and
  tokenizes the prompts once (:class:`CapturePlan`);
- :mod:`~safegeom.activations.engine`: the batch loop (:func:`iter_capture`) and the shard writer;
- :mod:`~safegeom.activations.loop`: its consumers :func:`capture` (tensors), :func:`capture_stats`
  (float64 moments) and :func:`capture_to_disk` (shards);
- :mod:`~safegeom.parallel.capture`: the same three over several processes, which they hand over
  to by themselves under a launcher (each rank runs its share of the batches; rank 0 writes);
- :mod:`~safegeom.activations.hooks_backend` (``backend="hooks"``, the default) and
  :mod:`~safegeom.activations.transformer_lens` (``backend="transformer_lens"``), which depend on the
  plan only; the loop picks one from :data:`~safegeom.activations.engine.RECORDERS`.

Several processes (one per GPU; on a machine without GPUs add ``--multi_gpu`` and set
``OMP_NUM_THREADS``)::

    accelerate launch --num_processes 2 -m safegeom.cli capture MODEL --prompts SPEC --out FILE

Example:
    >>> from safegeom.activations import CaptureConfig, capture
    >>> from safegeom.models import load_model
    >>> from safegeom.prompts import load_prompts
    >>> lm = load_model("tiny-chat")
    >>> prompts = load_prompts("advbench:val", n=4)
    >>> config = CaptureConfig(layers="2-3", positions="t_inst,-1")
    >>> acts = capture(lm, prompts, config, progress=False)
    >>> tuple(acts["resid_pre"].shape)  # prompts × layers × positions × hidden size
    (4, 2, 2, 256)
"""

from safegeom.activations.config import BACKENDS, CaptureConfig, parse_sites
from safegeom.activations.loop import (
    RECORDERS,
    capture,
    capture_stats,
    capture_to_disk,
    iter_capture,
)
from safegeom.activations.plan import (
    CapturePlan,
    capture_batch_size,
    encode_for,
    plan_capture,
)
from safegeom.activations.values import Activations, ActivationStats, load_activations

__all__ = [
    "BACKENDS",
    "RECORDERS",
    "ActivationStats",
    "Activations",
    "CaptureConfig",
    "CapturePlan",
    "capture",
    "capture_batch_size",
    "capture_stats",
    "capture_to_disk",
    "encode_for",
    "iter_capture",
    "load_activations",
    "parse_sites",
    "plan_capture",
]
