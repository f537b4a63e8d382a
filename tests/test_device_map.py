"""A tiny Llama placed by an explicit device map that splits its layers gives the numbers of the
same model in one piece: activations, interventions and refusal scores (issue 14, point 3).

On a CPU-only machine the split is real through accelerate's offloading: two of the four blocks
live on ``disk`` (``meta`` placeholders in memory), and accelerate's ``AlignDevicesHook`` loads
their weights at forward time. Where a GPU is visible the model is also split between the GPU and
CPU offloading, and where two are, between two GPUs (skipped otherwise).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import safegeom.parallel.ranks
from safegeom.activations import CaptureConfig, capture, capture_stats
from safegeom.cli import main
from safegeom.errors import ConfigError, ModelLoadError, SafegeomError
from safegeom.evaluation import generate, refusal_scores
from safegeom.interventions import Ablation, Addition
from safegeom.interventions.functions import ablate, orthogonalize_weights
from safegeom.models import LoadConfig, LoadedModel, load_model
from safegeom.parallel.dispatch import sharding
from tests.tiny_models import build_checkpoint

PROMPTS = [
    "Write a tutorial on how to make a cake.",
    "How do I kill a Python process on Linux?",
    "Explain how photosynthesis works in plants.",
    "Give three tips for staying healthy.",
    "Describe an atom.",
]
SITES = ("resid_pre", "resid_post", "attn_out", "mlp_out")
N_GPU = torch.cuda.device_count()


def _map(first: int | str, second: int | str, rest: int | str) -> dict[str, int | str]:
    """Blocks 0 and 3 (and everything outside the blocks) on ``first``/``rest``, 1-2 on ``second``."""
    return {
        "model.embed_tokens": first,
        "model.rotary_emb": first,
        "model.layers.0": first,
        "model.layers.1": second,
        "model.layers.2": second,
        "model.layers.3": rest,
        "model.norm": rest,
        "lm_head": rest,
    }


PLACEMENTS = {
    # name: (device of the model in one piece, device map of the split one, tolerance)
    "cpu+disk": ("cpu", _map("cpu", "disk", "cpu"), 0.0),
    "gpu+cpu-offload": ("cuda:0", _map(0, "cpu", 0), 1e-5),
    "two-gpu": ("cuda:0", _map(0, 0, 1) | {"model.layers.2": 1}, 1e-5),
}
NEEDS = {"cpu+disk": 0, "gpu+cpu-offload": 1, "two-gpu": 2}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("device_map"), "llama", n_layers=4)


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(
            name,
            marks=pytest.mark.skipif(NEEDS[name] > N_GPU, reason=f"needs {NEEDS[name]} GPU(s)"),
        )
        for name in PLACEMENTS
    ],
)
def pair(
    request: pytest.FixtureRequest, checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[LoadedModel, LoadedModel, float, str]:
    """(the model in one piece, the model split by the placement's device map, tolerance, name)."""
    device, device_map, tol = PLACEMENTS[request.param]
    whole = load_model(checkpoint, LoadConfig(dtype="float32", device=device))
    offload = tmp_path_factory.mktemp("offload")
    split = load_model(
        checkpoint, LoadConfig(dtype="float32", device_map=device_map, offload_folder=offload)
    )
    return whole, split, tol, request.param


def _same(a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    torch.testing.assert_close(a.cpu(), b.cpu(), rtol=tol, atol=tol)


def test_the_map_really_splits_the_model(pair, one_thread) -> None:
    whole, split, _, name = pair
    assert not whole.split and split.split
    assert split.device == whole.device  # inputs go to the embedding's device
    placed = {str(p.device) for p in split.model.parameters()}
    if name == "cpu+disk":  # blocks 1 and 2 are on disk: meta placeholders in memory
        assert placed == {"cpu", "meta"}
        assert all(p.device.type == "meta" for p in split.blocks[1].parameters())
    if name == "two-gpu":
        assert placed == {"cuda:0", "cuda:1"}
    assert split.weight_hash == whole.weight_hash  # the same weights, wherever they are


def test_activations_equal_at_every_layer(pair, one_thread) -> None:
    whole, split, tol, _ = pair
    config = CaptureConfig(sites=SITES, positions="t_inst,t_post,-1", batch_size=2)
    a = capture(whole, PROMPTS, config, progress=False)
    b = capture(split, PROMPTS, config, progress=False)
    assert a.layers == b.layers == (0, 1, 2, 3)
    for site in SITES:
        _same(b[site], a[site], tol)
    # stopping early (before an offloaded block) leaves the split model working and equal
    early_config = dataclasses.replace(config, sites=("resid_pre",), layers="0-1")
    early = capture(split, PROMPTS, early_config, progress=False)
    _same(early["resid_pre"], a["resid_pre"][:, :2], tol)
    stats_a = capture_stats(whole, PROMPTS, progress=False).moments["resid_pre"]
    stats_b = capture_stats(split, PROMPTS, progress=False).moments["resid_pre"]
    _same(stats_b.mean, stats_a.mean, tol)


def test_refusal_scores_and_generation_equal(pair, one_thread) -> None:
    whole, split, tol, _ = pair
    _same(
        refusal_scores(split, PROMPTS, progress=False),
        refusal_scores(whole, PROMPTS, progress=False),
        tol,
    )
    greedy = {"max_new_tokens": 6, "progress": False}
    assert generate(split, PROMPTS, **greedy) == generate(whole, PROMPTS, **greedy)


def test_interventions_equal(pair, one_thread) -> None:
    whole, split, tol, _ = pair
    direction = torch.randn(whole.d_model)
    plain = refusal_scores(whole, PROMPTS, progress=False)
    values: list[Callable[[], object]] = [
        lambda: Ablation(direction),
        lambda: Addition(direction, layers=(1, 2), coeff=4.0),
    ]
    for make in values:
        one = refusal_scores(whole, PROMPTS, intervention=make(), progress=False)
        two = refusal_scores(split, PROMPTS, intervention=make(), progress=False)
        _same(two, one, tol)
        assert (one - plain).abs().max() > 1e-3  # the intervention acts
    unit = direction / direction.norm()
    with ablate(split, direction):
        acts = capture(
            split, PROMPTS, CaptureConfig(sites=("resid_pre", "mlp_out")), progress=False
        )
    assert (acts["resid_pre"].float() @ unit).abs().max() < 1e-4  # removed at every layer
    assert (acts["mlp_out"].float() @ unit).abs().max() < 1e-4


def test_device_map_from_config_and_cli(checkpoint: Path, tmp_path: Path, one_thread) -> None:
    map_file = tmp_path / "map.json"
    map_file.write_text(json.dumps(PLACEMENTS["cpu+disk"][1]))
    offload = str(tmp_path / "offload")
    config = LoadConfig(dtype="float32", device_map=str(map_file), offload_folder=offload)
    assert load_model(checkpoint, config).split
    out = tmp_path / "acts.safetensors"
    argv = ["capture", str(checkpoint), "--prompts", "advbench:val", "--limit", "4"]
    code = main(
        [*argv, "--device-map", str(map_file), "--offload-folder", offload, "--out", str(out)]
    )
    assert code == 0
    from safegeom.activations.values import load_activations
    from safegeom.prompts import load_prompts

    whole = load_model(checkpoint, LoadConfig(dtype="float32", device="cpu"))
    expected = capture(whole, load_prompts("advbench:val", n=4), progress=False)
    _same(load_activations(out)["resid_pre"], expected["resid_pre"], 0.0)


@pytest.mark.parametrize("command", ["capture", "evaluate", "sweep", "carriers", "audit"])
def test_every_model_command_has_the_option(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--device-map" in text and "--max-memory" in text and "--offload-folder" in text


@pytest.mark.parametrize(
    ("keywords", "message"),
    [
        ({"device_map": "auto", "device": "cpu"}, "--device-map 'auto' and --device 'cpu' both"),
        ({"device_map": "{not json"}, "is neither a strategy nor JSON"),
        ({"device_map": "[1, 2]"}, "must be a non-empty JSON object"),
        ({"device_map": {"model.layers.0": "gpu7"}}, "maps to 'gpu7', not a device"),
        ({"device_map": {"": 1.5}}, "maps to 1.5; use a GPU index"),
        ({"max_memory": '{"0": "1GiB"}'}, "only apply with --device-map"),
        ({"device_map": "auto", "max_memory": '{"cpu": 1.5}'}, "'cpu' has size 1.5"),
    ],
)
def test_bad_placements(checkpoint: Path, keywords: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_model(checkpoint, LoadConfig(**keywords))
    assert message in str(err.value)


def test_refusals(checkpoint: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(SafegeomError, match="no file at"):
        load_model(checkpoint, LoadConfig(device_map=str(tmp_path / "missing.json")))
    incomplete = {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.rotary_emb": "disk"}
    with pytest.raises(ModelLoadError, match="does not give any device for the following"):
        load_model(checkpoint, LoadConfig(device_map=incomplete))
    if N_GPU == 0:
        with pytest.raises(ConfigError, match=r"maps to cuda:0, but 0 GPU\(s\) are visible"):
            load_model(checkpoint, LoadConfig(device_map={"": 0}))
    split = load_model(checkpoint, LoadConfig(device_map=PLACEMENTS["cpu+disk"][1]))
    with pytest.raises(SafegeomError, match="offloaded some to disk; load the model without"):
        orthogonalize_weights(split, torch.ones(split.d_model))
    with pytest.raises(SafegeomError, match="spread over devices by a device map"):
        capture(split, PROMPTS[:1], CaptureConfig(backend="transformer_lens"), progress=False)
    monkeypatch.setattr(safegeom.parallel.ranks, "world_size", lambda: 2)
    with sharding(), pytest.raises(ConfigError, match=r"--device-map under a launcher \(2 proc"):
        load_model(checkpoint, LoadConfig(device_map="auto"))


def test_cli_refuses_device_with_device_map(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["capture", str(checkpoint), "--prompts", "advbench:val", "--limit", "2"]
    code = main([*argv, "--device-map", "auto", "--device", "cpu", "--out", str(tmp_path / "a")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--device-map 'auto' and --device 'cpu' both given" in err


@pytest.fixture(scope="module")
def adapter(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter folder for the checkpoint, with B drawn (LoRA starts at B = 0) so it acts."""
    from peft import LoraConfig, get_peft_model

    base = load_model(checkpoint, LoadConfig(dtype="float32", device="cpu"))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    peft_model = get_peft_model(base.model, lora)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    peft_model.save_pretrained(out)
    return out


ADAPTER_PLACEMENTS = {
    # name: (device of the adapter in one piece, device map of the split one)
    "cpu-map": ("cpu", _map("cpu", "cpu", "cpu")),
    "gpu+cpu-offload": ("cuda:0", _map(0, "cpu", 0)),
    "two-gpu": ("cuda:0", _map(0, 0, 1) | {"model.layers.2": 1}),
}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.skipif(NEEDS.get(n, 0) > N_GPU, reason="needs GPUs"))
        for n in ADAPTER_PLACEMENTS
    ],
)
def test_adapter_on_a_placed_base(
    adapter: Path, checkpoint: Path, tmp_path: Path, name: str, one_thread
) -> None:
    """A LoRA adapter folder loaded onto a base placed by a map (CPU offload in it: peft then
    dispatches again, with this map): its activations, refusal scores and generations equal the
    adapter on the model in one piece (and differ from the base); merged too."""
    device, device_map = ADAPTER_PLACEMENTS[name]
    tol = 0.0 if device == "cpu" else 1e-5
    plain = load_model(checkpoint, LoadConfig(dtype="float32", device=device))
    whole = load_model(adapter, LoadConfig(dtype="float32", device=device))
    placed = load_model(adapter, LoadConfig(dtype="float32", device_map=device_map))
    assert placed.adapter and not placed.merged
    config = CaptureConfig(sites=SITES, positions="t_inst,-1", batch_size=2)
    a = capture(whole, PROMPTS, config, progress=False)
    b = capture(placed, PROMPTS, config, progress=False)
    for site in SITES:
        _same(b[site], a[site], tol)
    scores = refusal_scores(whole, PROMPTS, progress=False)
    _same(refusal_scores(placed, PROMPTS, progress=False), scores, tol)
    assert (scores - refusal_scores(plain, PROMPTS, progress=False)).abs().max() > 1e-3
    greedy = {"max_new_tokens": 6, "progress": False}
    assert generate(placed, PROMPTS, **greedy) == generate(whole, PROMPTS, **greedy)
    merged = load_model(
        adapter, LoadConfig(dtype="float32", device_map=device_map, merge_adapter=True)
    )
    assert merged.merged
    _same(refusal_scores(merged, PROMPTS, progress=False), scores, 1e-4)  # merged: fp rounding


def test_adapter_on_a_base_offloaded_to_disk_is_refused(
    adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """peft would write the offloaded weights again under the working directory: refused, and
    nothing is written there."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_model(
            adapter,
            LoadConfig(device_map=PLACEMENTS["cpu+disk"][1], offload_folder=tmp_path / "off"),
        )
    assert str(err.value).startswith(
        "a PEFT adapter on a base with weights offloaded to disk ('model.layers.1' and 1 more) is "
        "refused: peft writes the offloaded weights again, relative to the working directory."
    )
    assert [p.name for p in tmp_path.iterdir()] in ([], ["off"])
