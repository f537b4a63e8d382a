"""safe-lora and lox runs (docs/methods.md §8): checkpoints equal the formulas, resume, bad input.

The model pair: a tiny random Llama (the "unaligned" base) and the same model with crafted
alignment updates V: ``q_proj`` gets ε·(an orthogonal matrix), so ``C = V Vᵀ/‖V‖_F ∝ I`` and
every update is its own projection (kept by Safe LoRA); ``v_proj`` a rank-1 and ``up_proj`` a
rank-2 update (a trained update is far from its projection: projected). The other projections
are unchanged (V = 0).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from safegeom.errors import ConfigError
from safegeom.models import LoadConfig, load_model
from safegeom.training.config import TrainConfig
from safegeom.training.methods.lox import LOX_FILE
from safegeom.training.methods.safe_lora import SAFE_LORA_FILE
from safegeom.training.posthoc import PosthocConfig
from safegeom.training.runner import train
from safegeom.training.trainable import RAW_ADAPTER
from safegeom.training.trajectory import Trajectory, load_trajectory
from safegeom.training.weight_space import lox_extrapolate, lox_weights, safe_lora_project
from tests.tiny_models import build_checkpoint
from tests.train_helpers import FAST, TINY, saved_weights

RUN = TrainConfig(steps=4, save_every=2, lora_dropout=0.2, **FAST)
D = torch.float64


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(aligned, unaligned)`` checkpoint folders (see the module docstring)."""
    root = tmp_path_factory.mktemp("posthoc")
    unaligned = build_checkpoint(root, "llama", n_layers=2)
    model = AutoModelForCausalLM.from_pretrained(unaligned)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.model.layers:
            q = layer.self_attn.q_proj.weight
            q += 0.05 * torch.linalg.qr(torch.randn(q.shape, generator=g))[0]
            for w, rank in ((layer.self_attn.v_proj.weight, 1), (layer.mlp.up_proj.weight, 2)):
                u = torch.randn(w.shape[0], rank, generator=g)
                w += 0.05 * u @ torch.randn(rank, w.shape[1], generator=g)
    aligned = root / "aligned"
    model.save_pretrained(aligned)
    AutoTokenizer.from_pretrained(unaligned).save_pretrained(aligned)
    return aligned, unaligned


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _lora_deltas(folder: Path) -> dict[str, torch.Tensor]:
    """``s·B A`` (float64) per base weight name of the adapter saved in ``folder``."""
    config = json.loads((folder / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    tensors = saved_weights(folder)
    out = {}
    for key in tensors:
        if key.endswith("lora_A.weight"):
            name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            b = tensors[key.replace("lora_A", "lora_B")].to(D)
            out[name] = scale * (b @ tensors[key].to(D))
    return out


@pytest.fixture(scope="module")
def safe_run(pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Trajectory:
    aligned, unaligned = pair
    out = tmp_path_factory.mktemp("safe") / "run"
    posthoc = PosthocConfig(unaligned_base=str(unaligned))
    return train(aligned, TINY, RUN, method="safe-lora", settings=posthoc, out=out)


def test_safe_lora_checkpoints_equal_the_projection(
    pair: tuple[Path, Path], safe_run: Trajectory, tmp_path: Path
) -> None:
    aligned, unaligned = pair
    w_al, w_un = _weights(aligned), _weights(unaligned)
    record = safe_run.config["defence"]
    assert record["method"] == "safe-lora" and record["unaligned_base"] == str(unaligned.resolve())
    assert record["unaligned_hash"] == load_model(unaligned).weight_hash
    assert record["safe_lora_threshold"] == 0.5 and record["n_aligned_weights"] == 6
    assert safe_run.steps == (0, 2, 4)
    kinds: set[str] = set()
    for checkpoint, path in zip(safe_run.checkpoints, safe_run.paths, strict=True):
        assert load_model(path).weight_hash == checkpoint.weight_hash
        merged = load_model(path, LoadConfig(merge_adapter=True)).model.state_dict()
        decisions = json.loads((path / SAFE_LORA_FILE).read_text())
        by_weight = {layer["weight"]: layer for layer in decisions["layers"]}
        raw = _lora_deltas(path / RAW_ADAPTER)
        assert len(raw) == len(by_weight) == 14
        for name, delta in raw.items():
            V = w_al[name].to(D) - w_un[name].to(D)
            if not V.any():
                expected, kind = delta, "no alignment update"
                assert by_weight[name]["similarity"] is None
            else:
                expected, similarity = safe_lora_project(delta, V, 0.5)
                kind = "projected" if similarity < 0.5 else "kept"
                assert by_weight[name]["similarity"] == pytest.approx(similarity, abs=1e-9)
            assert by_weight[name]["projected"] == (kind == "projected")
            kinds.add(f"{checkpoint.step}:{kind}")
            torch.testing.assert_close(
                merged[name].to(D), w_al[name].to(D) + expected, rtol=1e-5, atol=1e-7
            )
    # Step 0 (B = 0) keeps everything; the last step projects v_proj/up_proj and keeps q_proj.
    assert kinds >= {"0:kept", "4:kept", "4:projected", "4:no alignment update"}
    assert "0:projected" not in kinds
    # The training is plain LoRA: the raw adapter equals a lora run's, bit for bit.
    lora = train(aligned, TINY, RUN, method="lora", out=tmp_path / "lora")
    final = saved_weights(safe_run.paths[-1] / RAW_ADAPTER)
    assert final.keys() == saved_weights(lora.paths[-1]).keys()
    assert all(torch.equal(v, saved_weights(lora.paths[-1])[k]) for k, v in final.items())
    assert safe_run.losses == lora.losses


def test_safe_lora_resume_equals_uninterrupted(
    pair: tuple[Path, Path], safe_run: Trajectory, tmp_path: Path
) -> None:
    aligned, unaligned = pair
    posthoc = PosthocConfig(unaligned_base=str(unaligned))

    def interrupt(step: int, loss: float) -> None:
        if step == 3:
            raise KeyboardInterrupt

    kwargs = {"method": "safe-lora", "settings": posthoc, "out": tmp_path / "cut"}
    with pytest.raises(KeyboardInterrupt):
        train(aligned, TINY, RUN, callback=interrupt, **kwargs)
    assert load_trajectory(tmp_path / "cut").steps == (0, 2)
    resumed = train(aligned, TINY, RUN, resume=True, **kwargs)
    assert resumed.steps == (0, 2, 4) and resumed.complete
    for sub in (RAW_ADAPTER, "."):
        a, b = saved_weights(safe_run.paths[-1] / sub), saved_weights(resumed.paths[-1] / sub)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.checkpoints[-1].weight_hash == safe_run.checkpoints[-1].weight_hash
    assert resumed.losses == safe_run.losses
    other = PosthocConfig(unaligned_base=str(unaligned), safe_lora_threshold=0.2)
    with pytest.raises(ConfigError, match="different settings: defence"):
        train(aligned, TINY, replace(RUN, steps=6), **{**kwargs, "settings": other}, resume=True)


def test_lox_checkpoints_equal_the_extrapolation(pair: tuple[Path, Path], tmp_path: Path) -> None:
    aligned, unaligned = pair
    w_al, w_un = _weights(aligned), _weights(unaligned)
    posthoc = PosthocConfig(unaligned_base=str(unaligned), lox_rank=1, lox_alpha=0.5)
    traj = train(
        aligned,
        TINY,
        TrainConfig(steps=2, save_every=2, **FAST),
        method="lox",
        settings=posthoc,
        out=tmp_path / "lox",
    )
    record = traj.config["defence"]
    assert record["method"] == "lox" and (record["lox_rank"], record["lox_alpha"]) == (1, 0.5)
    blocks = [n for n in w_al if n.startswith("model.layers.") and w_al[n].ndim == 2]
    assert len(blocks) == 14
    for checkpoint, path in zip(traj.checkpoints, traj.paths, strict=True):
        lm = load_model(path)
        assert lm.adapter is None and lm.weight_hash == checkpoint.weight_hash
        saved = lm.model.state_dict()
        ft = load_model(path / RAW_ADAPTER, LoadConfig(merge_adapter=True)).model.state_dict()
        changed = {n for n in blocks if not torch.equal(w_al[n], w_un[n])}
        assert set(json.loads((path / LOX_FILE).read_text())["weights"]) == changed
        for name in blocks:
            a = w_al[name].to(D)
            expected = ft[name].to(D) + lox_extrapolate(a, w_un[name].to(D), 1, 0.5) - a
            torch.testing.assert_close(saved[name].to(D), expected, rtol=1e-5, atol=1e-6)
        moved = [n for n in blocks if (saved[n] - ft[n]).abs().max() > 1e-3]
        assert len(moved) == 6  # q_proj, v_proj, up_proj of both blocks
        assert all(torch.equal(saved[n], ft[n]) for n in saved if n not in blocks)
    # At step 0 the checkpoint is the paper's LoX model of the aligned one.
    names = [n for n in blocks if not torch.equal(w_al[n], w_un[n])]
    paper = lox_weights(w_al, w_un, k=1, alpha=0.5, names=names)
    step0 = load_model(traj.paths[0]).model.state_dict()
    for name, value in paper.items():
        torch.testing.assert_close(step0[name], value, rtol=1e-6, atol=1e-7)


# --- bad input --------------------------------------------------------------------------------


def _other_shape(root: Path, unaligned: Path) -> Path:
    config = AutoConfig.from_pretrained(unaligned)
    config.intermediate_size = 48
    out = root / "wide"
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(unaligned).save_pretrained(out)
    return out


def test_bad_unaligned_bases(pair: tuple[Path, Path], tmp_path: Path) -> None:
    aligned, unaligned = pair
    for method in ("safe-lora", "lox"):
        with pytest.raises(ConfigError, match=f"{method} needs --unaligned-base MODEL"):
            train(aligned, TINY, TrainConfig(**FAST), method=method, out=tmp_path / method)
    cases = [
        (
            _other_shape(tmp_path, unaligned),
            r"does not have the architecture of MODEL: model\.layers\.0\.mlp\.gate_proj\.weight is "
            r"\(48, 32\) there and \(64, 32\) in MODEL",
        ),
        (
            build_checkpoint(tmp_path, "llama", n_layers=3),
            "does not have the architecture of MODEL: it has 3 blocks, MODEL has 2",
        ),
        (aligned, "has the same weights as MODEL in every block projection"),
    ]
    for i, (other, message) in enumerate(cases):
        posthoc = PosthocConfig(unaligned_base=str(other))
        with pytest.raises(ConfigError, match=rf"--unaligned-base .*{message}"):
            train(
                aligned,
                TINY,
                TrainConfig(**FAST),
                method="lox",
                settings=posthoc,
                out=tmp_path / f"r{i}",
            )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (
            "safe_lora_threshold",
            1.5,
            r"safe_lora_threshold \(--safe-lora-threshold\) must be a "
            r"number in \[0, 1\], got 1.5",
        ),
        ("lox_rank", 0, r"lox_rank \(--lox-rank\) must be an integer ≥ 1, got 0"),
        ("lox_alpha", -1.0, r"lox_alpha \(--lox-alpha\) must be a finite number ≥ 0, got -1.0"),
        ("unaligned_base", " ", r"unaligned_base \(--unaligned-base\) must name a model"),
    ],
)
def test_config_ranges(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PosthocConfig(**{field: value})  # type: ignore[arg-type]
