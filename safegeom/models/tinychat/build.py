"""Deterministic training of the embedded ``tiny-chat`` model.

``build_tiny_chat(out_dir)`` trains the BPE tokenizer on the training corpus, trains a small
``LlamaForCausalLM`` on single-turn conversations (loss on the assistant response and its end-of-turn
token only), and saves model, tokenizer, chat template and generation config to ``out_dir``.

Training has two phases. The *base* phase (``steps``) trains from scratch on the prompts as they
are; in it refusal comes to be carried by one residual direction. The *content* phase
(``content_steps``) fine-tunes those weights with a fresh optimiser on a corpus where prompts get
their instruction heads swapped (:mod:`~safegeom.models.tinychat.recombine`), so that refusal
follows the request's content rather than its phrasing. Recombining from the first step instead
spreads refusal over several directions (model card, "Head/tail recombination"); fine-tuning an
already aligned model kept the one direction at the shipped seed (not at seed 2; model card, seed
tables).

Determinism: the seed fixes the model initialisation, the corpus (responses, prompt framings, order)
and the batch order; ``torch.use_deterministic_algorithms(True)`` and a fixed thread count make two
runs with the same seed give bit-identical weights on the same machine and library versions.

Command line::

    python -m safegeom.models.tinychat.build --out DIR [--steps N] [--content-steps N] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from safegeom.artifacts import write_json, write_text
from safegeom.models.tinychat.corpus import Example, build_corpus, iter_texts
from safegeom.models.tinychat.loop import CONTENT_FIRST_EPOCH, Batch, Phase, run_phase
from safegeom.models.tinychat.tokenizer import ASSISTANT, END, SYSTEM, USER, train_tokenizer

__all__ = ["TinyChatConfig", "build_tiny_chat", "main"]


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
            swapped for another prompt's (:mod:`safegeom.models.tinychat.recombine`). Off in the
            shipped recipe: from scratch it splits refusal over several directions.
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


def _corpus_args(cfg: TinyChatConfig, p_recombine: float) -> dict[str, float]:
    """The corpus settings of ``cfg``, with a phase's ``p_recombine``, as keyword arguments of
    :func:`build_corpus`."""
    return {
        "harmful_fraction": cfg.harmful_fraction,
        "p_wrap": cfg.p_wrap,
        "p_sure": cfg.p_sure,
        "p_recombine": p_recombine,
    }


def _encode(
    examples: Sequence[Example], tokenizer: PreTrainedTokenizerFast, max_len: int
) -> list[tuple[list[int], int]]:
    """Tokenize conversations as ``(ids, n_prompt)``: prompt tokens from the chat template, then the
    response tokenized on its own plus ``<|end|>`` (what the model generates), truncated to
    ``max_len``."""
    end_id = tokenizer.convert_tokens_to_ids(END)
    rendered = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": ex.prompt}], add_generation_prompt=True, tokenize=False
        )
        for ex in examples
    ]
    prompt_ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer([ex.response for ex in examples], add_special_tokens=False)[
        "input_ids"
    ]
    out: list[tuple[list[int], int]] = []
    for p, r in zip(prompt_ids, response_ids, strict=True):
        ids = (list(p) + list(r) + [end_id])[:max_len]
        out.append((ids, len(p)))
    return out


def _batches(
    cfg: TinyChatConfig,
    tokenizer: PreTrainedTokenizerFast,
    seed: int,
    *,
    p_recombine: float,
    first_epoch: int = 0,
) -> Iterator[Batch]:
    """Yield ``(input_ids, attention_mask, labels)`` batches forever, epoch after epoch from
    ``first_epoch``.

    Within each epoch, examples are grouped into length buckets (sorted inside windows of
    ``bucket_batches`` batches) and the batches are shuffled, all from ``seed``.
    """
    pad_id = tokenizer.pad_token_id
    epoch = first_epoch
    while True:
        examples = build_corpus(seed, epoch=epoch, **_corpus_args(cfg, p_recombine))
        encoded = _encode(examples, tokenizer, cfg.max_len)
        rng = random.Random(f"tinychat-batches/{seed}/{epoch}")
        window = cfg.bucket_batches * cfg.batch_size
        batches: list[list[tuple[list[int], int]]] = []
        for start in range(0, len(encoded) - cfg.batch_size + 1, window):
            chunk = sorted(encoded[start : start + window], key=lambda e: len(e[0]))
            for b in range(0, len(chunk) - cfg.batch_size + 1, cfg.batch_size):
                batches.append(chunk[b : b + cfg.batch_size])
        rng.shuffle(batches)
        for batch in batches:
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            for i, (ids, n_prompt) in enumerate(batch):
                input_ids[i, : len(ids)] = torch.tensor(ids)
                mask[i, : len(ids)] = 1
                labels[i, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
            yield input_ids, mask, labels
        epoch += 1


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
        batches = _batches(
            cfg, tokenizer, seed, p_recombine=phase.p_recombine, first_epoch=phase.first_epoch
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
    corpus = build_corpus(seed, epoch=0, **_corpus_args(cfg, cfg.p_recombine))
    tokenizer = train_tokenizer(iter_texts(corpus), vocab_size=cfg.vocab_size)
    model = train_model(cfg, tokenizer, seed=seed, progress=progress)
    return save_tiny_chat(model, tokenizer, Path(out_dir), cfg, seed)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: ``python -m safegeom.models.tinychat.build --out DIR``."""
    parser = argparse.ArgumentParser(
        prog="python -m safegeom.models.tinychat.build",
        description="Train the embedded tiny-chat model deterministically from the bundled data.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps of the base phase")
    parser.add_argument(
        "--content-steps", type=int, default=None, help="optimiser steps of the content phase"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    out = build_tiny_chat(
        args.out,
        seed=args.seed,
        steps=args.steps,
        content_steps=args.content_steps,
        progress=not args.no_progress,
    )
    print(f"saved tiny-chat to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
