"""Where the decoder blocks and residual-stream writers live, per architecture.

A declarative table keyed by ``config.model_type`` (never by a substring of the model's name),
in the spirit of tuned-lens' ``model_surgery`` and steering-vectors' ``layer_matching``. Every
path is a dotted attribute path: ``blocks`` from the root of the ``*ForCausalLM`` module, the
others relative to one decoder block (``attn``, ``mlp``, ``o_proj``, ``down_proj``) or to the root
(``embed``, ``extra_embeds``, ``final_norm``).

``attn`` and ``mlp`` name the modules whose *outputs are added to the residual stream*. For most
families that is the attention and MLP module itself; for Gemma 2/3 it is the post-attention and
post-feed-forward norm, because those models normalise a sub-layer's output before adding it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from torch import nn

__all__ = ["LAYOUTS", "ArchLayout", "UnknownArchitectureError", "layout_for", "resolve"]


@dataclass(frozen=True)
class ArchLayout:
    """Module paths of one architecture family."""

    blocks: str
    """Path from the root module to the ``nn.ModuleList`` of decoder blocks."""
    attn: str
    """Path inside a block to the module whose output is the attention write to the residual."""
    mlp: str
    """Path inside a block to the module whose output is the MLP write to the residual."""
    o_proj: str
    """Path inside a block to the linear map that writes attention into the residual."""
    down_proj: str
    """Path inside a block to the linear map that writes the MLP into the residual."""
    embed: str
    """Path from the root to the token embedding."""
    final_norm: str
    """Path from the root to the norm applied before the LM head."""
    extra_embeds: tuple[str, ...] = ()
    """Other embeddings added into the residual stream (GPT-2's learned positions)."""
    conv1d: bool = False
    """True where the writers are GPT-2 ``Conv1D`` layers, whose weight is stored (in, out)."""
    post_norm: bool = False
    """True where sub-layer outputs pass a norm before the residual add (Gemma 2/3). Weight
    orthogonalisation of ``o_proj``/``down_proj`` is then not exactly equal to hook ablation."""

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ArchLayout:
        """Build a layout from a mapping, with a clear error for unknown or missing keys."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown layout keys {unknown}; known keys: {sorted(names)}")
        if "extra_embeds" in values:
            values = {**values, "extra_embeds": tuple(values["extra_embeds"])}
        try:
            return cls(**values)
        except TypeError as err:
            raise ValueError(f"incomplete layout {values}: {err}") from None


_LLAMA = ArchLayout(
    blocks="model.layers",
    attn="self_attn",
    mlp="mlp",
    o_proj="self_attn.o_proj",
    down_proj="mlp.down_proj",
    embed="model.embed_tokens",
    final_norm="model.norm",
)
_GEMMA2 = replace(
    _LLAMA, attn="post_attention_layernorm", mlp="post_feedforward_layernorm", post_norm=True
)

LAYOUTS: dict[str, ArchLayout] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "phi3": _LLAMA,
    "olmo": _LLAMA,
    "gemma2": _GEMMA2,
    "gemma3_text": _GEMMA2,
    "gpt2": ArchLayout(
        blocks="transformer.h",
        attn="attn",
        mlp="mlp",
        o_proj="attn.c_proj",
        down_proj="mlp.c_proj",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        extra_embeds=("transformer.wpe",),
        conv1d=True,
    ),
    "gpt_neox": ArchLayout(
        blocks="gpt_neox.layers",
        attn="attention",
        mlp="mlp",
        o_proj="attention.dense",
        down_proj="mlp.dense_4h_to_h",
        embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
    ),
}
"""The built-in table: ``config.model_type`` → layout."""


class UnknownArchitectureError(ValueError):
    """Raised when a model's architecture is not in :data:`LAYOUTS` and no override was given."""


def layout_for(model_type: str, override: ArchLayout | dict[str, Any] | None = None) -> ArchLayout:
    """Return the layout for ``model_type``, or the caller's ``override`` when given.

    Raises:
        UnknownArchitectureError: the type is not in the table and there is no override. The
            message names the ``layout=`` argument (``--layout`` on the command line).
    """
    if override is not None:
        return override if isinstance(override, ArchLayout) else ArchLayout.from_dict(override)
    try:
        return LAYOUTS[model_type]
    except KeyError:
        raise UnknownArchitectureError(
            f"unknown architecture {model_type!r}: pass "
            "LoadConfig(layout=ArchLayout(...)) to load_model (or --layout JSON on the command "
            f"line) naming its blocks, attn, mlp, o_proj, "
            f"down_proj, embed and final_norm modules; known: {', '.join(sorted(LAYOUTS))}"
        ) from None


def resolve(root: nn.Module, path: str) -> nn.Module:
    """Follow a dotted attribute path from ``root``; raise a clear error when a step is missing."""
    module: Any = root
    for part in path.split("."):
        if not hasattr(module, part):
            raise ValueError(
                f"module path {path!r} does not exist in {type(root).__name__} (stopped at "
                f"{part!r}); fix the layout override"
            )
        module = getattr(module, part)
    return module
