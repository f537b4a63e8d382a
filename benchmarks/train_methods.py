"""The training methods bench_train.py compares: each a :class:`Runner` that steps like train().

A runner holds what :func:`safegeom.train.train` builds for its method (``load_model``,
``prepare_defence``, ``wrap_model``, ``encode_examples``, :class:`~safegeom.train.step.StepLoss`,
AdamW with train's parameter groups, a cosine schedule, ``accelerate``), and
:meth:`Runner.step` is the body of train's loop: loss, backward, gradient clip, optimizer and
scheduler step, the loss and its terms read back.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from safegeom.models import LoadConfig, LoadedModel, load_model
from safegeom.train.adaptive import RiskProbe, RiskProbeConfig, fit_risk_probe
from safegeom.train.config import DEFAULT_LR, TrainConfig
from safegeom.train.data import ExampleOrder, encode_examples
from safegeom.train.defences import Defence, prepare_defence, update_of
from safegeom.train.guard import GuardConfig
from safegeom.train.regularised import RegConfig
from safegeom.train.step import StepLoss
from safegeom.train.tasks import Task, get_task
from safegeom.train.wrap import Trainable, default_lora_targets, wrap_model

SEED = 0
"""Seed of the weights, adapters, data order and calibration batches (train's ``seed``)."""
TRAIN, REG = TrainConfig(), RegConfig()
"""train()'s defaults: LoRA rank/alpha/targets, gradient clip, weight decay; kl/adaptive."""


@dataclass(frozen=True)
class Preset:
    """A benchmark configuration: the model, the task and how many steps."""

    model: str
    """``tiny-chat``, or ``random``: a random-weight Llama with tiny-chat's tokenizer."""
    task: str
    """Task spec trained on (its prompts are also what adaptive scores)."""
    batch_size: int
    """Task examples per step (train's ``batch_size``)."""
    warmup: int
    """Untimed steps per method first (memory is measured over them)."""
    steps: int
    """Timed steps per method (rounded up to whole blocks)."""
    hidden: int = 0
    """random: width of the residual stream."""
    layers: int = 0
    """random: decoder blocks."""
    heads: int = 0
    """random: attention heads (as many key/value heads)."""
    intermediate: int = 0
    """random: MLP width."""
    dtype: str = "float32"
    """Weights' and training dtype."""


PRESETS: dict[str, Preset] = {
    "tiny-chat": Preset(model="tiny-chat", task="mix", batch_size=8, warmup=2, steps=16),
    # ~109M parameters: Llama shape, tiny-chat's 3,072-token vocabulary.
    "llama-large": Preset(model="random", task="mix:200", batch_size=8, warmup=2, steps=6,
                          hidden=1024, layers=8, heads=16, intermediate=2816),
    # Smoke tests only: a few seconds.
    "tiny-random": Preset(model="random", task="mix:16", batch_size=2, warmup=1, steps=2,
                          hidden=64, layers=2, heads=4, intermediate=128),
}  # fmt: skip


@dataclass(frozen=True)
class Variant:
    """One row: a training method and its settings."""

    method: str
    """The ``train()`` method."""
    label: str
    """Row label."""
    guard: GuardConfig = field(default_factory=GuardConfig)
    """RefusalGuard settings (refusalguard rows)."""
    goal: float | None = None
    """Step-time goal as a multiple of a LoRA step, or ``None``."""


VARIANTS: dict[str, Variant] = {
    "lora": Variant("lora", "LoRA (baseline)"),
    "sft": Variant("sft", "full SFT"),
    "refusalguard": Variant("refusalguard", "RefusalGuard (reft edit)", goal=1.3),
    "refusalguard-lora": Variant("refusalguard", "RefusalGuard (LoRA variant)",
                                 GuardConfig(variant="lora"), 1.3),
    "kl": Variant("kl", "KL-regularised LoRA"),
    "adaptive": Variant("adaptive", "adaptive KL", goal=1.6),
    "refusalguard-every2": Variant("refusalguard", "RefusalGuard, penalty_every 2",
                                   GuardConfig(penalty_every=2), 1.3),
    "refusalguard-calib4": Variant("refusalguard", "RefusalGuard, calib_batch 4",
                                   GuardConfig(calib_batch=4), 1.3),
}  # fmt: skip


def sync_device(device: torch.device) -> None:
    """Wait for the device's queued kernels (CUDA); nothing on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quiet_loading() -> None:
    """No weight-loading bars from transformers (one per model built)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def build_model(preset: Preset, device: str) -> LoadedModel:
    """The preset's frozen model on ``device``, as train() loads it (``random``: seeded weights)."""
    lm = load_model("tiny-chat", LoadConfig(), dtype=preset.dtype, device=device)
    if preset.model == "tiny-chat":
        return lm
    from transformers import LlamaConfig, LlamaForCausalLM

    small = lm.base.config
    config = LlamaConfig(
        hidden_size=preset.hidden, num_hidden_layers=preset.layers,
        num_attention_heads=preset.heads, num_key_value_heads=preset.heads,
        intermediate_size=preset.intermediate, vocab_size=small.vocab_size,
        max_position_embeddings=small.max_position_embeddings, pad_token_id=small.pad_token_id,
        bos_token_id=small.bos_token_id, eos_token_id=small.eos_token_id,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(SEED)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, preset.dtype)).eval()
    return replace(lm, model=model, name=f"random-llama-{preset.hidden}x{preset.layers}",
                   source="random")  # fmt: skip


def make_defence(
    variant: Variant, lm: LoadedModel, task: Task, root: Path, fresh: bool
) -> tuple[Defence, dict[str, float]]:
    """``prepare_defence`` as train() calls it, timed; ``fresh=False`` reads back the cones (and
    the risk probe and risks) an earlier method of the same kind saved under ``root``.

    Returns:
        ``(defence, {set-up part: wall seconds})``.
    """
    folder, critic, parts = root / variant.method, None, {}
    if variant.method == "adaptive":
        started = time.perf_counter()
        if fresh:  # the probe prepare_defence would fit, fitted here so that it is timed alone
            critic = fit_risk_probe(lm, RiskProbeConfig(layers=REG.probe_layers, seed=SEED,
                                    scale=REG.probe_scale, n_per_class=REG.probe_n))  # fmt: skip
            parts["risk probe fit"] = time.perf_counter() - started
        else:
            critic = RiskProbe.load(folder / "risk_probe.safetensors")
    started = time.perf_counter()
    defence = prepare_defence(variant.method, lm, list(task.prompts), guard=variant.guard, reg=REG,
                              critic=critic, seed=SEED, folder=folder, resume=not fresh,
                              write=fresh)  # fmt: skip
    took = time.perf_counter() - started
    if variant.method == "refusalguard":
        parts["cones + calibration cache" if fresh else "calibration cache (cones shared)"] = took
    elif variant.method == "adaptive":
        parts["risk scores of the task prompts"] = took
    return defence, parts


@dataclass
class Runner:
    """One method ready to step: the trainable, its step loss and optimizer, as train() builds."""

    trainable: Trainable
    """The wrapped model (its ``module`` as ``accelerate`` prepared it)."""
    step_loss: StepLoss
    """The method's step loss."""
    optimizer: Any
    """AdamW, as prepared by ``accelerate``."""
    scheduler: Any
    """The cosine learning-rate schedule."""
    acc: Accelerator
    """The accelerator (backward, clipping, reduction)."""
    order: ExampleOrder
    """The run's data order (seed :data:`SEED`)."""
    batch_size: int
    """Examples per step."""
    tokens: int = 0
    """Token positions (padding included) fed to the model so far, over every forward."""

    def count_tokens(self, module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        """Forward-pre-hook on the model: add the batch's ``input_ids`` positions to ``tokens``."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.tokens += 0 if ids is None else int(ids.numel())

    def step(self, step: int) -> float:
        """One optimizer step at data position ``step`` (train's loop body); returns the loss."""
        module, params = self.trainable.module, self.trainable.parameters()
        module.train()
        start = step * self.batch_size
        indices = [self.order.index(start + i) for i in range(self.batch_size)]
        loss, terms = self.step_loss(indices, step)
        if not torch.isfinite(loss.detach()).all():
            raise RuntimeError(f"the loss is {float(loss):.4g} at step {step + 1}")
        self.acc.backward(loss)
        if TRAIN.grad_clip:
            self.acc.clip_grad_norm_(params, TRAIN.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        for value in terms.values():
            float(self.acc.reduce(value, reduction="mean"))
        return float(self.acc.reduce(loss.detach(), reduction="mean"))


def build_runner(
    name: str, preset: Preset, acc: Accelerator, root: Path, *, fresh: bool, total_steps: int
) -> tuple[Runner, dict[str, float]]:
    """Method ``name`` built on a fresh copy of the preset's model.

    Returns:
        ``(runner, {set-up part: wall seconds})``.
    """
    variant, task = VARIANTS[name], get_task(preset.task)
    set_seed(SEED)
    lm = build_model(preset, str(acc.device))
    defence, parts = make_defence(variant, lm, task, root, fresh)
    update = update_of(variant.method, variant.guard)
    settings: dict[str, Any] = {}
    if update == "lora":
        settings = {"lora_r": TRAIN.lora_r, "lora_alpha": TRAIN.lora_alpha,
                    "lora_dropout": TRAIN.lora_dropout, "lora_targets": default_lora_targets(lm)}  # fmt: skip
    elif update == "reft":
        g = variant.guard
        # train()'s reft settings; reft_generated is newer than some GuardConfigs (False before).
        settings = {"layers": sorted(defence.bases), "rank": g.reft_rank, "first_k": g.reft_first,
                    "last_k": g.reft_last, "seed": SEED,
                    "edit_generated": bool(getattr(g, "reft_generated", False))}  # fmt: skip
    trainable = wrap_model(lm, "tiny-chat", update, settings, dtype=preset.dtype,
                           resume_from=None, bases=defence.bases)  # fmt: skip
    examples = encode_examples(lm.tokenizer, task.prompts, task.responses,
                               chat_template=lm.chat_template, max_length=lm.max_positions)  # fmt: skip
    pad = lm.tokenizer.pad_token_id
    step_loss = StepLoss(trainable, examples, int(pad if pad is not None else 0), defence.penalty,
                         seed=SEED, risks=defence.risks, **defence.step_options)  # fmt: skip
    params = trainable.parameters()
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": TRAIN.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]  # fmt: skip
    raw = torch.optim.AdamW([g for g in groups if g["params"]], lr=DEFAULT_LR[update])
    cosine = lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s / total_steps, 1.0)))  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(raw, cosine)
    trainable.module, optimizer = acc.prepare(trainable.module, raw)
    order = ExampleOrder(len(examples), SEED)
    runner = Runner(trainable, step_loss, optimizer, scheduler, acc, order, preset.batch_size)
    lm.model.register_forward_pre_hook(runner.count_tokens, with_kwargs=True)
    return runner, parts


def block_size(names: list[str]) -> int:
    """Rounds per block: the largest ``penalty_every`` among the RefusalGuard rows (else 1)."""
    every = [VARIANTS[n].guard.penalty_every for n in names if VARIANTS[n].method == "refusalguard"]
    return max(every, default=1)
