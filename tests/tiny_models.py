"""Tiny random checkpoints across architectures, built from configs (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

CORPUS = [
    "Write a tutorial on how to make a cake.",
    "Explain how photosynthesis works in plants.",
    "Give three tips for staying healthy and happy.",
    "How do I kill a Python process on Linux?",
    "Describe the structure of an atom in simple words.",
    "I'm sorry, but I cannot help with that request.",
    "Sure, here is a short poem about the sea and the sky.",
] * 4

# Chat templates in the styles of real families: BOS inside the template, text after the
# instruction, a system turn, and a template without BOS.
LLAMA3_STYLE = (
    "{{ bos_token }}{% for m in messages %}<|start|>{{ m['role'] }}<|sep|>\n\n"
    "{{ m['content'] }}<|eot|>{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant<|sep|>\n\n{% endif %}"
)
GEMMA_STYLE = (
    "{{ bos_token }}{% for m in messages %}<|start|>"
    "{{ 'model' if m['role'] == 'assistant' else 'user' }}\n{{ m['content'] | trim }}<|eot|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|start|>model\n{% endif %}"
)
SUFFIX_STYLE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}System: {{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\nPlease answer helpfully.\n"
    "{% else %}Assistant: {{ m['content'] }}<|eot|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

ARCHS: dict[str, tuple[dict, str]] = {
    "llama": ({"model_type": "llama"}, LLAMA3_STYLE),
    "mistral": ({"model_type": "mistral"}, SUFFIX_STYLE),
    "qwen2": ({"model_type": "qwen2"}, LLAMA3_STYLE),
    "qwen3": ({"model_type": "qwen3"}, LLAMA3_STYLE),
    "gemma2": ({"model_type": "gemma2"}, GEMMA_STYLE),
    "phi3": ({"model_type": "phi3"}, SUFFIX_STYLE),
    "gpt2": ({"model_type": "gpt2"}, SUFFIX_STYLE),
    "gpt_neox": ({"model_type": "gpt_neox"}, LLAMA3_STYLE),
}

SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|start|>", "<|sep|>", "<|eot|>"]


def build_tokenizer(template: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (vocab ≤ 400) with a chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
    )
    fast.chat_template = template
    return fast


def build_checkpoint(
    root: Path, arch: str, *, n_layers: int = 3, seed: int = 0, tied: bool = False
) -> Path:
    """Save a tiny random model of ``arch`` with a chat-template tokenizer under ``root/arch``
    (``tied``: the output head shares the input embedding's weight)."""
    overrides, template = ARCHS[arch]
    tokenizer = build_tokenizer(template)
    vocab = len(tokenizer)
    config = AutoConfig.for_model(
        overrides["model_type"],
        vocab_size=vocab,
        hidden_size=32,
        n_embd=32,
        intermediate_size=64,
        num_hidden_layers=n_layers,
        n_layer=n_layers,
        num_attention_heads=4,
        n_head=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        n_positions=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Random init is small; scale it up so that layers change the residual stream visibly.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else None
    out = root / arch
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
