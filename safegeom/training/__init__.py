"""Training: fine-tuning with a training method (:mod:`safegeom.training.methods`) into checkpoint
trajectories."""

from safegeom.training.config import DEFAULT_LR, RunConfig, TrainConfig
from safegeom.training.methods import METHODS, Method
from safegeom.training.runner import train
from safegeom.training.tasks import Task, exact_match, extract_answer, get_task
from safegeom.training.trainable import default_lora_targets
from safegeom.training.trajectory import CheckpointRecord, Trajectory, load_trajectory

__all__ = [
    "DEFAULT_LR",
    "METHODS",
    "CheckpointRecord",
    "Method",
    "RunConfig",
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
