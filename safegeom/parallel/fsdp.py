"""Full-parameter training (``sft``) with the weights sharded over the ranks: FSDP2.

With ``--fsdp`` (:attr:`~safegeom.training.config.TrainConfig.fsdp`), or under ``accelerate launch``
with an FSDP config, :func:`shard_model` applies ``torch.distributed.fsdp.fully_shard`` to each
decoder block and then to the whole model, so every rank keeps ``1 / N`` of each weight, of its
gradient and of the AdamW moments (DTensors sharded on dim 0); a block's full weights exist only
during its forward and backward. The step is that of :mod:`safegeom.parallel.ddp` (each rank
its slice of the global batch, its share of the loss normalised over the whole batch); the
gradients are *summed* by FSDP's reduce-scatter (its divide factor set to 1), not averaged.

Checkpoints are those of one process: :func:`full_state` gathers every weight and
:func:`full_optimizer_state` every AdamW moment (collectives; rank 0 writes), numbered as one
process numbers them, so ``load_model`` reads the checkpoint like any other and a run resumes with
any number of processes, FSDP or not (:func:`shard_optimizer_state` cuts the full moments to
each rank's shards again). Only ``sft`` trains full weights; LoRA and the RefusalGuard edit are
small and train DDP-style, so :func:`use_fsdp` refuses FSDP for them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from safegeom.errors import ConfigError
from safegeom.models.layout import resolve
from safegeom.parallel.ddp import refuse_sharded_training

__all__ = [
    "all_finite",
    "full_optimizer_state",
    "full_state",
    "is_sharded",
    "shard_model",
    "shard_optimizer_state",
    "shard_trainable",
    "use_fsdp",
]


def _launched_with_fsdp(acc: Accelerator) -> bool:
    """Whether ``acc`` was set up by an accelerate FSDP config (``distributed_type: FSDP``)."""
    kind = str(getattr(acc.distributed_type, "value", acc.distributed_type))
    return kind.upper() == "FSDP"


def use_fsdp(acc: Accelerator, requested: bool, update: str, method: str) -> bool:
    """Whether this run shards its weights: ``--fsdp`` or an accelerate FSDP launch.

    Returns:
        ``True`` for FSDP (full weights only), ``False`` for DDP-style training.

    Raises:
        ConfigError: a DeepSpeed or Megatron-LM launch; an accelerate FSDP config with
            ``fsdp_cpu_ram_efficient_loading`` on; FSDP is asked for a method that does not train full weights (its
            ``update`` is not ``full``); the message names the method and the fix.
    """
    if all(
        os.environ.get(k, "").lower() in ("1", "true", "yes")
        for k in ("ACCELERATE_USE_FSDP", "FSDP_CPU_RAM_EFFICIENT_LOADING")
    ):
        raise ConfigError(
            "fsdp_cpu_ram_efficient_loading: transformers would load the weights on rank 0 "
            "only, but every process loads the whole model before it is sharded (to fit the "
            "defence and check its hash); set fsdp_cpu_ram_efficient_loading: false"
        )
    launched = _launched_with_fsdp(acc)
    if not launched:
        refuse_sharded_training(acc)  # DeepSpeed, Megatron-LM
    wanted = requested or launched
    if wanted and update != "full":
        how = "--fsdp" if requested else "an accelerate FSDP config"
        raise ConfigError(
            f"{how}: FSDP shards full weights and is for sft only; {method} trains small "
            "adapters (or the RefusalGuard edit) that every process holds whole: drop --fsdp "
            "and launch with accelerate launch --multi_gpu (or torchrun)"
        )
    return wanted


def shard_model(
    model: nn.Module, blocks: str, device: torch.device, world: int, *, reshard: bool = True
) -> None:
    """Shard ``model`` in place over the ``world`` ranks: each block of ``blocks`` (the layout's
    path to the decoder blocks), then the root (embeddings, final norm, LM head).

    ``reshard``: free a block's gathered weights after its forward (less memory, one more
    all-gather in the backward). Gradients are summed over the ranks, not averaged.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    units = [*resolve(model, blocks), model]
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard)
    for unit in units:  # a plain sum (gloo has no pre-multiplied sum; NCCL's AVG would divide)
        unit.set_gradient_divide_factor(1.0)  # type: ignore[operator]
        unit.set_force_sum_reduction_for_comms(True)  # type: ignore[operator]


def shard_trainable(trainable: Any, acc: Accelerator) -> None:
    """Shard ``trainable`` (a ``full`` :class:`~safegeom.training.trainable.Trainable`, loaded the same
    on every rank, on CPU or on ``acc.device``) over ``acc``'s processes, moving each block to
    ``acc.device`` as it is sharded (so no device ever holds the whole model), and mark it
    :attr:`~safegeom.training.trainable.Trainable.sharded`; in one process, move it to ``acc.device``.
    Honours the accelerate FSDP plugin's ``reshard_after_forward`` (default on)."""
    world = acc.num_processes
    if world == 1:
        trainable.module.to(acc.device)
        return
    plugin = getattr(acc.state, "fsdp_plugin", None)
    reshard = getattr(plugin, "reshard_after_forward", True)
    shard_model(
        trainable.module,
        trainable.lm.layout.blocks,
        acc.device,
        world,
        reshard=reshard if isinstance(reshard, bool) else True,
    )
    trainable.sharded = True


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (a shard of a weight under FSDP)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _full(tensor: Any, keep: bool) -> Any:
    """``tensor`` whole on CPU (gathered from every rank when it is a DTensor: a collective), or
    an empty tensor when not ``keep`` (only rank 0 holds the whole weights, one at a time
    elsewhere); anything but a tensor as it is."""
    if not isinstance(tensor, torch.Tensor):
        return tensor
    whole = tensor.full_tensor() if is_sharded(tensor) else tensor  # type: ignore[attr-defined]
    return whole.detach().cpu() if keep else torch.empty(0)


def _keep() -> bool:
    """Whether this process keeps gathered tensors: rank 0, or the only process."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every entry of ``module.state_dict()`` whole on CPU, gathered from the shards (a
    collective: every rank calls it); rank 0 gets the tensors, the others empty placeholders.

    A parameter held under several names (tied input and output embeddings) is gathered once and
    its names share the one CPU tensor, as in the unsharded model, so the checkpoint is saved as
    one process saves it (the tied copy left out).
    """
    keep = _keep()
    gathered: dict[int, Any] = {}
    out: dict[str, torch.Tensor] = {}
    for name, value in module.state_dict(keep_vars=True).items():
        if id(value) not in gathered:
            gathered[id(value)] = _full(value, keep)
        out[name] = gathered[id(value)]
    return out


def full_optimizer_state(optimizer: Any) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every moment whole on CPU (a collective; rank 0 gets the
    tensors, the others empty placeholders): the form one process saves, its parameters
    numbered in the same order."""
    state, keep = optimizer.state_dict(), _keep()
    whole = {
        pid: {k: _full(v, keep) for k, v in values.items()}
        for pid, values in state["state"].items()
    }
    return {"state": whole, "param_groups": state["param_groups"]}


def shard_optimizer_state(state: dict[str, Any], optimizer: Any) -> dict[str, Any]:
    """A full (one-process) optimizer ``state`` cut to this rank's shards of ``optimizer``'s
    sharded parameters, ready for ``load_state_dict`` (a collective; ``state`` itself when no
    parameter is sharded).

    Raises:
        ConfigError: a saved moment's shape differs from its parameter's (another model).
    """
    from torch.distributed.tensor import distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not any(is_sharded(p) for p in params):
        return state
    out: dict[int, dict[str, Any]] = {}
    for pid, values in state["state"].items():
        param = params[int(pid)]
        out[pid] = {}
        for key, value in values.items():
            if isinstance(value, torch.Tensor) and value.ndim and is_sharded(param):
                if tuple(value.shape) != tuple(param.shape):
                    raise ConfigError(
                        f"the saved optimizer state {key} of parameter {pid} has shape "
                        f"{tuple(value.shape)}, the parameter {tuple(param.shape)}: resume the "
                        "run with the model it was trained on"
                    )
                value = distribute_tensor(
                    value.to(param.device, param.dtype), param.device_mesh, param.placements
                )
            out[pid][key] = value
    return {"state": out, "param_groups": state["param_groups"]}


def all_finite(params: Iterable[torch.Tensor]) -> bool:
    """Whether every element of ``params`` is finite, on every rank when they are shards (then a
    collective)."""
    params = list(params)
    if not params:
        return True
    local = [p.to_local() if is_sharded(p) else p for p in params]  # type: ignore[attr-defined]
    finite = all(bool(torch.isfinite(t.detach()).all()) for t in local)
    if not any(is_sharded(p) for p in params):
        return finite
    flag = torch.tensor([float(finite)], device=local[0].device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item() > 0)
