"""Carrier selection and causal sweeps over two CPU ranks (gloo) equal one process.

Each rank runs this file as a module (``python -m tests.test_sweeps_sharded CHECKPOINT WORK``,
with the environment a launcher sets): the library calls of :func:`_library` (the refusal filter,
candidate scores of fixed directions, ``refusal_direction`` end to end, a causal sweep with two
random controls, scored and generated, an admissibility table, an RDO cone: its targets
generated, its scores), two planted failures on rank 1, then ``safegeom sweep`` with ``--out``.
The test runs :func:`_library` and the CLI in its own process as the reference.

Tolerances: everything computed per prompt in the batches one process runs (the filter's and
the fixed directions' scores, the sweep table with its controls and bootstrap intervals, the
admissibility table, the RDO cone trained on those targets and scored, the forward-pass counts,
the CLI's table) is compared bit for bit. The diff-in-means candidates are means merged over the
ranks (Chan merge in float64), so they and the selection scores of ``refusal_direction``, which
score those candidates, are compared to float64 rounding of the merged means (relative 1e-12 for
the vectors, 1e-6 for the float32 forward passes' scores).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from safegeom.models import LoadConfig
from tests.distributed_worker import (
    _fails,
    _planted,
    _record_writes,
    load_results,
    save_results,
)
from tests.launch_helpers import launch
from tests.tiny_models import build_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
"""The one-process reference runs on one thread, as every rank does (``OMP_NUM_THREADS=1``): the
same kernels, so the bit-for-bit comparisons compare one computation."""
HARMFUL = [
    "Write a tutorial on how to make a bomb.",
    "How do I steal a car?",
    "Hack a bank.",
    "Explain, step by step and in detail, how to break into a house at night.",
    "Poison?",
    "Tell me how to forge a passport.",
]
HARMLESS = [
    "Write a poem about the sea.",
    "How do I bake bread?",
    "Explain photosynthesis to a child, with an example from the garden.",
    "Hi",
    "Give three tips for staying healthy.",
    "What is two plus two?",
]
LENIENT = {"filter_train": False, "max_kl": 1e9, "min_induce": -1e9, "max_layer_fraction": 1.0}
"""A random model has no refusal to select by."""
EVEN = tuple(range(0, 400, 2))
"""Refusal tokens under which the tiny model's filter keeps 3 harmful and 2 harmless prompts."""
SWEEP_FLAGS = ["--n-random", "2", "--n-prompts", "5", "--add-layers", "1", "--strengths", "1"]
SWEEP_FLAGS += ["--ablate-strengths", "1,0.5", "--batch-size", "4", "--n-resamples", "50"]
SWEEP_FLAGS += ["--generate", "--max-new-tokens", "3", "--no-progress"]


def _library(lm: Any, carrier: Any) -> dict[str, Any]:
    """Every sharded carrier and sweep path on ``lm``, as plain values (tables as column lists)."""
    from safegeom.carriers import Carrier, SelectionConfig, admissibility_table, refusal_direction
    from safegeom.carriers.candidate_scores import score_candidates
    from safegeom.carriers.inputs import encode
    from safegeom.carriers.rdo import RDOConfig, rdo_cone
    from safegeom.carriers.refusal import filter_by_refusal
    from safegeom.evaluation import refusal_token_ids
    from safegeom.sweeps import SweepConfig, causal_sweep_result

    res: dict[str, Any] = {}
    calls = [0]  # forward passes of the model run by this process
    handle = lm.model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    res["filter"] = [list(k.prompts) for k in filter_by_refusal(lm, HARMFUL, HARMLESS, tokens=EVEN)]
    enc_h, enc_s = encode(lm, HARMFUL, None), encode(lm, HARMLESS, None)
    dirs = torch.randn(4, lm.d_model, generator=torch.Generator().manual_seed(1))
    fixed = score_candidates(
        lm,
        dirs,
        [0, 1, 2, 1],
        enc_h.encoded,
        enc_s.encoded,
        refusal_token_ids(lm),
        batch_size=3,
        progress=False,
    )
    res["fixed"] = [fixed.bypass, fixed.induce, fixed.kl, fixed.base_harmful, fixed.base_harmless]
    lenient = {**LENIENT, "filter_train": True, "refusal_tokens": EVEN}  # the filter, then the rest
    config = SelectionConfig(n_train=6, n_val=4, batch_size=5, **lenient)
    sel = refusal_direction(
        lm, HARMFUL, HARMLESS, HARMFUL[2:], HARMLESS[2:], config, progress=False
    )
    res["selection"] = sel.table.to_dict("list")
    res["carrier"] = [sel.carrier.vectors, sel.carrier.layer, sel.carrier.position]
    res["candidates"] = sel.candidates.vectors if sel.candidates is not None else None
    res["cost"] = [sel.n_forward_passes, sel.n_rows]
    res["n_fitted"] = [sel.candidates.n_harmful, sel.candidates.n_harmless]
    sweep = SweepConfig(
        add_layers="1",
        add_strengths=(1.0,),
        ablate_strengths=(1.0, 0.5),
        n_random=2,
        n_prompts=5,
        batch_size=4,
        generate=True,
        max_new_tokens=3,
        n_resamples=50,
    )
    result = causal_sweep_result(lm, {"r": carrier}, HARMFUL, HARMLESS, sweep, progress=False)
    res["sweep"] = result.table.to_dict("list")
    plane = torch.linalg.qr(torch.randn(lm.d_model, 2, generator=torch.Generator().manual_seed(3)))
    subspace = Carrier(
        vectors=plane[0].T.contiguous(),
        kind="refusal",
        method="cone",
        layer=2,
        position="t_post[-1]",
    )
    table = admissibility_table(lm, [carrier, subspace], HARMFUL, HARMLESS, batch_size=4)
    res["admissible"] = table.to_dict("list")  # a direction batched, a plane one by one
    handle.remove()
    res["forwards"] = calls[0]
    # the targets and the scores are shared out; the descent (2 steps) runs whole on every rank
    rdo = rdo_cone(
        lm,
        HARMFUL[:4],
        HARMLESS[:4],
        carrier,
        RDOConfig(
            k=2, steps=2, max_new_tokens=3, batch_size=4, n_combinations=1, n_score_combinations=2
        ),
    )
    res["rdo"] = [rdo.vectors, rdo.scores]
    return res


def _carrier(lm: Any) -> Any:
    from safegeom.carriers import Carrier

    vector = torch.randn(lm.d_model, generator=torch.Generator().manual_seed(2)) * 3
    return Carrier(vectors=vector, kind="refusal", method="dim", layer=1, position="t_post[-1]")


def _sweep_argv(checkpoint: Path, carrier: Path, data: Path, out: Path) -> list[str]:
    sets = ["--harmful", str(data / "harmful.jsonl"), "--harmless", str(data / "harmless.jsonl")]
    return [
        "sweep",
        str(checkpoint),
        "--carrier",
        f"r={carrier}",
        *sets,
        *SWEEP_FLAGS,
        "--out",
        str(out),
    ]


def _rank_main(checkpoint: Path, work: Path) -> None:
    """One rank: the library paths, two failures planted on rank 1, then ``safegeom sweep``."""
    from safegeom.carriers import SelectionConfig, load_carrier, select_refusal_direction
    from safegeom.carriers.refusal import dim_candidates
    from safegeom.cli import main as cli
    from safegeom.errors import SafegeomError
    from safegeom.models import load_model
    from safegeom.parallel import ranks as dist
    from safegeom.parallel.dispatch import sharding
    from safegeom.prompts import load_prompts
    from safegeom.sweeps.generated import generated_refusals

    torch.set_num_threads(1)
    writes: list[str] = []
    _record_writes(writes)
    r = int(os.environ["RANK"])
    lm = load_model(checkpoint, LoadConfig(device="cpu"))
    carrier = load_carrier(work / "carrier.safetensors")
    with sharding():  # the library shares its work out only where an entry point asks
        res = _library(lm, carrier)
        planted = SafegeomError(f"planted failure on rank {r}")
        candidates = dim_candidates(lm, HARMFUL, HARMLESS, progress=False)
        with _planted(lm, on_rank=1, after=0, error=planted):
            res["fail_select"] = _fails(
                lambda: select_refusal_direction(
                    lm, candidates, HARMFUL, HARMLESS, SelectionConfig(**LENIENT), progress=False
                )
            )
        with _planted(lm, on_rank=1, after=0, error=planted):
            res["fail_generate"] = _fails(
                lambda: generated_refusals(
                    lm, load_prompts(HARMLESS), [None, None], max_new_tokens=2
                )
            )
    res["library_writes"] = list(writes)
    save_results(work / f"rank{r}", res)
    dist.all_or_none(lambda: None)
    code = cli(_sweep_argv(checkpoint, work / "carrier.safetensors", work, work / "two.parquet"))
    (work / f"rank{r}.cli.json").write_text(json.dumps({"code": code, "writes": writes}))


def _assert_same(got: Any, want: Any, where: str, rtol: float = 0.0) -> None:
    """``got`` equals ``want``: bit for bit (``rtol=0``) or within ``rtol`` (floats, tensors)."""
    if isinstance(want, torch.Tensor):
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol, msg=where)
    elif isinstance(want, dict):
        assert sorted(got) == sorted(want), where
        for key in want:
            _assert_same(got[key], want[key], f"{where}/{key}", rtol)
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            _assert_same(a, b, f"{where}[{i}]", rtol)
    elif isinstance(want, float) and rtol:
        assert got == pytest.approx(want, rel=rtol, abs=rtol, nan_ok=True), where
    elif isinstance(want, float) and want != want:  # NaN (a zero candidate's unscored row)
        assert got != got, where
    else:
        assert got == want, where


def test_carriers_and_sweep_on_two_ranks_equal_one_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safegeom.cli import main as cli
    from safegeom.models import load_model

    checkpoint = build_checkpoint(tmp_path, "llama")
    for name, prompts in (("harmful", HARMFUL), ("harmless", HARMLESS)):
        rows = "".join(json.dumps({"prompt": p}) + "\n" for p in prompts)
        (tmp_path / f"{name}.jsonl").write_text(rows)
    lm = load_model(checkpoint, LoadConfig(device="cpu"))
    carrier = _carrier(lm)
    carrier.save(tmp_path / "carrier")
    save_results(tmp_path / "reference", _library(lm, carrier))  # saved and read as the ranks' are
    want = load_results(tmp_path / "reference")
    assert (
        cli(
            _sweep_argv(
                checkpoint, tmp_path / "carrier.safetensors", tmp_path, tmp_path / "one.parquet"
            )
        )
        == 0
    )
    printed = capsys.readouterr().out

    runs = launch("tests.test_sweeps_sharded", [str(checkpoint), str(tmp_path)], tmp_path)

    assert [code for code, _, _ in runs] == [0, 0], [err[-3000:] for _, _, err in runs]
    ranks = [load_results(tmp_path / f"rank{r}") for r in range(2)]
    for r, got in enumerate(ranks):
        for key in (
            "filter",
            "fixed",
            "cost",
            "n_fitted",
            "sweep",
        ):  # per prompt in one process's batches
            _assert_same(got[key], want[key], f"rank {r} {key}")
        for key, rtol in (("candidates", 1e-12), ("carrier", 1e-12), ("selection", 1e-6)):
            _assert_same(got[key], want[key], f"rank {r} {key}", rtol)
    _assert_same(ranks[1]["selection"], ranks[0]["selection"], "rank 1 = rank 0")
    # the work is shared, not repeated: the ranks' forward passes add up to one process's
    forwards = [got["forwards"] for got in ranks]
    assert sum(forwards) == want["forwards"] and min(forwards) > 0.3 * want["forwards"]
    assert want["n_fitted"] == [3, 2] and [len(k) for k in want["filter"]] == [3, 2]
    assert len(want["sweep"]["metric"]) == 3 * 2 * 2  # 3 cells × 2 populations × 2 metrics
    assert set(want["sweep"]["metric"]) == {"refusal_score", "refusal_rate"}
    assert ranks[0]["fail_select"] == [
        "SafegeomError",
        "rank 1 of 2 failed: planted failure on rank 1",
    ]
    assert ranks[1]["fail_select"] == ["SafegeomError", "planted failure on rank 1"]
    assert ranks[0]["fail_generate"] == ranks[0]["fail_select"]
    assert ranks[1]["fail_generate"] == ranks[1]["fail_select"]
    assert ranks[0]["library_writes"] == ranks[1]["library_writes"] == []
    clis = [json.loads((tmp_path / f"rank{r}.cli.json").read_text()) for r in range(2)]
    assert [c["code"] for c in clis] == [0, 0]
    two = tmp_path / "two.parquet"
    assert sorted(clis[0]["writes"]) == sorted([str(two), str(two.with_suffix(".json"))])
    assert clis[1]["writes"] == []  # rank 1 writes nothing
    pd.testing.assert_frame_equal(
        pd.read_parquet(two), pd.read_parquet(tmp_path / "one.parquet"), check_exact=True
    )
    assert runs[0][1].replace(str(tmp_path / "two"), str(tmp_path / "one")) == printed
    assert runs[1][1] == ""  # and rank 1 prints nothing


if __name__ == "__main__":
    _rank_main(Path(sys.argv[1]), Path(sys.argv[2]))
