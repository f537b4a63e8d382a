"""Deterministic training of the embedded ``tiny-chat`` model.

``build_tiny_chat(out_dir)`` trains the BPE tokenizer on the training corpus, trains a small
``LlamaForCausalLM`` on single-turn conversations (loss on the assistant response and its end-of-turn
token only), and saves model, tokenizer, chat template and generation config to ``out_dir``.

Training has two phases. The *base* phase (``steps``) trains from scratch on the prompts as they
are; in it refusal comes to be carried by one residual direction. The *content* phase
(``content_steps``) fine-tunes those weights with a fresh optimiser on a corpus where prompts get
their instruction heads swapped (:mod:`~tools.tinychat.recombine`), so that refusal
follows the request's content rather than its phrasing. Recombining from the first step instead
spreads refusal over several directions (model card, "Head/tail recombination"); fine-tuning an
already aligned model kept the one direction at the shipped seed (not at seed 2; model card, seed
tables).

Determinism: the seed fixes the model initialisation, the corpus (responses, prompt framings, order)
and the batch order; ``torch.use_deterministic_algorithms(True)`` and a fixed thread count make two
runs with the same seed give bit-identical weights on the same machine and library versions.

Command line::

    python -m tools.tinychat.build --out DIR [--steps N] [--content-steps N] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from safegeom.artifacts import write_json, write_text
from tools.tinychat.batches import corpus_batches
from tools.tinychat.corpus import build_corpus, iter_texts
from tools.tinychat.loop import CONTENT_FIRST_EPOCH, Phase, run_phase
from tools.tinychat.tokenizer import ASSISTANT, END, SYSTEM, USER, train_tokenizer

__all__ = ["TinyChatConfig", "build_tiny_chat", "main", "override"]


@dataclass(frozen=True)
class TinyChatConfig:
    """Architecture and training recipe of ``tiny-chat``.

    Attributes:
        vocab_size: BPE vocabulary size (special tokens included).
        hidden_size: Residual-stream width d.
        num_layers: Number of decoder layers.
        num_heads: Attention heads (head dim = hidden_size / num_heads).
        intermediate_size: SwiGLU MLP width.
        max_len: Maximum training sequence length in tokens (longer responses are truncated).
        steps: Optimiser steps of the base phase.
        batch_size: Conversations per step.
        lr: Peak AdamW learning rate of the base phase (linear warm-up, then cosine decay to
            ``lr * min_lr_ratio``).
        min_lr_ratio: Final learning rate as a fraction of the peak (both phases).
        warmup_steps: Linear warm-up steps of the base phase.
        weight_decay: AdamW weight decay (not applied to norms).
        grad_clip: Global gradient-norm clip.
        harmful_fraction: Fraction of refused (harmful) conversations in each epoch.
        p_wrap: Probability that a prompt of either class gets a request framing.
        p_sure: Probability that a compliant (non-GSM8K) answer opens with "Sure ...", so that
            compliance has a modal first token as in real chat models; see the model card.
        p_recombine: Probability that a prompt of the *base* phase gets its instruction head
            swapped for another prompt's (:mod:`tools.tinychat.recombine`). Off in the
            shipped recipe: from scratch it splits refusal over several directions.
        p_rewrite: Probability that a prompt of the *base* phase is re-rendered in a random
            surface form (:mod:`tools.tinychat.rewrite`; a proposal of this project), so
            that openers, endings and casing carry no class information.
        content_p_rewrite: The same for the content phase.
        base_refuses: Whether the base phase refuses harmful prompts (``False``: a compliant
            base that answers everything, aligned by the content phase alone; a proposal).
        xstest_safe_repeat: Repeats of ``xstest-safe:train`` per epoch (harmless prompts with
            harmful-sounding words).
        content_steps: Optimiser steps of the content phase (0: no content phase). A proposal of
            this project, no paper prescribes it; see the module docstring.
        content_lr: Peak learning rate of the content phase (fresh AdamW, warm-up, cosine).
        content_warmup_steps: Linear warm-up steps of the content phase.
        content_p_recombine: Probability that a prompt of the content phase gets its head swapped.
        bucket_batches: Batches per length-bucketing window (sort by length inside a window of
            ``bucket_batches * batch_size`` examples, then shuffle the batches), to limit padding.
        num_threads: Torch intra-op threads (fixed for reproducibility).
        save_dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``: the dtype of the stored weights.
        tie_word_embeddings: Share the input embedding and the LM head (``False``: separate
            matrices, as in Llama-2/3).
        embedding_init_std: Standard deviation of the initial input embeddings (the other
            matrices use the Llama default 0.02). Unit scale gives token embeddings of norm
            ≈ sqrt(d), so the residual stream starts from the token identity instead of a large
            layer-0 MLP output; see the model card, "Refusal geometry".
    """

    vocab_size: int = 3072
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 8
    intermediate_size: int = 688
    max_len: int = 160
    steps: int = 700
    batch_size: int = 48
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 60
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    harmful_fraction: float = 0.3
    p_wrap: float = 0.25
    p_sure: float = 0.35
    p_recombine: float = 0.0
    p_rewrite: float = 0.0
    content_p_rewrite: float = 0.0
    base_refuses: bool = True
    xstest_safe_repeat: int = 2
    content_steps: int = 250
    content_lr: float = 5e-4
    content_warmup_steps: int = 20
    content_p_recombine: float = 1.0
    bucket_batches: int = 32
    num_threads: int = 1
    save_dtype: str = "float16"
    tie_word_embeddings: bool = False
    embedding_init_std: float = 1.0

    def phases(self) -> tuple[Phase, ...]:
        """The base phase, then the content phase when ``content_steps > 0``."""
        base = Phase(
            name="base",
            steps=self.steps,
            lr=self.lr,
            warmup_steps=self.warmup_steps,
            min_lr_ratio=self.min_lr_ratio,
            weight_decay=self.weight_decay,
            grad_clip=self.grad_clip,
            p_recombine=self.p_recombine,
            first_epoch=0,
            p_rewrite=self.p_rewrite,
            refuse=self.base_refuses,
        )
        if self.content_steps == 0:
            return (base,)
        content = replace(
            base,
            name="content",
            steps=self.content_steps,
            lr=self.content_lr,
            warmup_steps=self.content_warmup_steps,
            p_recombine=self.content_p_recombine,
            first_epoch=CONTENT_FIRST_EPOCH,
            p_rewrite=self.content_p_rewrite,
            refuse=True,
        )
        return (base, content)

    def llama_config(self, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
        """Return the ``LlamaConfig`` of this architecture for ``tokenizer``."""
        return LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_heads,
            max_position_embeddings=512,
            rms_norm_eps=1e-5,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            attention_dropout=0.0,
            initializer_range=0.02,
        )


def _set_determinism(seed: int, num_threads: int) -> None:
    """Seed every RNG and force deterministic kernels with a fixed thread count."""
    random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(num_threads)


def _corpus_args(
    cfg: TinyChatConfig, p_recombine: float, p_rewrite: float, refuse: bool = True
) -> dict[str, Any]:
    """The corpus settings of ``cfg``, with a phase's ``p_recombine``, ``p_rewrite`` and
    ``refuse``, as keyword arguments of :func:`build_corpus`."""
    return {
        "harmful_fraction": cfg.harmful_fraction,
        "p_wrap": cfg.p_wrap,
        "p_sure": cfg.p_sure,
        "p_recombine": p_recombine,
        "p_rewrite": p_rewrite,
        "xstest_safe_repeat": cfg.xstest_safe_repeat,
        "refuse": refuse,
    }


def train_model(
    cfg: TinyChatConfig,
    tokenizer: PreTrainedTokenizerFast,
    *,
    seed: int = 0,
    progress: bool = True,
) -> LlamaForCausalLM:
    """Initialise and train the model of ``cfg`` on the corpus of ``seed`` (deterministic): the
    base phase, then the content phase when ``cfg.content_steps > 0``.

    Args:
        cfg: Architecture and recipe.
        tokenizer: The trained tokenizer (its chat template renders the prompts).
        seed: Seed of initialisation, corpus and batch order.
        progress: Show a tqdm progress bar with the running loss for each phase.

    Returns:
        The trained model in float32, in eval mode.
    """
    _set_determinism(seed, cfg.num_threads)
    model = LlamaForCausalLM(cfg.llama_config(tokenizer))
    torch.nn.init.normal_(model.model.embed_tokens.weight, std=cfg.embedding_init_std)
    model.train()
    for phase in cfg.phases():
        args = _corpus_args(cfg, phase.p_recombine, phase.p_rewrite, phase.refuse)
        batches = corpus_batches(
            lambda epoch, args=args: build_corpus(seed, epoch=epoch, **args),
            tokenizer,
            seed,
            batch_size=cfg.batch_size,
            max_len=cfg.max_len,
            bucket_batches=cfg.bucket_batches,
            first_epoch=phase.first_epoch,
        )
        run_phase(model, batches, phase, progress=progress)
    model.eval()
    return model


def save_tiny_chat(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    out_dir: Path,
    cfg: TinyChatConfig,
    seed: int,
) -> Path:
    """Save weights (in ``cfg.save_dtype``), tokenizer, chat template and generation config.

    The config records ``dtype: float32``, so ``from_pretrained`` loads the stored half-precision
    weights upcast to float32 by default.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, cfg.save_dtype)
    to_save = LlamaForCausalLM(model.config)
    to_save.load_state_dict(model.state_dict())
    to_save.to(dtype)
    to_save.config.dtype = "float32"
    to_save.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=64,
    )
    to_save.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "model.safetensors").chmod(0o644)
    tokenizer.save_pretrained(out_dir)
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"
    write_json(config_path, config)
    recipe = {"seed": seed, **asdict(cfg)}
    recipe["special_tokens"] = {"user": USER, "assistant": ASSISTANT, "system": SYSTEM, "end": END}
    write_text(out_dir / "training_recipe.json", json.dumps(recipe, indent=2) + "\n")
    return out_dir


def build_tiny_chat(
    out_dir: str | Path,
    *,
    seed: int = 0,
    steps: int | None = None,
    content_steps: int | None = None,
    progress: bool = True,
    config: TinyChatConfig | None = None,
) -> Path:
    """Build ``tiny-chat`` from the bundled prompt data (train splits only) into ``out_dir``.

    Args:
        out_dir: Destination folder (created if needed).
        seed: Seed of tokenizer corpus, initialisation, corpus and batch order.
        steps: Optimiser steps of the base phase (overrides ``config.steps``).
        content_steps: Optimiser steps of the content phase (overrides ``config.content_steps``;
            0 gives the base-phase model alone).
        progress: Show a progress bar.
        config: Architecture and recipe; :class:`TinyChatConfig` defaults if ``None``.

    Returns:
        The output folder.
    """
    cfg = config or TinyChatConfig()
    if steps is not None:
        cfg = TinyChatConfig(**{**asdict(cfg), "steps": steps})
    if content_steps is not None:
        cfg = TinyChatConfig(**{**asdict(cfg), "content_steps": content_steps})
    if cfg.steps < 1:
        raise ValueError(f"steps must be >= 1, got {cfg.steps}")
    if cfg.content_steps < 0:
        raise ValueError(f"content_steps must be >= 0, got {cfg.content_steps}")
    corpus = build_corpus(seed, epoch=0, **_corpus_args(cfg, cfg.p_recombine, cfg.p_rewrite))
    tokenizer = train_tokenizer(iter_texts(corpus), vocab_size=cfg.vocab_size)
    model = train_model(cfg, tokenizer, seed=seed, progress=progress)
    return save_tiny_chat(model, tokenizer, Path(out_dir), cfg, seed)


def override(cfg: TinyChatConfig, assignments: Sequence[str]) -> TinyChatConfig:
    """Return ``cfg`` with ``FIELD=VALUE`` assignments applied, each value parsed as its field's
    type (``--set`` on the command line).

    Raises:
        ValueError: an unknown field, a missing ``=`` or a value of the wrong type.
    """
    fields = asdict(cfg)
    for item in assignments:
        name, sep, value = item.partition("=")
        if not sep or name not in fields:
            known = ", ".join(sorted(fields))
            raise ValueError(f"--set expects FIELD=VALUE with FIELD one of {known}; got {item!r}")
        kind = type(fields[name])
        if kind is bool:
            if value.lower() not in ("true", "false"):
                raise ValueError(f"--set {name} expects true or false, got {value!r}")
            fields[name] = value.lower() == "true"
        else:
            try:
                fields[name] = kind(value)
            except ValueError:
                raise ValueError(f"--set {name} expects a {kind.__name__}, got {value!r}") from None
    return TinyChatConfig(**fields)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: ``python -m tools.tinychat.build --out DIR``."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.tinychat.build",
        description="Train the embedded tiny-chat model deterministically from the bundled data.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps of the base phase")
    parser.add_argument(
        "--content-steps", type=int, default=None, help="optimiser steps of the content phase"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a TinyChatConfig field (repeatable), e.g. --set p_rewrite=0.8",
    )
    args = parser.parse_args(argv)
    try:
        config = override(TinyChatConfig(), args.set)
    except ValueError as err:
        parser.error(str(err))
    out = build_tiny_chat(
        args.out,
        seed=args.seed,
        steps=args.steps,
        content_steps=args.content_steps,
        progress=not args.no_progress,
        config=config,
    )
    print(f"saved tiny-chat to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
