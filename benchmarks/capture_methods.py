"""The capture methods the benchmark compares, each a step function over the same batches."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

METHODS: dict[str, str] = {
    "forward": "plain forward (no LM head)",
    "safegeom": "safegeom capture",
    "hidden_states": "output_hidden_states + select",
    "transformer_lens": "TransformerLens bridge run_with_cache",
    "nnsight": "nnsight trace + save",
}
"""Method key → label in the table, in the order they run."""


SITE = "resid_post"


def method_batches(lm: Any, plan: Any) -> Iterator[tuple[list[int], Any, Tensor, Tensor]]:
    """``(prompt ids, batch on device, row index, position index)`` exactly as
    :func:`iter_capture` forms them (length-sorted, left-padded, same positions)."""
    from safegeom.models import collate_left

    order = sorted(range(len(plan.encoded)), key=lambda i: -len(plan.encoded[i]))
    device = lm.device
    for start in range(0, len(order), plan.batch_size):
        ids = order[start : start + plan.batch_size]
        batch = collate_left([plan.encoded[i] for i in ids], lm.tokenizer.pad_token_id)
        index = plan.positions.index(batch).to(device, non_blocking=True)
        rows = torch.arange(len(ids), device=device)[:, None]
        yield ids, batch.to(device), rows, index


def collect_output(
    lm: Any, plan: Any, batches: Iterator[tuple[Any, dict[str, Tensor]]], sink: dict[str, Tensor]
) -> Iterator[None]:
    """Gather per-batch activations into one CPU tensor as :func:`safegeom.activations.capture`
    does, one batch per step; the result lands in ``sink["out"]``."""
    pinned = lm.device.type == "cuda"
    shape = (len(plan.encoded), len(plan.layers), plan.positions.n_positions, lm.d_model)
    out = torch.empty(shape, dtype=plan.dtype, pin_memory=pinned)
    filled = 0
    for ids, acts in batches:
        out[filled : filled + len(ids)].copy_(acts[SITE], non_blocking=pinned)
        filled += len(ids)
        yield
    sink["out"] = out


Steps = Callable[[Any, dict[str, Tensor]], Iterator[None]]
"""``steps(plan, sink)``: one pass over the plan, one batch per ``next()``."""


def make_method(name: str, lm: Any) -> Steps:
    """The step function of method ``name``; its one-off set-up (wrapping the model) is done here.

    Raises:
        ImportError: the library behind the method is not installed.
    """
    decoder = lm.base.model

    if name == "forward":

        def forward(plan: Any, sink: dict[str, Tensor]) -> Iterator[None]:
            for _, batch, _, _ in method_batches(lm, plan):
                with torch.inference_mode():
                    decoder(
                        input_ids=batch.input_ids,
                        attention_mask=batch.attention_mask,
                        position_ids=batch.position_ids,
                        use_cache=False,
                    )
                yield

        return forward

    if name == "safegeom":
        from safegeom.activations import iter_capture

        return lambda plan, sink: collect_output(
            lm, plan, iter_capture(lm, plan, progress=False), sink
        )

    if name == "hidden_states":

        def hidden_batches(plan: Any) -> Iterator[tuple[Any, dict[str, Tensor]]]:
            for ids, batch, rows, index in method_batches(lm, plan):
                with torch.inference_mode():
                    out = decoder(
                        input_ids=batch.input_ids,
                        attention_mask=batch.attention_mask,
                        position_ids=batch.position_ids,
                        use_cache=False,
                        output_hidden_states=True,
                    )
                    # hidden_states[l + 1] is the output of block l (the last one after the
                    # final norm in transformers 5: the same cost; see the check column).
                    states = [out.hidden_states[layer + 1] for layer in plan.layers]
                    picked = torch.stack([h[rows, index] for h in states], dim=1)
                    del out, states
                yield ids, {SITE: picked.to(plan.dtype)}

        return lambda plan, sink: collect_output(lm, plan, hidden_batches(plan), sink)

    if name == "transformer_lens":
        import dataclasses

        from safegeom.activations import iter_capture
        from safegeom.activations.transformer_lens import transformer_lens_bridge

        transformer_lens_bridge(lm)  # build (and cache) the bridge outside the timings
        return lambda plan, sink: collect_output(
            lm,
            plan,
            iter_capture(lm, dataclasses.replace(plan, backend="transformer_lens"), progress=False),
            sink,
        )

    if name == "nnsight":
        from nnsight import NNsight

        traced = NNsight(decoder)

        def nnsight_batches(plan: Any) -> Iterator[tuple[Any, dict[str, Tensor]]]:
            for ids, batch, rows, index in method_batches(lm, plan):
                saved: list[Any] = []
                with torch.inference_mode():
                    with traced.trace(
                        input_ids=batch.input_ids,
                        attention_mask=batch.attention_mask,
                        position_ids=batch.position_ids,
                        use_cache=False,
                    ):
                        for layer in plan.layers:
                            saved.append(traced.layers[layer].output[rows, index].save())
                    picked = torch.stack(list(saved), dim=1).to(plan.dtype)
                yield ids, {SITE: picked}

        return lambda plan, sink: collect_output(lm, plan, nnsight_batches(plan), sink)

    raise ValueError(f"unknown method {name!r}: use {', '.join(METHODS)}")


def sync_device(lm: Any) -> None:
    if lm.device.type == "cuda":
        torch.cuda.synchronize(lm.device)


def bundled_model(preset: Any) -> Any:
    """``preset.model`` as :func:`safegeom.models.load_model` loads it (a bundled model: nothing
    is downloaded), in eval mode.

    Raises:
        ValueError: the model's shape is not the one the preset states.
    """
    from safegeom.models import LoadConfig, load_model

    load = LoadConfig(dtype=preset.dtype, device=preset.device, merge_adapter=preset.merge_adapter)
    lm = load_model(preset.model, load)
    c = lm.base.config
    shape = (
        c.hidden_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.intermediate_size,
        c.vocab_size,
    )
    stated = (
        preset.hidden,
        preset.layers,
        preset.heads,
        preset.kv_heads,
        preset.intermediate,
        preset.vocab,
    )
    if shape != stated:
        raise ValueError(f"{preset.model} has shape {shape}, the preset states {stated}")
    return lm


def build_model_and_plan(preset: Any) -> Any:
    """The preset's :class:`LoadedModel` (random-weight Llama built without downloads, or the
    bundled ``preset.model``) and the capture plan (random-id prompts)."""
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    from safegeom.models import LAYOUTS, LoadedModel

    dtype = getattr(torch, preset.dtype)
    if preset.model:
        lm = bundled_model(preset)
        return lm, random_prompt_plan(lm, preset)
    config = LlamaConfig(
        hidden_size=preset.hidden,
        num_hidden_layers=preset.layers,
        num_attention_heads=preset.heads,
        num_key_value_heads=preset.kv_heads,
        intermediate_size=preset.intermediate,
        vocab_size=preset.vocab,
        max_position_embeddings=max(2048, preset.seq_len),
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(preset.device):  # parameters are created (and initialised) in place
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    vocab = {"<pad>": 0, "<unk>": 1}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        pad_token="<pad>",
        unk_token="<unk>",
    )
    lm = LoadedModel(
        model=model, tokenizer=tokenizer, name="bench", source="random", layout=LAYOUTS["llama"]
    )
    return lm, random_prompt_plan(lm, preset)


def random_prompt_plan(lm: Any, preset: Any) -> Any:
    """The capture plan: ``preset.n_prompts`` prompts of ``preset.seq_len`` random token ids
    (ids 2 and up, below ``preset.vocab``), ``resid_post`` at every layer, the last
    ``preset.n_positions`` tokens.

    Returns:
        The :class:`~safegeom.activations.CapturePlan`.
    """
    from safegeom.activations import CapturePlan
    from safegeom.models import EncodedPrompt, plan_positions
    from safegeom.models.chat import EncodedSet

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(2, preset.vocab, (preset.n_prompts, preset.seq_len), generator=generator)
    # The "instruction" ends n_positions + 1 tokens before the end, so t_post = the last 5 tokens.
    t_inst = preset.seq_len - preset.n_positions - 1
    encoded = tuple(
        EncodedPrompt(input_ids=tuple(row.tolist()), t_inst=t_inst, inst_start=0) for row in ids
    )
    prompts = EncodedSet(
        prompts=tuple(f"p{i}" for i in range(len(encoded))),
        encoded=encoded,
        system=None,
        template_hash="",
        name="random",
    )
    plan = CapturePlan(
        prompts=prompts,
        encoded=encoded,
        sites=(SITE,),
        layers=tuple(range(preset.layers)),
        positions=plan_positions("t_post", encoded),
        dtype=getattr(torch, preset.dtype),
        batch_size=preset.batch_size,
        system=None,
    )
    return plan
