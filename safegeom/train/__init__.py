"""Training: supervised and LoRA fine-tuning into checkpoint trajectories."""

from safegeom.callable_module import make_callable
from safegeom.train.config import DEFAULT_LR, RunConfig, TrainConfig
from safegeom.train.runner import default_lora_targets, train
from safegeom.train.tasks import Task, exact_match, extract_answer, get_task
from safegeom.train.trajectory import CheckpointRecord, Trajectory, load_trajectory

__all__ = [
    "DEFAULT_LR",
    "CheckpointRecord",
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

make_callable(__name__, train)  # sg.train(model, task, ...) runs train (see callable_module)
