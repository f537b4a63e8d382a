"""What a training method updates, and how its checkpoints are written and read back.

:class:`Trainable` holds the module whose parameters the optimizer moves and writes checkpoints
that :func:`safegeom.models.load_model` reads as a model. A method
(:mod:`safegeom.training.methods`) trains one of three forms:

- ``full``: every weight of the model; a checkpoint is a full model folder;
- ``lora``: PEFT LoRA adapters; a checkpoint is an adapter folder that names its base (or, with
  an ``export``, the transformed model the export writes);
- ``reft``: a cone-projected edit (:class:`~safegeom.models.reft.ReftEdit`, RefusalGuard's), the
  base frozen; a checkpoint is ``refusalguard.safetensors`` + ``refusalguard.json`` naming the
  base.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from safegeom.errors import ArtifactError, ConfigError, ModelLoadError
from safegeom.models import TINY_CHAT, LoadConfig, LoadedModel, load_model, weight_hash
from safegeom.models.layout import resolve
from safegeom.models.reft import ReftConfig, ReftEdit, load_reft

__all__ = [
    "Export",
    "FullWeights",
    "Trainable",
    "Update",
    "base_spec",
    "default_lora_targets",
    "wrap_model",
]

Update = Literal["full", "lora", "reft"]
"""What a method trains: every weight, LoRA adapters, or a ReFT edit."""
Export = Callable[[nn.Module, Path], str]
"""Writes a checkpoint's transformed model into a folder and returns its weight hash."""
RAW_ADAPTER = "raw_adapter"
"""Sub-folder of a Safe LoRA / LoX checkpoint holding the adapter as trained (for resuming)."""


def default_lora_targets(lm: LoadedModel) -> tuple[str, ...]:
    """Return the names of every linear (or GPT-2 ``Conv1D``) projection inside a decoder block.

    For Llama: ``q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj``.
    """
    block = resolve(lm.base, lm.layout.blocks)[0]
    names: list[str] = []
    for name, module in block.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, (torch.nn.Linear, Conv1D)) and leaf not in names:
            names.append(leaf)
    if not names:
        raise ModelLoadError(f"no linear projections found in a {lm.model_type} block for LoRA")
    return tuple(names)


def _check_lora_targets(model: nn.Module, targets: Any) -> None:
    """Refuse a LoRA target that names no module of ``model`` (PEFT matches a name or a name's
    last dotted parts)."""
    if not isinstance(targets, (list, set, tuple)):
        return
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        leaves = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m)}
        linear = sorted(leaves - {"lm_head"})
        raise ConfigError(
            f"--lora-targets {', '.join(missing)}: the model has no module of that name; its "
            f"linear layers are {', '.join(linear)}"
        )


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def base_spec(spec: str | Path) -> str:
    """The MODEL spec as recorded: tiny-chat and hub ids as given, local folders made absolute."""
    text = str(spec)
    path = Path(text).expanduser()
    return text if text == TINY_CHAT or not path.is_dir() else str(path.resolve())


@dataclass
class Trainable:
    """The model being trained, the module holding its trainable parameters, and how it saves."""

    lm: LoadedModel
    """The loaded model (with the edit attached for ``reft``)."""
    module: nn.Module
    """What accelerate prepares: the model, the PEFT model, or the edit."""
    update: Update
    """``full``, ``lora`` or ``reft``."""
    base: str
    """The base spec a ``lora``/``reft`` checkpoint names."""
    edit: ReftEdit | None = None
    """The RefusalGuard edit (``reft`` only)."""
    export: Export | None = None
    """``lora`` only: writes the checkpoint's model transformed (Safe LoRA, LoX) into a folder and
    returns its weight hash, leaving the trained adapter as it is; the raw adapter is then saved in
    ``raw_adapter/`` for resuming."""
    sharded: bool = False
    """``full`` only: the weights are sharded over the ranks by FSDP (:mod:`safegeom.parallel.fsdp`);
    a checkpoint is written from the gathered weights."""
    sidecar: Callable[[Path], None] | None = None
    """Writes the method's own training state (R2D2's pool of test cases) into every checkpoint
    folder beside the weights; the method reads it back when it resumes from that folder."""

    @property
    def model(self) -> nn.Module:
        """The module whose forward computes the logits (the PEFT model, or the model itself)."""
        return self.module if self.update == "lora" else self.lm.model

    def logits(
        self, input_ids: Tensor, attention_mask: Tensor, prompt_lengths: Sequence[int]
    ) -> Tensor:
        """The trained model's logits on a right-padded batch whose rows have ``prompt_lengths``
        prompt tokens (where a ``reft`` edit acts)."""
        edit = self.edit
        with edit.prompt_lengths(list(prompt_lengths)) if edit else nullcontext():
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits

    def parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer updates."""
        return [p for p in self.module.parameters() if p.requires_grad]

    def save(
        self,
        folder: Path,
        module: nn.Module | None = None,
        state: dict[str, torch.Tensor] | None = None,
    ) -> str:
        """Write a checkpoint loadable by ``load_model(folder)``; return its weight hash.

        ``module`` is the unwrapped module (default: :attr:`module`); ``state`` (``full`` only)
        the weights to write instead of its own: the gathered weights of a sharded model.
        """
        module = module or self.module
        if state is not None:
            module.save_pretrained(folder, state_dict=state)  # type: ignore[operator]
            self.lm.tokenizer.save_pretrained(folder)
            return weight_hash(FullWeights(state))
        if self.update == "reft":
            assert self.edit is not None
            self.edit.save(folder, base=self.base)
            return self.edit.weight_hash()
        # LoRA never adapts embeddings; "auto" would look the base model up on the hub.
        peft = {"save_embedding_layers": False} if self.update == "lora" else {}
        if self.export is not None:
            module.save_pretrained(folder / RAW_ADAPTER, **peft)  # type: ignore[operator]
            digest = self.export(module, folder)
            self.lm.tokenizer.save_pretrained(folder)
            return digest
        module.save_pretrained(folder, **peft)  # type: ignore[operator]
        self.lm.tokenizer.save_pretrained(folder)
        return weight_hash(module)

    def restore(self, folder: Path) -> None:
        """Load the trainable state saved in the checkpoint ``folder`` (``lora`` and ``reft``)."""
        device = str(self.lm.device)
        if self.update == "reft":
            assert self.edit is not None
            saved = load_reft(folder, device=device)
            self.edit.load_state_dict(saved.state_dict())
            return
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        source = folder / RAW_ADAPTER if (folder / RAW_ADAPTER).is_dir() else folder
        weights = load_file(str(source / "adapter_model.safetensors"), device=device)
        result = set_peft_model_state_dict(self.module, weights)
        if getattr(result, "unexpected_keys", None):
            raise ArtifactError(f"{folder} holds an adapter that does not fit this model")


def wrap_model(
    lm: LoadedModel,
    spec: str | Path,
    update: Update,
    settings: Mapping[str, Any],
    *,
    dtype: str,
    resume_from: Path | None,
    bases: Mapping[int, torch.Tensor] | None = None,
    export: Export | None = None,
) -> Trainable:
    """Make ``lm`` trainable as ``update`` says (restoring ``resume_from`` when resuming).

    ``settings`` holds the run config's ``lora_*`` keys (``lora``) or the ReFT layers, rank and
    positions (``reft``: ``layers``, ``rank``, ``first_k``, ``last_k``, ``edit_generated``,
    ``seed``); ``bases`` the
    per-layer cone bases of the edit; ``export`` the Safe LoRA / LoX transform (``lora``).
    """
    base = base_spec(spec)
    if update == "full":
        if resume_from is not None:
            lm = load_model(resume_from, LoadConfig(dtype=dtype, device=str(lm.device)))
        lm.model.requires_grad_(True)
        return Trainable(lm, lm.model, "full", base)
    lm.model.requires_grad_(False)
    if update == "reft":
        config = ReftConfig(
            layers=tuple(settings["layers"]),
            rank=int(settings["rank"]),
            first_k=int(settings["first_k"]),
            last_k=int(settings["last_k"]),
            edit_generated=bool(settings.get("edit_generated", False)),
        )
        edit = ReftEdit.for_model(lm, config, dict(bases or {}), seed=int(settings["seed"]))
        edit.attach(lm)
        trainable = Trainable(lm, edit, "reft", base, edit=edit)
    else:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=int(settings.get("lora_r") or 8),
            lora_alpha=float(settings.get("lora_alpha") or 16),
            lora_dropout=float(settings.get("lora_dropout") or 0.0),
            target_modules=list(settings.get("lora_targets") or ()),
            task_type="CAUSAL_LM",
        )
        _check_lora_targets(lm.model, lora.target_modules)
        model = get_peft_model(lm.model, lora)
        model.peft_config["default"].base_model_name_or_path = base
        trainable = Trainable(lm, model, "lora", base, export=export)
    if resume_from is not None:
        trainable.restore(resume_from)
    return trainable


class FullWeights(nn.Module):
    """A module standing for gathered weights (:func:`safegeom.parallel.fsdp.full_state`): its
    ``state_dict`` is them, so :func:`safegeom.models.weight_hash` hashes them as it hashes the
    unsharded model."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        """Hold ``state`` (names to full tensors)."""
        super().__init__()
        self._state = state

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """The gathered weights, by name."""
        return dict(self._state)
