"""Tiny trajectories for the audit tests: perturbed full checkpoints, LoRA adapters, run folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from safegeom.training.trajectory import CheckpointRecord, Trajectory, write_trajectory


def perturbed(base: Path, dest: Path, scale: float, seed: int = 1) -> Path:
    """A full checkpoint: ``base``'s weights plus ``scale`` × Gaussian noise, saved at ``dest``."""
    model = AutoModelForCausalLM.from_pretrained(base)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(base).save_pretrained(dest)
    return dest


def adapter(base: Path, dest: Path, scale: float, seed: int = 1) -> Path:
    """A LoRA adapter on ``base`` with random non-zero weights, naming ``base`` as its base."""
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(scale * torch.randn(p.shape, generator=gen))
    peft_model.save_pretrained(dest)
    file = dest / "adapter_config.json"
    data = json.loads(file.read_text())
    data["base_model_name_or_path"] = str(base)
    file.write_text(json.dumps(data))
    return dest


def merged(adapter_dir: Path, base: Path, dest: Path) -> Path:
    """The adapter folded into its base, saved as a full checkpoint."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter_dir)
    model.merge_and_unload().save_pretrained(dest)
    AutoTokenizer.from_pretrained(base).save_pretrained(dest)
    return dest


def run_folder(root: Path, base: Path, checkpoints: dict[int, Path], task: str = "arith:8") -> Path:
    """A safegeom run folder whose manifest lists ``checkpoints`` (step → folder, copied in)."""
    records = []
    for step, folder in sorted(checkpoints.items()):
        rel = f"checkpoints/step-{step:06d}"
        shutil.copytree(folder, root / rel)
        records.append(CheckpointRecord(step=step, loss=None, path=rel))
    write_trajectory(
        Trajectory(
            root=root,
            base_model=str(base),
            base_hash="",
            config={"method": "sft", "task": task},
            checkpoints=tuple(records),
            complete=True,
        )
    )
    return root
