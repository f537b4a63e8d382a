"""Training: supervised and LoRA fine-tuning, safety-preserving regularisers, and the tiny-chat build."""

from safegeom.train.runner import TrainConfig, default_lora_targets, train
from safegeom.train.tasks import Task, exact_match, extract_answer, get_task
from safegeom.train.trajectory import CheckpointRecord, Trajectory, load_trajectory

__all__ = [
    "CheckpointRecord",
    "Task",
    "TrainConfig",
    "Trajectory",
    "default_lora_targets",
    "exact_match",
    "extract_answer",
    "get_task",
    "load_trajectory",
    "train",
]
