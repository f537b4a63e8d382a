"""The training methods bench_train.py compares: each a :class:`Runner` that steps like train().

A runner holds what :func:`safegeom.training.train` builds for its method (``load_model``, the
method's ``prepare`` and :func:`~safegeom.training.runner.run_config`, the state's ``wrap``,
``encode_examples``, :class:`~safegeom.training.step.StepLoss`, the optimizer and schedule of
:func:`~safegeom.training.optim.make_optimizer`, ``accelerate``), and :meth:`Runner.step` is train's
loop body: :func:`~safegeom.training.loop.optimizer_step` (loss, backward, gradient clip, optimizer
and scheduler step), then the loss and its terms read back.

Each runner counts the token positions it feeds: every forward of the decoder (the task forward,
the reference forward of kl and adaptive, RefusalGuard's penalty forward over its calibration
prompts), and of those the positions that reach the LM head (the penalty forward runs the decoder
alone, so ``decoder - head`` is the calibration prompts' positions).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from safegeom.models import LoadConfig, LoadedModel, load_model
from safegeom.models.layout import resolve
from safegeom.training.adaptive import RiskProbe, RiskProbeConfig, fit_risk_probe
from safegeom.training.config import RunConfig, TrainConfig
from safegeom.training.data import ExampleOrder, encode_examples
from safegeom.training.loop import optimizer_step
from safegeom.training.methods import Prepared, Setup
from safegeom.training.methods.r2d2 import R2D2Config
from safegeom.training.methods.refusalguard import GuardConfig
from safegeom.training.optim import make_optimizer
from safegeom.training.regularised import RegConfig
from safegeom.training.runner import method_settings, run_config
from safegeom.training.step import StepLoss
from safegeom.training.tasks import Task, get_task
from safegeom.training.trainable import Trainable

SEED = 0
"""Seed of the weights, adapters, data order and calibration batches (train's ``seed``)."""
TRAIN, REG = TrainConfig(), RegConfig()
"""train()'s defaults: LoRA rank/alpha/targets, schedule, gradient clip, weight decay; kl/adaptive."""


@dataclass(frozen=True)
class Preset:
    """A benchmark configuration: the model, the task and how many steps."""

    model: str
    """``tiny-chat``; ``smol-chat`` (the shipped adapter merged into SmolLM2-135M-Instruct, as
    train() asks of an adapter); or ``random``: a random-weight Llama with tiny-chat's tokenizer."""
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
    search_width: int = 64
    """r2d2 rows: GCG candidates per attack step (:data:`R2D2`'s 64 unless a preset scales it)."""


PRESETS: dict[str, Preset] = {
    "tiny-chat": Preset(model="tiny-chat", task="mix", batch_size=8, warmup=2, steps=16),
    # SmolLM2-135M-Instruct + the smol-chat adapter (merged), 30 layers, d 576: about 20 minutes
    # on one thread with every row; GCG at width 16 (a quarter of tiny-chat's) to fit that.
    "smol-chat": Preset(
        model="smol-chat", task="mix:200", batch_size=8, warmup=2, steps=4, search_width=16
    ),
    # ~109M parameters: Llama shape, tiny-chat's 3,072-token vocabulary.
    "llama-large": Preset(
        model="random",
        task="mix:200",
        batch_size=8,
        warmup=2,
        steps=6,
        hidden=1024,
        layers=8,
        heads=16,
        intermediate=2816,
    ),
    # Smoke tests only: a few seconds.
    "tiny-random": Preset(
        model="random",
        task="mix:16",
        batch_size=2,
        warmup=1,
        steps=2,
        hidden=64,
        layers=2,
        heads=4,
        intermediate=128,
    ),
}


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
    r2d2: R2D2Config | None = None
    """R2D2 settings (r2d2 rows)."""


R2D2 = R2D2Config(n_behaviours=16, search_width=64, top_k=64, attacked_per_step=2)
"""The r2d2 rows' settings, scaled for a CPU (HarmBench: width 512, 8 behaviours a step): 16
harmbench-train behaviours, 20-token suffixes, 2 attacked a step with 64 candidates per GCG step;
the rows differ in m, the GCG steps per training step. Attack time grows about as width × n × m."""


VARIANTS: dict[str, Variant] = {
    "lora": Variant("lora", "LoRA (baseline)"),
    "sft": Variant("sft", "full SFT"),
    "refusalguard": Variant("refusalguard", "RefusalGuard (defaults)", goal=1.3),
    "refusalguard-every1": Variant(
        "refusalguard", "RefusalGuard, penalty_every 1", GuardConfig(penalty_every=1), 1.3
    ),
    "refusalguard-calib4": Variant(
        "refusalguard", "RefusalGuard, calib_batch 4", GuardConfig(calib_batch=4), 1.3
    ),
    "refusalguard-reft": Variant(
        "refusalguard", "RefusalGuard, reft variant", GuardConfig(variant="reft"), 1.3
    ),
    "kl": Variant("kl", "KL-regularised LoRA"),
    "adaptive": Variant("adaptive", "adaptive KL", goal=1.6),
    "r2d2-m1": Variant("r2d2", "R2D2, m = 1 GCG step", r2d2=replace(R2D2, gcg_steps=1)),
    "r2d2-m5": Variant("r2d2", "R2D2, m = 5 GCG steps", r2d2=replace(R2D2, gcg_steps=5)),
}
"""Every row, in the table's order. ``refusalguard`` is ``GuardConfig()`` (the LoRA variant,
λ_geom 0.3, a penalty every 2 steps on 8 harmful calibration prompts); the other RefusalGuard rows
change one setting each."""


def sync_device(device: torch.device) -> None:
    """Wait for the device's queued kernels (CUDA); nothing on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quiet_loading() -> None:
    """No weight-loading bars from transformers (one per model built)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def build_model(preset: Preset, device: str) -> LoadedModel:
    """The preset's frozen model on ``device``, as train() loads it (``random``: seeded weights;
    ``smol-chat``: its adapter merged into the base, as train() asks of an adapter model)."""
    if preset.model == "smol-chat":
        load = LoadConfig(dtype=preset.dtype, device=device, merge_adapter=True)
        return load_model("smol-chat", load)
    lm = load_model("tiny-chat", LoadConfig(dtype=preset.dtype, device=device))
    if preset.model == "tiny-chat":
        return lm
    from transformers import LlamaConfig, LlamaForCausalLM

    small = lm.base.config
    config = LlamaConfig(
        hidden_size=preset.hidden,
        num_hidden_layers=preset.layers,
        num_attention_heads=preset.heads,
        num_key_value_heads=preset.heads,
        intermediate_size=preset.intermediate,
        vocab_size=small.vocab_size,
        max_position_embeddings=small.max_position_embeddings,
        pad_token_id=small.pad_token_id,
        bos_token_id=small.bos_token_id,
        eos_token_id=small.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, preset.dtype)).eval()
    return replace(
        lm, model=model, name=f"random-llama-{preset.hidden}x{preset.layers}", source="random"
    )


def defence_key(variant: Variant) -> str:
    """The folder (under the run's root) of what ``variant``'s defence fits on the frozen model.

    RefusalGuard rows whose cones are fitted alike (same layers, cone, k, readout and calibration
    sets) share one folder: the same fit, read back instead of fitted again.
    """
    if variant.method != "refusalguard":
        return variant.method
    g = variant.guard
    fit = (
        g.guard_layers,
        g.cone,
        g.cone_k,
        g.readout,
        g.calib_harmful,
        g.calib_harmless,
        g.n_calib,
    )
    return "refusalguard-" + hashlib.sha256(repr(fit).encode()).hexdigest()[:10]


def make_defence(
    variant: Variant, lm: LoadedModel, task: Task, root: Path, fresh: bool
) -> tuple[Prepared, dict[str, float]]:
    """The method's ``prepare`` as train() calls it, timed; ``fresh=False`` reads back the cones (and
    the risk probe and risks) an earlier row with the same :func:`defence_key` saved under ``root``.

    Returns:
        ``(defence, {set-up part: wall seconds})``.
    """
    folder, critic, parts = root / defence_key(variant), None, {}
    if variant.method == "adaptive":
        started = time.perf_counter()
        if fresh:  # the probe the method would fit, fitted here so that it is timed alone
            critic = fit_risk_probe(
                lm,
                RiskProbeConfig(
                    layers=REG.probe_layers,
                    seed=SEED,
                    scale=REG.probe_scale,
                    n_per_class=REG.probe_n,
                ),
            )
            parts["risk probe fit"] = time.perf_counter() - started
        else:
            critic = RiskProbe.load(folder / "risk_probe.safetensors")
    started = time.perf_counter()
    given = {"refusalguard": variant.guard, "kl": REG, "r2d2": variant.r2d2}.get(variant.method)
    if variant.method == "adaptive":  # the critic fitted (or read back) above
        given = replace(REG, critic=critic)
    method, settings = method_settings(variant.method, given)
    setup = Setup(
        method=variant.method,
        lm=lm,
        prompts=tuple(task.prompts),
        seed=SEED,
        folder=folder,
        resume=not fresh,
        write=fresh,
    )
    defence = method.prepare(setup, settings)
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
    """The learning-rate schedule (train's: cosine to 0 over the run, no warm-up)."""
    acc: Accelerator
    """The accelerator (backward, clipping, reduction)."""
    config: RunConfig
    """The run's settings as train() resolves them (lr, schedule, gradient clip, ...)."""
    order: ExampleOrder
    """The run's data order (seed :data:`SEED`)."""
    positions: int = 0
    """Token positions (padding included) fed to the decoder so far, over every forward."""
    head: int = 0
    """Of :attr:`positions`, those that went on to the LM head (all but the penalty forward's)."""

    def count_decoder(self, module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        """Forward-pre-hook on the decoder: add the call's ``input_ids`` positions."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.positions += 0 if ids is None else int(ids.numel())

    def count_head(self, module: Any, args: tuple) -> None:
        """Forward-pre-hook on the LM head: add the positions of its input hidden states."""
        self.head += int(args[0].shape[:-1].numel())

    def step(self, step: int) -> float:
        """One optimizer step at data position ``step`` (train's loop body); returns the loss."""
        size = self.config.train.batch_size
        indices = [self.order.index(step * size + i) for i in range(size)]
        loss, terms = optimizer_step(
            self.acc,
            self.trainable,
            self.step_loss,
            self.optimizer,
            self.scheduler,
            indices,
            step,
            grad_clip=self.config.train.grad_clip,
            lr=self.config.lr,
            saved=0,
        )
        for value in terms.values():  # read back as train() does for its log
            float(self.acc.reduce(value, reduction="mean"))
        return float(self.acc.reduce(loss, reduction="mean"))


def build_runner(
    name: str, preset: Preset, acc: Accelerator, root: Path, *, fresh: bool, total_steps: int
) -> tuple[Runner, dict[str, float]]:
    """Method ``name`` built on a fresh copy of the preset's model, for a run of ``total_steps``.

    Returns:
        ``(runner, {set-up part: wall seconds})``.
    """
    variant, task = VARIANTS[name], get_task(preset.task)
    if variant.r2d2 is not None:
        variant = replace(variant, r2d2=replace(variant.r2d2, search_width=preset.search_width))
    set_seed(SEED)
    lm = build_model(preset, str(acc.device))
    defence, parts = make_defence(variant, lm, task, root, fresh)
    settings = replace(TRAIN, seed=SEED, batch_size=preset.batch_size, steps=total_steps)
    config = run_config(variant.method, task, settings, defence, lm)
    trainable = defence.wrap(lm, lm.name, config, dtype=preset.dtype, resume_from=None)
    examples = encode_examples(
        lm.tokenizer,
        task.prompts,
        task.responses,
        system=settings.system,
        chat_template=lm.chat_template,
        max_length=config.max_length,
    )
    pad = lm.tokenizer.pad_token_id
    step_loss = StepLoss(trainable, examples, int(pad if pad is not None else 0), defence)
    raw, scheduler = make_optimizer(trainable.parameters(), config)
    trainable.module, optimizer = acc.prepare(trainable.module, raw)
    order = ExampleOrder(len(examples), SEED)
    runner = Runner(trainable, step_loss, optimizer, scheduler, acc, config, order)
    parent = lm.layout.blocks.rpartition(".")[0]  # the module GeometryPenalty runs alone
    decoder = resolve(lm.base, parent) if parent else lm.base
    decoder.register_forward_pre_hook(runner.count_decoder, with_kwargs=True)
    lm.base.get_output_embeddings().register_forward_pre_hook(runner.count_head)
    return runner, parts


def block_size(names: list[str]) -> int:
    """Rounds per block: the least common multiple of the RefusalGuard rows' ``penalty_every``
    (1 without them), so every block holds whole penalty cycles of every row."""
    every = [VARIANTS[n].guard.penalty_every for n in names if VARIANTS[n].method == "refusalguard"]
    return math.lcm(*every) if every else 1
