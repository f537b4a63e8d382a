"""The two GCG implementations that ``bench_attacks.py`` runs side by side, and what it measures.

- :func:`run_safegeom`: ``safegeom.attacks.gcg.attack_one`` (the library's GCG, unjudged).
- :func:`run_nanogcg`: nanoGCG 0.3's ``GCG`` class (PyPI ``nanogcg``, benchmark only). nanoGCG
  0.3 pins transformers ≤ 4.47.1 and indexes the KV cache as the legacy tuple of ``(keys,
  values)`` per layer; on transformers 5 it runs through :class:`LegacyCacheModel`, which turns a
  legacy cache into a fresh ``DynamicCache`` for each forward and the returned cache back into the
  legacy tuple (what transformers 4.47 did inside the model).
- :class:`StepMeter`: forward hooks on the model that time each GCG step (from one gradient
  forward to the next: both implementations run exactly one per step) and count the token
  positions fed to the model and the positions whose logits the LM head computes.

Both sides get the same prompt ids (checked: :func:`nanogcg_ids`), the same allowed tokens
(safegeom's :func:`~safegeom.attacks.slots.allowed_tokens`, given to nanoGCG as its
``not_allowed_ids``), search width, top-k, suffix length, ``n_replace=1``, buffer 0 (the best
candidate of each step becomes the current string), prefix cache on, early stop off. What stays
different is listed in ``bench_attacks.py``'s docstring.

Example (not a doctest: it needs nanoGCG and a loaded model ``lm``)::

    with StepMeter(lm.model) as meter:
        run = run_safegeom(lm, "Explain how locks work", "Sure, here is", SETTINGS, seed=0)
    meter.steps()[0].seconds
"""

from __future__ import annotations

import copy
import inspect
import itertools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from jaxtyping import Bool
from torch import Tensor, nn
from transformers import DynamicCache

from safegeom.attacks import gcg
from safegeom.attacks.loss import sequence_losses
from safegeom.attacks.slots import AttackSlot, allowed_tokens, build_slot
from safegeom.models.chat import encode_prompts
from safegeom.models.loading import LoadedModel
from safegeom.models.plain_text import encode_plain

__all__ = [
    "GCGSettings",
    "LegacyCacheModel",
    "SideRun",
    "Step",
    "StepMeter",
    "nanogcg_ids",
    "nanogcg_missing",
    "retokenized_loss",
    "run_nanogcg",
    "run_safegeom",
]


@dataclass(frozen=True)
class GCGSettings:
    """The search both implementations run."""

    search_width: int
    """Candidates sampled per step."""
    top_k: int
    """Tokens kept per position from the gradient."""
    n_tokens: int
    """Adversarial suffix length in tokens (initial string ``" x x ... x"``)."""
    steps: int
    """Optimisation steps per behaviour."""

    @property
    def init(self) -> str:
        """The initial suffix text (without the joining space)."""
        return " ".join(["x"] * self.n_tokens)


@dataclass(frozen=True)
class Step:
    """One GCG step as the hooks saw it."""

    seconds: float
    """Wall time from this step's gradient forward to the next one's (``time.perf_counter``)."""
    tokens: int
    """Token positions fed to the model (gradient forward and every candidate forward)."""
    head_positions: int
    """Positions whose logits the LM head computed."""


@dataclass
class StepMeter:
    """Hooks on ``model`` (a causal LM) that split its forwards into GCG steps."""

    model: nn.Module
    """The model both implementations call."""
    events: list[tuple[float, bool, int]] = field(default_factory=list)
    """Per forward: (start time, is a gradient forward, token positions)."""
    head: list[int] = field(default_factory=list)
    """Per LM-head call: positions computed."""

    def __enter__(self) -> StepMeter:
        """Install the hooks; returns the meter."""

        def on_forward(_: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            x = kwargs.get("input_ids")
            x = kwargs.get("inputs_embeds") if x is None else x
            x = args[0] if x is None else x
            grad = bool(getattr(x, "requires_grad", False)) and torch.is_grad_enabled()
            self.events.append((time.perf_counter(), grad, int(x.shape[0] * x.shape[1])))

        def on_head(_: nn.Module, args: tuple) -> None:
            self.head.append(len(self.events) - 1)
            self.head.append(int(args[0].shape[0] * args[0].shape[1]))

        self._handles = [
            self.model.register_forward_pre_hook(on_forward, with_kwargs=True),
            self.model.get_output_embeddings().register_forward_pre_hook(on_head),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        """Remove the hooks (also when the run raised)."""
        for handle in self._handles:
            handle.remove()

    def steps(self) -> list[Step]:
        """The complete steps: every interval between two consecutive gradient forwards.

        Returns:
            One :class:`Step` per interval (a run of N steps gives N - 1).
        """
        heads: dict[int, int] = {}
        for i in range(0, len(self.head), 2):
            heads[self.head[i]] = heads.get(self.head[i], 0) + self.head[i + 1]
        starts = [i for i, (_, grad, _) in enumerate(self.events) if grad]
        return [
            Step(
                seconds=self.events[b][0] - self.events[a][0],
                tokens=sum(e[2] for e in self.events[a:b]),
                head_positions=sum(heads.get(i, 0) for i in range(a, b)),
            )
            for a, b in itertools.pairwise(starts)
        ]

    def clear(self) -> None:
        """Forget what was recorded (between runs)."""
        self.events.clear()
        self.head.clear()


@dataclass(frozen=True)
class SideRun:
    """One implementation's search on one behaviour."""

    losses: tuple[float, ...]
    """Target loss of the string chosen at each step (nats per target token)."""
    suffix: str
    """The lowest-loss suffix found, as text (with its joining space)."""
    seconds: float
    """Wall time of the whole call (set-up included)."""


def run_safegeom(
    lm: LoadedModel, behaviour: str, target: str, settings: GCGSettings, *, seed: int
) -> SideRun:
    """safegeom's GCG on one behaviour, unjudged (early stop off).

    Returns:
        Its :class:`SideRun` (``suffix``: the adversarial text after the behaviour).
    """
    config = gcg.GCGConfig(
        n_tokens=settings.n_tokens,
        steps=settings.steps,
        search_width=settings.search_width,
        top_k=settings.top_k,
        early_stop=False,
        seed=seed,
    )
    start = time.perf_counter()
    record = gcg.attack_one(lm, behaviour, target, config)
    seconds = time.perf_counter() - start
    return SideRun(record.losses, record.prompt[len(behaviour) :], seconds)


def nanogcg_missing() -> str | None:
    """Why nanoGCG cannot run here (``None`` when it can).

    Returns:
        A one-line reason, or ``None``.
    """
    try:
        import nanogcg  # noqa: F401
    except ImportError as exc:
        return f"nanogcg is not importable ({exc}); pip install --no-deps nanogcg==0.3.0"
    return None


class LegacyCacheModel(nn.Module):
    """``model`` as nanoGCG 0.3 expects it from transformers ≤ 4.47: a KV cache passed as
    (lists of) per-layer ``(keys, values)`` becomes a fresh ``DynamicCache`` (never mutated in
    place, as 4.47's conversion did), and the returned cache is the legacy tuple again."""

    def __init__(self, model: nn.Module) -> None:
        """Wrap ``model`` (a Hugging Face causal LM)."""
        super().__init__()
        self.inner = model
        params = inspect.signature(model.forward).parameters
        self.keyword = "cache" if "cache" in params else "past_key_values"

    @property
    def device(self) -> torch.device:
        """The model's device."""
        return self.inner.device

    @property
    def dtype(self) -> torch.dtype:
        """The model's dtype."""
        return self.inner.dtype

    def get_input_embeddings(self) -> nn.Module:
        """The model's embedding."""
        return self.inner.get_input_embeddings()

    def forward(self, **kwargs: Any) -> Any:
        """The model's forward with legacy caches converted both ways."""
        past = kwargs.pop("past_key_values", None)
        if isinstance(past, (list, tuple)):
            kwargs[self.keyword] = DynamicCache([(k, v) for k, v in past], config=self.inner.config)
        out = self.inner(**kwargs)
        cache = out.get(self.keyword, out.get("past_key_values"))
        if isinstance(cache, DynamicCache):
            out["past_key_values"] = tuple((la.keys, la.values) for la in cache.layers)
        return out


def _nanogcg_tokenizer(lm: LoadedModel) -> Any:
    """A copy of the tokenizer that adds BOS when encoding, when the template starts with it.

    nanoGCG strips the BOS from the rendered template and relies on the tokenizer to add it
    back; tiny-chat's tokenizer does not, so without this nanoGCG would attack a prompt without
    its BOS (a different prompt from safegeom's).
    """
    tok = copy.deepcopy(lm.tokenizer)
    bos = tok.bos_token_id
    if bos is not None and tok("x")["input_ids"][:1] != [bos]:
        tok.add_bos_token = True
    return tok


def nanogcg_ids(lm: LoadedModel, tokenizer: Any, slot: AttackSlot) -> bool:
    """Whether nanoGCG's tokenization of the slot's prompt (before, suffix, after, target each
    encoded apart, as nanoGCG 0.3's ``run`` does) gives safegeom's ids.

    Returns:
        ``True`` when both attack the same token sequence.
    """
    messages = [{"role": "user", "content": slot.behaviour + "{optim_str}"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if tokenizer.bos_token and text.startswith(tokenizer.bos_token):
        text = text.replace(tokenizer.bos_token, "")
    before, after = text.split("{optim_str}")
    got = (
        tokenizer(before)["input_ids"],
        tokenizer(slot.opt_text, add_special_tokens=False)["input_ids"],
        tokenizer(after, add_special_tokens=False)["input_ids"],
        tokenizer(slot.target, add_special_tokens=False)["input_ids"],
    )
    want = (slot.before_ids, slot.opt_ids, slot.after_ids, slot.target_ids)
    return all(list(a) == list(b) for a, b in zip(got, want, strict=True))


@dataclass
class NanoSide:
    """What nanoGCG needs per model: the wrapped model, its tokenizer copy, the banned tokens."""

    lm: LoadedModel
    """The model (safegeom's handle)."""
    wrapped: LegacyCacheModel = field(init=False)
    """The model as nanoGCG calls it."""
    tokenizer: Any = field(init=False)
    """nanoGCG's tokenizer (adds BOS where the template starts with it)."""
    banned: Tensor = field(init=False)
    """Token ids nanoGCG may not place: the complement of safegeom's allowed tokens."""

    def __post_init__(self) -> None:
        """Build the wrapper, the tokenizer copy and the banned ids."""
        self.wrapped = LegacyCacheModel(self.lm.model)
        self.tokenizer = _nanogcg_tokenizer(self.lm)
        vocab = self.lm.model.get_input_embeddings().weight.shape[0]
        allowed: Bool[Tensor, " vocab"] = allowed_tokens(self.lm.tokenizer, vocab)
        self.banned = (~allowed).nonzero().squeeze(1)


def run_nanogcg(
    side: NanoSide,
    behaviour: str,
    target: str,
    settings: GCGSettings,
    *,
    seed: int,
    collect_garbage: bool = True,
) -> SideRun:
    """nanoGCG 0.3 on one behaviour at ``settings``, with safegeom's allowed tokens.

    Args:
        collect_garbage: ``False`` makes nanoGCG's ``gc.collect()`` calls (two per step: its
            batch-size finder's and one after each candidate batch) do nothing, for this run only:
            a diagnostic of how much of its step they take.

    Returns:
        Its :class:`SideRun` (``suffix``: nanoGCG's best string).
    """
    from nanogcg import gcg as nano
    from nanogcg import utils

    if collect_garbage:
        return _run_nanogcg(side, behaviour, target, settings, seed)
    before = nano.gc, utils.gc
    nano.gc = utils.gc = SimpleNamespace(collect=lambda: 0)
    try:
        return _run_nanogcg(side, behaviour, target, settings, seed)
    finally:
        nano.gc, utils.gc = before


def _run_nanogcg(
    side: NanoSide, behaviour: str, target: str, settings: GCGSettings, seed: int
) -> SideRun:
    import nanogcg
    from nanogcg import gcg as nano

    nano.tqdm = _no_bar  # its per-run progress bar only
    logging.getLogger("nanogcg").setLevel(logging.WARNING)
    config = nanogcg.GCGConfig(
        num_steps=settings.steps,
        optim_str_init=" " + settings.init,
        search_width=settings.search_width,
        topk=settings.top_k,
        n_replace=1,
        buffer_size=0,
        early_stop=False,
        use_prefix_cache=True,
        allow_non_ascii=False,
        filter_ids=True,
        seed=seed,
        verbosity="WARNING",
    )
    start = time.perf_counter()
    attack = nano.GCG(side.wrapped, side.tokenizer, config)
    attack.not_allowed_ids = side.banned
    result = attack.run(behaviour, target)
    seconds = time.perf_counter() - start
    return SideRun(tuple(result.losses), result.best_string, seconds)


def _no_bar(iterable: Any, **_: Any) -> Iterator[Any]:
    """``tqdm`` without the bar."""
    return iter(iterable)


def same_prompt(lm: LoadedModel, side: NanoSide, behaviour: str, target: str, n: int) -> bool:
    """Whether nanoGCG and safegeom attack the same token sequence for this behaviour.

    Returns:
        See :func:`nanogcg_ids`.
    """
    slot = build_slot(lm, behaviour, target, n_tokens=n)
    return nanogcg_ids(lm, side.tokenizer, slot)


def retokenized_loss(lm: LoadedModel, behaviour: str, suffix: str, target: str) -> float:
    """The target loss of ``behaviour + suffix`` as *text*: rendered and tokenized by the
    library, as a user would send it (what the attack achieves, whatever ids it optimised).

    Returns:
        Mean target cross-entropy in nats per token.
    """
    (encoded,) = encode_prompts(lm.tokenizer, [behaviour + suffix], chat_template=lm.chat_template)
    pad = lm.tokenizer.pad_token_id
    loss, _ = sequence_losses(
        lm.model, pad, [encoded.input_ids], [encode_plain(lm.tokenizer, target)]
    )
    return float(loss[0])
