"""The ``transformer_lens`` capture backend: ``capture(..., backend="transformer_lens")``.

Same API and semantics as :func:`safegeom.activations.iter_capture`, which runs the one batch loop (length order, left
padding, positions from the plan, the plan's dtype, a NaN/inf check) for both backends; here
activations are read with transformer-lens' ``TransformerBridge.run_with_cache`` and a names
filter, so results can be checked against TransformerLens' own hook points.

How the bridge is built (transformer-lens 4.x):

- ``build_bridge_from_module`` (``transformer_lens.model_bridge.sources``) wraps a model that is
  already in memory, given its HF config and architecture name; nothing is downloaded or
  reloaded. ``TransformerBridge.boot_transformers(name, hf_model=...)`` would do the same, but
  it also re-instantiates the tokenizer from its ``name_or_path`` (a hub call for hub models,
  a crash for in-memory tokenizers), so it is not used.
- The bridge *modifies the module it wraps in place*: its components replace the HF decoder
  blocks, attention and MLP modules. To leave ``lm.model`` untouched (so ``backend="hooks"``,
  interventions and weight edits keep seeing plain HF modules), the bridge wraps a structural
  clone of the model whose parameters and buffers *are* the original tensors
  (``copy.deepcopy`` with the tensors pre-seeded in the memo): no weight is copied, in-place
  weight edits are seen by both, and the clone costs only Python objects.
- Bridges are cached per model (a :class:`weakref.WeakKeyDictionary` keyed by the HF module)
  with a fingerprint of the parameters' identities and storage; replacing a parameter, moving
  or casting the model rebuilds the bridge on the next capture.

Padding: the bridge's ``forward`` takes ``attention_mask`` and passes extra keyword arguments
(``position_ids``, ``use_cache``) through to the HF forward, so left-padded batches get the same
mask and position ids as the ``hooks`` backend and equal unpadded prompts.

Cost: ``stop_at_layer`` ends the pass after the last requested layer; when the last layer is
the model's last, ``logits_to_keep=1`` keeps the LM head to one position where the HF model
accepts it. ``run_with_cache`` still stores every hooked tensor for the whole sequence before
positions are picked, which is why this backend is slower and hungrier than ``hooks``.

Site names (TransformerLens' aliases, resolved by the bridge per architecture):
``resid_pre`` → ``blocks.{i}.hook_resid_pre``, ``resid_post`` → ``blocks.{i}.hook_resid_post``,
``attn_out`` → ``blocks.{i}.hook_attn_out``, ``mlp_out`` → ``blocks.{i}.hook_mlp_out`` (on
post-norm families such as Gemma 2 the bridge points the latter two after the post-norms, as
safegeom's layouts do).
"""

from __future__ import annotations

import copy
import inspect
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from safegeom.activations.plan import CapturePlan
from safegeom.errors import ConfigError, SafegeomError
from safegeom.models.chat import ChatBatch
from safegeom.models.loading import LoadedModel

__all__ = ["BRIDGE_HOOK_NAMES", "BridgeRecorder", "bridge_hook_name", "transformer_lens_bridge"]

BRIDGE_HOOK_NAMES: dict[str, str] = {
    "resid_pre": "hook_resid_pre",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
}
"""safegeom site → TransformerLens block hook alias."""

_FALLBACK = 'use backend="hooks" (safegeom\'s own hooks) instead'


@dataclass
class _CachedBridge:
    bridge: Any
    fingerprint: tuple[tuple[int, int, torch.device, torch.dtype], ...]


_BRIDGES: weakref.WeakKeyDictionary[nn.Module, _CachedBridge] = weakref.WeakKeyDictionary()


def _fingerprint(model: nn.Module) -> tuple[tuple[int, int, torch.device, torch.dtype], ...]:
    """Identity and storage of every parameter and buffer: changes when one is replaced or the
    model is moved or cast, but not when weights are edited in place (the clone shares them)."""
    tensors = [*model.parameters(), *model.buffers()]
    return tuple((id(t), t.data_ptr(), t.device, t.dtype) for t in tensors)


def _shared_clone(model: nn.Module) -> nn.Module:
    """A copy of the module tree whose parameters and buffers are the original tensors."""
    memo: dict[int, Any] = {id(t): t for t in model.parameters()}
    memo.update({id(t): t for t in model.buffers()})
    return copy.deepcopy(model, memo)


_UNDECLARED_CHECKED = ("num_key_value_heads",)
"""Config attributes transformer-lens reads when present, which some families only carry as
unused extras (a GPT-2 or GPT-NeoX config given ``num_key_value_heads`` still builds a model
without grouped-query attention, but the bridge would reshape keys as if it had)."""


def _bridge_config(config: Any) -> Any:
    """A copy of the HF config without extra attributes its model class ignores."""
    clean = copy.deepcopy(config)
    try:
        default = type(config)()
    except Exception:  # an exotic config class that needs arguments: keep it as it is
        return clean
    for name in _UNDECLARED_CHECKED:
        if name in vars(clean) and not hasattr(default, name):
            delattr(clean, name)
    return clean


def _build_bridge(lm: LoadedModel) -> Any:
    try:
        from transformer_lens.model_bridge.sources import build_bridge_from_module
        from transformer_lens.model_bridge.sources._hf_format import (
            determine_architecture_from_hf_config,
        )
    except ImportError as err:
        raise SafegeomError(
            "backend='transformer_lens' needs transformer-lens >= 3 "
            f"(pip install 'safegeom[lens]'), or {_FALLBACK}: {err}"
        ) from err
    model = lm.base
    config = getattr(model, "config", None)
    if config is None:
        raise SafegeomError(
            f"{lm.name} has no HF config, so TransformerBridge cannot wrap it; {_FALLBACK}"
        )
    try:
        architecture = determine_architecture_from_hf_config(config)
        bridge = build_bridge_from_module(
            _shared_clone(model),
            architecture,
            hf_config=_bridge_config(config),
            dtype=lm.dtype,
            device=lm.device,
            model_name=lm.name,
        )
    except (ValueError, KeyError, NotImplementedError, AttributeError) as err:
        raise SafegeomError(
            f"transformer-lens' TransformerBridge cannot wrap {lm.name} "
            f"({lm.model_type}): {err}; {_FALLBACK}"
        ) from err
    bridge.eval()
    return bridge


def transformer_lens_bridge(lm: LoadedModel) -> Any:
    """The :class:`TransformerBridge` over ``lm``'s weights, built once per model and cached.

    The bridge wraps a weight-sharing clone of ``lm.base``; ``lm.model`` itself is not modified.

    Raises:
        SafegeomError: transformer-lens is missing or has no adapter for the architecture.
    """
    model = lm.base
    cached = _BRIDGES.get(model)
    fingerprint = _fingerprint(model)
    if cached is None or cached.fingerprint != fingerprint:
        cached = _CachedBridge(_build_bridge(lm), fingerprint)
        _BRIDGES[model] = cached
    return cached.bridge


def bridge_hook_name(bridge: Any, site: str, layer: int) -> str:
    """The bridge hook name that exposes ``site`` at ``layer``.

    Raises:
        ConfigError: an unknown site, or a hook the bridge does not have for this architecture.
    """
    if site not in BRIDGE_HOOK_NAMES:
        raise ConfigError(f"unknown site {site!r}: use one of {', '.join(BRIDGE_HOOK_NAMES)}")
    name = f"blocks.{layer}.{BRIDGE_HOOK_NAMES[site]}"
    if name not in bridge.hook_dict:
        arch = getattr(bridge.cfg, "architecture", "this architecture")
        raise ConfigError(f"TransformerBridge has no hook {name!r} for {arch}; {_FALLBACK}")
    return name


def _accepts(module: nn.Module, argument: str) -> bool:
    try:
        return argument in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


class BridgeRecorder:
    """Reads the plan's positions from ``TransformerBridge.run_with_cache`` into device buffers.

    ``buffers[site]`` is ``[batch_size, n_layers, n_positions, d]``; :meth:`record` fills its
    first rows for one batch.

    Raises:
        SafegeomError: a site or architecture the bridge cannot serve, or a model a device map
            spread over devices (the message names ``backend="hooks"``).
    """

    label = "capture (transformer_lens)"
    """Progress-bar label."""

    def __init__(self, lm: LoadedModel, plan: CapturePlan) -> None:
        if lm.split:
            raise SafegeomError(
                f"{lm.name} is spread over devices by a device map, which TransformerBridge "
                f"cannot wrap; {_FALLBACK}"
            )
        self.bridge = transformer_lens_bridge(lm)
        self.names = {
            (site, j): bridge_hook_name(self.bridge, site, layer)
            for site in plan.sites
            for j, layer in enumerate(plan.layers)
        }
        # A callable filter matches only these alias names, so each hook point is hooked once (a
        # list would also match the canonical names and hook every point twice).
        self.wanted = frozenset(self.names.values())
        last = plan.layers[-1]
        self.forward_kwargs: dict[str, Any] = {"use_cache": False}
        self.stop_at_layer = last + 1 if last + 1 < lm.n_layers else None
        if self.stop_at_layer is None and _accepts(lm.base, "logits_to_keep"):
            self.forward_kwargs["logits_to_keep"] = 1  # the pass reaches the LM head: keep 1 token
        shape = (plan.batch_size, len(plan.layers), plan.positions.n_positions, lm.d_model)
        self.buffers = {
            s: torch.empty(shape, dtype=plan.dtype, device=lm.device) for s in plan.sites
        }

    def record(self, batch: ChatBatch, index: Tensor, rows: Tensor) -> None:
        """Run one cached forward pass over ``batch`` (on the model's device), filling the
        buffers at ``index`` (padded positions per row) and ``rows`` (``arange(batch)[:, None]``)."""
        with torch.inference_mode():
            _, cache = self.bridge.run_with_cache(
                batch.input_ids,
                return_cache_object=False,
                names_filter=self.wanted.__contains__,
                stop_at_layer=self.stop_at_layer,
                return_type=None,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                **self.forward_kwargs,
            )
            n = batch.input_ids.shape[0]
            for (site, j), name in self.names.items():
                self.buffers[site][:n, j].copy_(cache[name][rows, index])
        del cache
