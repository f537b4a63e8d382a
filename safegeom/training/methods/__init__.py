"""The training methods: one module each, registered by name in :data:`METHODS`.

:data:`METHODS` is the one place method names are written: :func:`safegeom.training.train` looks
the method up here, and ``safegeom train`` derives its choices, its ``--help`` lines and its
option groups from it. A new method is a module that builds a
:class:`~safegeom.training.methods.base.Method` and one line below (or, for a method of one's own,
``METHODS["name"] = method`` before training).
"""

from safegeom.errors import ConfigError
from safegeom.training.methods import adaptive, kl, lora, lox, r2d2, refusalguard, safe_lora, sft
from safegeom.training.methods.base import Method, Prepared, Setup, StepInputs, task_loss

__all__ = ["METHODS", "Method", "Prepared", "Setup", "StepInputs", "get_method", "task_loss"]

METHODS: dict[str, Method] = {
    "sft": sft.METHOD,
    "lora": lora.METHOD,
    "refusalguard": refusalguard.METHOD,
    "kl": kl.METHOD,
    "adaptive": adaptive.METHOD,
    "safe-lora": safe_lora.METHOD,
    "lox": lox.METHOD,
    "r2d2": r2d2.METHOD,
}
"""Every training method by the name ``safegeom train METHOD`` and ``train(method=...)`` take."""


def get_method(name: str) -> Method:
    """The method registered as ``name``.

    Raises:
        ConfigError: no such method (the message lists the registered ones).
    """
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; use one of {', '.join(METHODS)}")
    return METHODS[name]
