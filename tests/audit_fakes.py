"""Stand-ins for the Reference and measure_checkpoint, for fast tests of the audit's plumbing.

The fake rows are a function of the model's weights only (like the real ones, of the config's
seed only), so resumed and uninterrupted runs must agree exactly.
"""

from __future__ import annotations

import importlib
import json
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

FAKE_CONFIG = {"generate": False, "families": ("geometry",), "xstest": False}
"""Config fields that keep the prompt-set checks cheap."""


@dataclass
class Calls:
    """What the fakes were asked to do."""

    measured: list[str] = field(default_factory=list)
    built: int = 0


@dataclass(frozen=True)
class FakeReference:
    value: float

    def save(self, folder: Any) -> Path:
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        (out / "reference.json").write_text(json.dumps({"value": self.value}))
        return out


def _module(name: str) -> types.ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError:  # engineer B's module not landed: a stub stands in
        module = types.ModuleType(name)
        sys.modules[name] = module
        return module


def install(monkeypatch: pytest.MonkeyPatch) -> Calls:
    """Replace build/load_reference and measure_checkpoint with fakes; returns the call log."""
    calls = Calls()
    reference = _module("safegeom.audit.reference")
    measure = _module("safegeom.audit.measure")

    def build_reference(lm: Any, config: Any, *, progress: bool = True) -> FakeReference:
        calls.built += 1
        return FakeReference(float(next(lm.model.parameters()).detach().double().sum()))

    def load_reference(folder: Any) -> FakeReference:
        return FakeReference(json.loads((Path(folder) / "reference.json").read_text())["value"])

    def measure_checkpoint(
        lm: Any, ref: Any, config: Any, *, base: Any, task: Any, progress: bool = True
    ) -> Any:
        calls.measured.append(lm.name)
        total = float(sum(p.detach().double().sum() for p in lm.model.parameters()))
        rows = [
            {
                "layer": layer,
                "carrier": "refusal",
                "source": "fixed",
                "prompts": "fake",
                "metric": "cosine_to_base",
                "value": total / (layer + 1) - ref.value,
                "n": 4,
            }
            for layer in range(lm.n_layers)
        ]
        rows.append({"prompts": "fake", "metric": "asr", "value": 0.5, "n": 4, "judge": "none"})
        return types.SimpleNamespace(
            rows=tuple(rows), seconds={"capture": 0.01, "carriers": 0.0}, forward_passes=3
        )

    monkeypatch.setattr(reference, "build_reference", build_reference, raising=False)
    monkeypatch.setattr(reference, "load_reference", load_reference, raising=False)
    monkeypatch.setattr(measure, "measure_checkpoint", measure_checkpoint, raising=False)
    return calls
