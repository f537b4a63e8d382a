"""The harmfulness carrier (Zhao et al. 2025, "LLMs Encode Harmfulness and Refusal Separately").

Harmfulness is read at **t_inst**, the last token of the user's instruction, before the chat
template's post-instruction tokens, where the refusal carrier lives (``t_post[-1]``). The carrier is
the float64 diff-in-means ``mean_harmful − mean_harmless`` of ``resid_pre`` at one layer; in
aligned models it is nearly orthogonal to the refusal direction (docs/methods.md §2). The maths is
:func:`~safegeom.carriers.fit.fit_dim`; :func:`harmfulness_direction` captures the two class means
(streamed in float64) and fits.
"""

from __future__ import annotations

from safegeom.activations import CaptureConfig, capture_stats
from safegeom.carriers.carrier import Carrier
from safegeom.carriers.fit import diff_in_means
from safegeom.carriers.inputs import Prompts, as_prompts, default_layer, prompt_provenance
from safegeom.models.chat import EncodedSet
from safegeom.models.loading import LoadedModel

__all__ = ["harmfulness_direction"]


def harmfulness_direction(
    lm: LoadedModel,
    harmful: Prompts | EncodedSet,
    harmless: Prompts | EncodedSet,
    *,
    layer: int | None = None,
    refusal: Carrier | None = None,
    site: str = "resid_pre",
    system: str | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> Carrier:
    """Diff-in-means harmfulness direction at ``t_inst`` (docs/methods.md §2).

    Args:
        lm: the model.
        harmful, harmless: prompt sets (a :class:`PromptSet`, a spec such as ``advbench:train``,
            or strings).
        layer: the layer to read; default the layer of ``refusal`` when given, else the middle.
        refusal: an optional refusal carrier whose layer is reused (so the two are comparable).
        site: the hook site (default ``resid_pre``, the block input).
        system: optional system prompt.
        batch_size: prompts per capture pass (default: automatic).
        progress: show a progress bar.

    Returns:
        A :class:`Carrier` (``kind="harmfulness"``, ``method="dim"``, ``position="t_inst"``) whose
        single vector is the raw float64-accumulated difference of means, in activation units
        (its norm is meaningful for activation addition). ``scores`` holds ``norm``.

    Raises:
        SafegeomError: an empty prompt set, a layer out of range, a hidden-size mismatch with
            ``refusal``.
    """
    h_set, s_set = as_prompts(harmful), as_prompts(harmless)
    at = default_layer(lm, layer, refusal)
    means = [
        capture_stats(
            lm,
            p,
            CaptureConfig(
                sites=site, layers=[at], positions="t_inst", system=system, batch_size=batch_size
            ),
            progress=progress,
        ).mean(site)[0, 0]
        for p in (h_set, s_set)
    ]
    fitted = diff_in_means(means[0][None], means[1][None])  # each class mean as one row
    return fitted.carrier(
        kind="harmfulness",
        method="dim",
        layer=at,
        position="t_inst",
        site=site,
        provenance=prompt_provenance(lm, h_set, s_set, system=system),
    )
