"""Training: fine-tuning with a training method (:mod:`safegeom.train.methods`) into checkpoint
trajectories."""

from safegeom.callable_module import make_callable
from safegeom.train.config import DEFAULT_LR, RunConfig, TrainConfig
from safegeom.train.methods import METHODS, Method
from safegeom.train.runner import train
from safegeom.train.tasks import Task, exact_match, extract_answer, get_task
from safegeom.train.trajectory import CheckpointRecord, Trajectory, load_trajectory
from safegeom.train.wrap import default_lora_targets

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

make_callable(__name__, train)  # sg.train(model, task, ...) runs train (see callable_module)
