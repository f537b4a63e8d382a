"""Activation capture at (site, layer, position), at close to the cost of a plain forward pass.

Design (see DESIGN.md, "Performance design"):

- Hooks copy *only the requested positions* of each hooked hidden state, inside the hook, into a
  preallocated device buffer ``[batch, n_layers, n_positions, d]``; no hook keeps a reference to a
  full-sequence tensor.
- On CUDA the buffer is copied into pinned CPU memory with an asynchronous copy; the copy is
  ordered on the compute stream, so the buffer can be reused by the next batch at once.
- The forward pass stops (by an exception caught here) right after the last requested layer, so
  later blocks, the final norm and the LM head are never computed.
- Storage is in the model's dtype unless ``dtype`` says otherwise.
- Prompts are sorted by length (stable) to cut padding, and put back in input order at the end.

Three consumers share one engine: :func:`capture` (tensors in memory), :func:`capture_stats`
(float64 running means/covariances, never holding all activations) and :func:`capture_to_disk`
(sharded safetensors). ``backend="lens"`` runs the same API through transformer-lens'
``TransformerBridge`` (see :mod:`safegeom.capture_lens`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from safegeom.activations import FORMAT, SHARD_INDEX, Activations, atomic_save_safetensors
from safegeom.hooks import SITES, Hook, attach, site_hook_point
from safegeom.models.chat import EncodedPrompt, collate_left, encode_prompts
from safegeom.models.loading import LoadedModel
from safegeom.models.positions import PositionPlan, parse_layers, plan_positions
from safegeom.prompts import PromptSet, load_prompts
from safegeom.provenance import Provenance, text_hash
from safegeom.stats import Moments, RunningStats

__all__ = [
    "ActivationStats",
    "CapturePlan",
    "capture",
    "capture_stats",
    "capture_to_disk",
    "iter_capture",
    "plan_capture",
]

_CPU_TOKENS_PER_BATCH = 4096


class _StopForward(Exception):
    """Raised by the last hook to end the forward pass early."""


@dataclass(frozen=True)
class CapturePlan:
    """A resolved capture request for one model and prompt set."""

    prompts: PromptSet
    encoded: tuple[EncodedPrompt, ...]
    sites: tuple[str, ...]
    layers: tuple[int, ...]
    positions: PositionPlan
    dtype: torch.dtype
    batch_size: int
    system: str | None

    def provenance(self, lm: LoadedModel, backend: str) -> Provenance:
        """Provenance of activations captured with this plan."""
        template = lm.chat_template or getattr(lm.tokenizer, "chat_template", None)
        return Provenance(
            model=lm.name,
            weight_hash=lm.weight_hash,
            prompt_set=self.prompts.name,
            prompt_hash=self.prompts.content_hash,
            n_prompts=len(self.prompts),
            sites=self.sites,
            layers=self.layers,
            positions=self.positions.labels,
            dtype=str(self.dtype).removeprefix("torch."),
            template_hash=text_hash(template),
            system=self.system,
            backend=backend,
        )


def _parse_sites(sites: str | Sequence[str]) -> tuple[str, ...]:
    items = [s.strip() for s in sites.split(",")] if isinstance(sites, str) else list(sites)
    bad = [s for s in items if s not in SITES]
    if bad or not items:
        raise ValueError(f"unknown site(s) {bad or items}: use {', '.join(SITES)}")
    return tuple(dict.fromkeys(items))


def _auto_batch_size(lm: LoadedModel, max_len: int, n_pos: int, n_layers: int) -> int:
    if lm.device.type != "cuda":
        return max(1, min(64, _CPU_TOKENS_PER_BATCH // max(max_len, 1)))
    free, _ = torch.cuda.mem_get_info(lm.device)
    config = lm.base.config
    width = getattr(config, "intermediate_size", 4 * lm.d_model) * 3 + lm.d_model * 6
    per_token = width * torch.finfo(lm.dtype).bits // 8
    per_prompt = per_token * max_len + n_layers * n_pos * lm.d_model * 4
    return max(1, min(512, int(free * 0.4) // max(per_prompt, 1)))


def plan_capture(
    lm: LoadedModel,
    prompts: PromptSet | str | Sequence[str],
    *,
    sites: str | Sequence[str] = "resid_pre",
    layers: str | int | Sequence[int] | None = "all",
    positions: str | int | Sequence[str | int] = "t_post",
    dtype: torch.dtype | None = None,
    batch_size: int | None = None,
    system: str | None = None,
) -> CapturePlan:
    """Resolve sites, layers, positions and batch size, and tokenize the prompts.

    Raises:
        ValueError: an empty prompt set, an unknown site or position, a layer out of range.
    """
    prompt_set = load_prompts(prompts)
    if len(prompt_set) == 0:
        raise ValueError("empty prompt set: pass at least one prompt")
    encoded = encode_prompts(
        lm.tokenizer, prompt_set.prompts, system=system, chat_template=lm.chat_template
    )
    plan = plan_positions(positions, encoded)
    layer_ids = parse_layers(layers, lm.n_layers)
    max_len = max(len(e) for e in encoded)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    size = batch_size or _auto_batch_size(lm, max_len, plan.n_positions, len(layer_ids))
    return CapturePlan(
        prompts=prompt_set,
        encoded=tuple(encoded),
        sites=_parse_sites(sites),
        layers=layer_ids,
        positions=plan,
        dtype=dtype or lm.dtype,
        batch_size=size,
        system=system,
    )


class _Recorder:
    """Copies requested positions into a device buffer from inside the hooks."""

    def __init__(self, lm: LoadedModel, plan: CapturePlan) -> None:
        self.lm, self.plan = lm, plan
        shape = (plan.batch_size, len(plan.layers), plan.positions.n_positions, lm.d_model)
        device = lm.device
        self.buffers = {s: torch.empty(shape, dtype=plan.dtype, device=device) for s in plan.sites}
        self.finite = torch.ones((), dtype=torch.bool, device=device)
        self.rows: Tensor | None = None
        self.index: Tensor | None = None

    def hooks(self) -> list[Hook]:
        hooks = []
        for site in self.plan.sites:
            for j, layer in enumerate(self.plan.layers):
                module, when = site_hook_point(self.lm, site, layer)
                hooks.append(Hook(module, when, partial(self._record, site, j)))
        last = self.plan.layers[-1]
        only_pre = all(s == "resid_pre" for s in self.plan.sites)
        hooks.append(Hook(self.lm.blocks[last], "pre" if only_pre else "post", self._stop))
        return hooks

    def _record(self, site: str, j: int, hidden: Tensor) -> None:
        assert self.rows is not None and self.index is not None
        picked = hidden[self.rows, self.index]  # [B, P, d]: only the requested positions
        self.buffers[site][: picked.shape[0], j].copy_(picked)

    @staticmethod
    def _stop(hidden: Tensor) -> None:
        raise _StopForward


def iter_capture(
    lm: LoadedModel, plan: CapturePlan, *, progress: bool = True
) -> Iterator[tuple[Tensor, dict[str, Float[Tensor, "batch layer pos d"]]]]:
    """Run the forward passes and yield ``(prompt_indices, {site: activations})`` per batch.

    The yielded tensors are *views of reused device buffers*: copy what you keep before asking
    for the next batch. Batches come in length order, not input order; ``prompt_indices`` says
    which prompts each row holds.

    Raises:
        ValueError: NaN or inf in the captured activations (checked once, at the end).
    """
    order = sorted(range(len(plan.encoded)), key=lambda i: -len(plan.encoded[i]))
    recorder = _Recorder(lm, plan)
    pad = lm.tokenizer.pad_token_id
    device = lm.device
    bar = tqdm(total=len(order), desc="capture", unit="prompt", disable=not progress)
    hooks = recorder.hooks()
    for start in range(0, len(order), plan.batch_size):
        ids = order[start : start + plan.batch_size]
        batch = collate_left([plan.encoded[i] for i in ids], pad)
        recorder.index = plan.positions.index(batch).to(device, non_blocking=True)
        recorder.rows = torch.arange(len(ids), device=device)[:, None]
        batch = batch.to(device)
        # Hooks live only for this forward pass, so nothing is attached while the caller runs.
        with torch.inference_mode(), attach(hooks), contextlib.suppress(_StopForward):
            lm.model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
            )
        out = {s: buf[: len(ids)] for s, buf in recorder.buffers.items()}
        for tensor in out.values():
            recorder.finite &= torch.isfinite(tensor).all()
        yield torch.tensor(ids), out
        bar.update(len(ids))
    bar.close()
    if not bool(recorder.finite):
        raise ValueError(
            f"NaN or inf in captured activations of {lm.name}; try dtype=float32 or check the weights"
        )


def capture(
    lm: LoadedModel,
    prompts: PromptSet | str | Sequence[str],
    *,
    sites: str | Sequence[str] = "resid_pre",
    layers: str | int | Sequence[int] | None = "all",
    positions: str | int | Sequence[str | int] = "t_post",
    dtype: torch.dtype | None = None,
    batch_size: int | None = None,
    system: str | None = None,
    progress: bool = True,
    backend: str = "hooks",
) -> Activations:
    """Capture activations of ``prompts`` into CPU tensors.

    Args:
        lm: a loaded model (:func:`safegeom.models.load_model`).
        prompts: a :class:`PromptSet`, a prompt spec (``advbench:train``, a file) or strings.
        sites: ``resid_pre``, ``resid_post``, ``attn_out``, ``mlp_out`` (comma list or sequence).
        layers: ``all``, indices, ranges, negative indices (see :func:`parse_layers`).
        positions: ``t_inst``, ``t_post``, ``last``, integer offsets (see :mod:`positions`).
        dtype: storage dtype (default: the model's).
        batch_size: prompts per forward pass (default: chosen from the memory available).
        system: optional system prompt.
        progress: show a progress bar.
        backend: ``hooks`` (default) or ``lens`` (transformer-lens TransformerBridge).

    Returns:
        :class:`Activations` with ``data[site]`` shaped ``[n_prompts, n_layers, n_positions, d]``
        in input order, in pinned CPU memory when the model is on CUDA.
    """
    plan = plan_capture(
        lm, prompts, sites=sites, layers=layers, positions=positions, dtype=dtype,
        batch_size=batch_size, system=system,
    )  # fmt: skip
    batches = _backend_batches(lm, plan, backend, progress)
    n = len(plan.encoded)
    shape = (n, len(plan.layers), plan.positions.n_positions, lm.d_model)
    pinned = lm.device.type == "cuda"
    out = {s: torch.empty(shape, dtype=plan.dtype, pin_memory=pinned) for s in plan.sites}
    for ids, acts in batches:
        # Write each batch straight to its input positions: runs of consecutive prompts are one
        # (asynchronous, on CUDA) slice copy, so the output stays pinned and is never re-copied.
        for row, start, length in _runs(ids.tolist()):
            for site, tensor in acts.items():
                out[site][start : start + length].copy_(
                    tensor[row : row + length], non_blocking=pinned
                )
    if pinned:
        torch.cuda.synchronize(lm.device)
    return Activations(out, plan.layers, plan.positions.labels, plan.provenance(lm, backend))


def _runs(ids: Sequence[int]) -> Iterator[tuple[int, int, int]]:
    """Split batch rows into runs of consecutive prompt indices: (first row, first index, length)."""
    row = 0
    while row < len(ids):
        length = 1
        while row + length < len(ids) and ids[row + length] == ids[row] + length:
            length += 1
        yield row, ids[row], length
        row += length


def _backend_batches(lm: LoadedModel, plan: CapturePlan, backend: str, progress: bool):
    if backend == "hooks":
        return iter_capture(lm, plan, progress=progress)
    if backend == "lens":
        from safegeom.capture_lens import iter_capture_lens

        return iter_capture_lens(lm, plan, progress=progress)
    raise ValueError(f"unknown capture backend {backend!r}: use hooks or lens")


@dataclass(frozen=True)
class ActivationStats:
    """Streaming statistics of a capture: float64 moments per site, shaped ``[layer, pos, d]``."""

    moments: dict[str, Moments]
    layers: tuple[int, ...]
    positions: tuple[str, ...]
    provenance: Provenance
    n_forward: int = 0
    """Forward passes (batches) the capture ran."""

    def mean(self, site: str) -> Float[Tensor, "layer pos d"]:
        """Float64 mean activations at ``site``."""
        return self.moments[site].mean


def capture_stats(
    lm: LoadedModel,
    prompts: PromptSet | str | Sequence[str],
    *,
    sites: str | Sequence[str] = "resid_pre",
    layers: str | int | Sequence[int] | None = "all",
    positions: str | int | Sequence[str | int] = "t_post",
    covariance: bool = False,
    batch_size: int | None = None,
    system: str | None = None,
    progress: bool = True,
    backend: str = "hooks",
) -> ActivationStats:
    """Float64 running means (and covariances over ``d``) of activations, never holding them all.

    Returns:
        :class:`ActivationStats`; means are ``[n_layers, n_positions, d]`` per site, covariances
        ``[n_layers, n_positions, d, d]`` when ``covariance=True``.
    """
    plan = plan_capture(
        lm, prompts, sites=sites, layers=layers, positions=positions, batch_size=batch_size,
        system=system,
    )  # fmt: skip
    shape = (len(plan.layers), plan.positions.n_positions, lm.d_model)
    running = {s: RunningStats(shape, covariance=covariance, device=lm.device) for s in plan.sites}
    n_forward = 0
    for _, acts in _backend_batches(lm, plan, backend, progress):
        n_forward += 1
        for site, tensor in acts.items():
            running[site].update(tensor)
    moments = {site: stats.finalize() for site, stats in running.items()}
    prov = plan.provenance(lm, backend)
    return ActivationStats(moments, plan.layers, plan.positions.labels, prov, n_forward)


def capture_to_disk(
    lm: LoadedModel,
    prompts: PromptSet | str | Sequence[str],
    out_dir: str | Path,
    *,
    sites: str | Sequence[str] = "resid_pre",
    layers: str | int | Sequence[int] | None = "all",
    positions: str | int | Sequence[str | int] = "t_post",
    dtype: torch.dtype | None = None,
    shard_size: int = 4096,
    batch_size: int | None = None,
    system: str | None = None,
    progress: bool = True,
) -> Path:
    """Stream activations into sharded safetensors under ``out_dir`` (read back with
    :func:`safegeom.activations.load_activations`).

    Each shard holds about ``shard_size`` prompts (whole batches) and their input indices; the
    index file ``activations.json`` is written last, so a folder without it is incomplete.

    Returns:
        ``out_dir``.
    """
    plan = plan_capture(
        lm, prompts, sites=sites, layers=layers, positions=positions, dtype=dtype,
        batch_size=batch_size, system=system,
    )  # fmt: skip
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[str] = []
    pending: list[tuple[Tensor, dict[str, Tensor]]] = []

    def flush() -> None:
        name = f"shard-{len(shards):05d}.safetensors"
        tensors = {s: torch.cat([acts[s] for _, acts in pending]) for s in plan.sites}
        tensors["prompt_index"] = torch.cat([ids for ids, _ in pending])
        atomic_save_safetensors(tensors, folder / name, {"format": FORMAT})
        shards.append(name)
        pending.clear()

    for ids, acts in iter_capture(lm, plan, progress=progress):
        pending.append((ids, {s: t.to("cpu", copy=True) for s, t in acts.items()}))
        if sum(len(i) for i, _ in pending) >= shard_size:
            flush()
    if pending:
        flush()
    index = {
        "format": FORMAT,
        "layers": list(plan.layers),
        "positions": list(plan.positions.labels),
        "provenance": plan.provenance(lm, "hooks").to_dict(),
        "sites": list(plan.sites),
        "shards": shards,
    }
    (folder / SHARD_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
    return folder
