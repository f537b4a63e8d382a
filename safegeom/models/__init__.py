"""Models: loading, the per-architecture block table, chat formatting and token positions."""

from safegeom.models.chat import (
    ChatBatch,
    EncodedPrompt,
    collate_left,
    encode_prompts,
    render_prompts,
)
from safegeom.models.layout import LAYOUTS, ArchLayout, UnknownArchitectureError, layout_for
from safegeom.models.loading import (
    TINY_CHAT,
    LoadConfig,
    LoadedModel,
    load_model,
    tiny_chat_path,
    weight_hash,
)
from safegeom.models.positions import (
    LayerSpec,
    PositionPlan,
    PositionSpec,
    parse_layers,
    parse_positions,
    plan_positions,
)

__all__ = [
    "LAYOUTS",
    "TINY_CHAT",
    "ArchLayout",
    "ChatBatch",
    "EncodedPrompt",
    "LayerSpec",
    "LoadConfig",
    "LoadedModel",
    "PositionPlan",
    "PositionSpec",
    "UnknownArchitectureError",
    "collate_left",
    "encode_prompts",
    "layout_for",
    "load_model",
    "parse_layers",
    "parse_positions",
    "plan_positions",
    "render_prompts",
    "tiny_chat_path",
    "weight_hash",
]
