"""The model every study run trains from (:mod:`analyses.defences`, :mod:`analyses.adversarial`).

``safegeom train`` refuses a LoRA adapter folder as MODEL (it would train an adapter on an
adapter). A model shipped as an adapter (``smol-chat``) is therefore merged into its base once per
study folder; ``tiny-chat`` is used as it is.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["base_model"]


def base_model(model: str, work: Path) -> str:
    """The model spec every run trains from: ``tiny-chat`` itself; for any other model (one
    shipped as a LoRA adapter, like ``smol-chat``) its weights merged and saved once as
    ``work/base`` (:func:`safegeom.models.merged.save_merged`: written beside, then renamed, so a
    folder there is complete).

    Returns:
        ``model`` or the merged folder's path.
    """
    from safegeom.models.merged import save_merged

    if model == "tiny-chat":
        return model
    folder = work / "base"
    if not folder.is_dir():
        save_merged(model, folder)
    return str(folder)
