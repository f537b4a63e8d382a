"""RefusalGuard's representation edit (docs/methods.md §6, ours): a LoReFT edit kept off the cone.

At each edited layer l the hidden state at the edited positions becomes

    Φ(h) = h + P⊥ Rᵀ (W h + b − R h),      P⊥ = I − B Bᵀ,

with R (r × d) orthonormal rows, W (r × d), b (r) trainable and B (d × k) the layer's refusal-cone
basis, a fixed buffer. Bᵀ P⊥ = 0, so the edit never moves ``Bᵀ h`` at its own layer and
positions (what later layers make of the change is the loss's job, not the edit's).

Choices where the paper is silent (proposals, all in :class:`ReftConfig`):

- R is the Q factor of a free matrix A (``R = Qᵀ`` of ``qr(Aᵀ)``, signs fixed so diag > 0), not
  ``torch.nn.utils.parametrizations.orthogonal``: the checkpoint then stores plain tensors (A, W,
  b, B and the materialised R) that reload to the same R bit for bit, whatever torch's internals.
- Edited positions: the first ``first_k`` and last ``last_k`` real prompt tokens of each row,
  found from the attention mask, so left (or right) padding does not move them. In a forward with
  a KV cache (a generation step) the tokens are generated ones: left alone, like LoReFT, unless
  ``edit_generated``; the prompt's cached keys and values already carry the edit.
- A forward over prompt + answer (teacher forcing) would count the answer as prompt: wrap it in
  ``edit.prompt_lengths(lengths)`` to say how many real tokens of each row are the prompt.

"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from jaxtyping import Bool
from torch import Tensor, nn

from safegeom.artifacts import (
    Provenance,
    read_json,
    read_safetensors,
    save_safetensors,
    sha256_bytes,
    write_json,
)
from safegeom.config import check, config_dict
from safegeom.errors import ArtifactError, ModelLoadError, NotFoundError, SafegeomError
from safegeom.models.reft_hooks import ReftHandle
from safegeom.models.reft_layer import (
    CONFIG_FILE,
    FORMAT,
    TENSOR_FILE,
    ReftConfig,
    ReftLayer,
    as_cone_basis,
    orthonormal_rows,
)

if TYPE_CHECKING:
    from safegeom.models.load_config import LoadConfig
    from safegeom.models.loading import LoadedModel

__all__ = [
    "CONFIG_FILE",
    "FORMAT",
    "TENSOR_FILE",
    "ReftConfig",
    "ReftEdit",
    "ReftHandle",
    "ReftLayer",
    "load_edited",
    "load_reft",
    "orthonormal_rows",
]


class ReftEdit(nn.Module):
    """The RefusalGuard edit over all layers in ``config.layers``; the base model stays untouched.

    Built "at zero" (W = R, b = 0): Φ is the identity and the edited model equals the base exactly.
    ``edit.parameters()`` are A, W and b of every layer (the cone bases are buffers), so a trainer
    optimises them with the base frozen.

    Raises:
        SafegeomError: a missing or extra cone, a cone of the wrong hidden size or not
            orthonormal, a rank above the hidden size, a layer out of range.
    """

    def __init__(
        self,
        config: ReftConfig,
        bases: Mapping[int, Tensor],
        d_model: int,
        n_layers: int | None = None,
        *,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        self.config, self.d_model, self.n_layers = config, int(d_model), n_layers
        self.base: str | None = None
        """The base model spec this edit belongs to (set by :meth:`save` and :func:`load_reft`)."""
        check(
            config.rank <= d_model,
            "rank",
            f"must be at most the hidden size {d_model}",
            config.rank,
        )
        if n_layers is not None:
            self._check_layers(n_layers)
        missing = sorted(set(config.layers) - set(bases))
        extra = sorted(set(bases) - set(config.layers))
        if missing or extra:
            raise SafegeomError(
                f"cone bases are for layers {sorted(bases)} but the edit is at {list(config.layers)}: "
                "give one basis per edited layer"
            )
        generator = torch.Generator().manual_seed(seed)
        self.edits = nn.ModuleDict(
            {
                str(layer): ReftLayer(
                    as_cone_basis(bases[layer], self.d_model, layer).to(device),
                    config.rank,
                    generator,
                )
                for layer in config.layers
            }
        )
        self._handles: list[ReftHandle] = []
        self._prompt_lengths: Tensor | None = None

    @classmethod
    def for_model(
        cls, lm: LoadedModel, config: ReftConfig, bases: Mapping[int, Tensor], *, seed: int = 0
    ) -> ReftEdit:
        """An edit at zero sized for ``lm`` (its hidden size, depth and device)."""
        return cls(config, bases, lm.d_model, lm.n_layers, seed=seed, device=lm.device)

    def _check_layers(self, n_layers: int) -> None:
        bad = [x for x in self.config.layers if x >= n_layers]
        check(not bad, "layers", f"must be below the model's {n_layers} blocks", bad)

    def layer(self, layer: int) -> ReftLayer:
        """The edit at block ``layer``."""
        return self.edits[str(layer)]  # type: ignore[return-value]

    def reset(self) -> None:
        """Put every layer back at zero (W = R, b = 0) on its current device: Φ = identity."""
        with torch.no_grad():
            for module in self.edits.values():
                module.weight.copy_(module.rotation)
                module.bias.zero_()

    def edited_positions(
        self, mask: Bool[Tensor, "batch seq"], cached: bool
    ) -> Bool[Tensor, "batch seq"]:
        """Which tokens of a forward are edited, from its attention mask (True: a real token).

        ``cached``: the forward continues a KV cache, so its tokens are generated ones.
        """
        real = mask.bool()
        if cached:
            return real if self.config.edit_generated else torch.zeros_like(real)
        rank = real.long().cumsum(-1) - 1
        n_prompt = real.sum(-1, keepdim=True)
        lengths = self._prompt_lengths
        if lengths is not None:
            if lengths.shape[0] != real.shape[0]:
                raise SafegeomError(
                    f"prompt_lengths has {lengths.shape[0]} rows, the batch has {real.shape[0]}"
                )
            n_prompt = torch.minimum(n_prompt, lengths.to(real.device)[:, None])
        prompt = real & (rank < n_prompt)
        edited = prompt & ((rank < self.config.first_k) | (rank >= n_prompt - self.config.last_k))
        if self.config.edit_generated:
            edited |= real & (rank >= n_prompt)
        return edited

    @contextmanager
    def prompt_lengths(self, lengths: Sequence[int] | Tensor) -> Iterator[None]:
        """Within the block, row i's prompt is its first ``lengths[i]`` real tokens (the rest answer)."""
        self._prompt_lengths = torch.as_tensor(lengths, dtype=torch.long).reshape(-1)
        try:
            yield
        finally:
            self._prompt_lengths = None

    def check_model(self, lm: LoadedModel) -> None:
        """Raise :class:`SafegeomError` unless ``lm`` has this edit's hidden size and its layers."""
        if lm.d_model != self.d_model:
            raise SafegeomError(
                f"the edit was built for hidden size {self.d_model}, the model has {lm.d_model}: "
                "attach it to the model whose cones it was built from"
            )
        self._check_layers(lm.n_layers)

    def attach(self, lm: LoadedModel) -> ReftHandle:
        """Apply the edit to ``lm``'s forward passes until the handle's ``remove()``.

        Raises:
            SafegeomError: the model does not fit (see :meth:`check_model`), or this edit is
                already attached to it.
        """
        self.check_model(lm)
        blocks = lm.blocks
        if any(h.blocks is blocks and h.attached for h in self._handles):
            raise SafegeomError("this edit is already attached to the model; detach() it first")
        self.to(lm.device)
        handle = ReftHandle(self, lm)
        self._handles.append(handle)
        return handle

    @contextmanager
    def on(self, lm: LoadedModel) -> Iterator[LoadedModel]:
        """``with edit.on(lm): ...``: the edit applies inside the block, removed however it ends."""
        with self.attach(lm):
            yield lm

    def detach(self) -> None:
        """Remove this edit from every model it is attached to."""
        for handle in list(self._handles):
            handle.remove()

    def tensors(self) -> dict[str, Tensor]:
        """Everything the checkpoint stores, by name ``layer.<l>.<free|weight|bias|basis|rotation>``."""
        out: dict[str, Tensor] = {}
        for name, module in self.edits.items():
            for key, value in module.state_dict().items():
                out[f"layer.{name}.{key}"] = value.detach().cpu()
            out[f"layer.{name}.rotation"] = module.rotation.detach().cpu()
        return out

    def weight_hash(self) -> str:
        """A sha256 over the edit's stored tensors (names, shapes and bytes)."""
        chunks = []
        for name, tensor in sorted(self.tensors().items()):
            chunks.append(f"{name}|{tuple(tensor.shape)}".encode())
            chunks.append(tensor.contiguous().view(torch.uint8).numpy().tobytes())
        return sha256_bytes(b"".join(chunks))

    def save(self, folder: str | Path, *, base: str, provenance: Provenance | None = None) -> Path:
        """Write ``refusalguard.safetensors`` and ``refusalguard.json`` (naming ``base``) to ``folder``.

        Returns:
            The folder, which :func:`load_reft` and ``load_model`` read back.
        """
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        self.base = str(base)
        meta = {"format": FORMAT, "config": config_dict(self.config)}
        save_safetensors(out / TENSOR_FILE, self.tensors(), meta)
        prov = provenance or Provenance(model=str(base))
        payload = {
            **meta,
            "base": str(base),
            "layers": list(self.config.layers),
            "d_model": self.d_model,
            "n_layers": self.n_layers,
            "cone_dims": {str(x): int(self.layer(x).basis.shape[1]) for x in self.config.layers},
            "edit_hash": self.weight_hash(),
            "provenance": prov,
        }
        write_json(out / CONFIG_FILE, payload)
        return out


def load_reft(folder: str | Path, *, device: str | torch.device = "cpu") -> ReftEdit:
    """Read an edit saved by :meth:`ReftEdit.save`; ``edit.base`` is the base spec it names.

    Raises:
        NotFoundError: a file is missing.
        ArtifactError: the files are not a RefusalGuard checkpoint or do not agree.
    """
    root = Path(folder)
    info = read_json(root / CONFIG_FILE, what="RefusalGuard checkpoint", format=FORMAT)
    tensors, _ = read_safetensors(root / TENSOR_FILE, what="RefusalGuard checkpoint")
    try:
        config = ReftConfig(**{**info["config"], "layers": tuple(info["config"]["layers"])})
        bases = {x: tensors[f"layer.{x}.basis"] for x in config.layers}
        edit = ReftEdit(config, bases, int(info["d_model"]), info.get("n_layers"), device=device)
        for x in config.layers:
            state = {k: tensors[f"layer.{x}.{k}"] for k in ("free", "weight", "bias", "basis")}
            edit.layer(x).load_state_dict(state)
    except (KeyError, TypeError, RuntimeError, SafegeomError) as err:
        raise ArtifactError(f"{root} is not a consistent RefusalGuard checkpoint ({err})") from None
    for x in config.layers:
        stored = tensors[f"layer.{x}.rotation"].to(device)
        if not torch.allclose(edit.layer(x).rotation.detach(), stored, atol=1e-5):
            raise ArtifactError(f"{root}: layer {x}'s R does not match its stored rotation")
    edit.base = str(info.get("base") or "") or None
    edit.to(device)
    return edit


def load_edited(
    spec: str | Path,
    folder: Path,
    load_model: Callable[..., LoadedModel],
    config: LoadConfig,
) -> LoadedModel:
    """What ``load_model`` returns for a RefusalGuard folder: its base, with the edit attached.

    The base spec (``refusalguard.json``'s ``base``) is resolved like an adapter's base; a
    relative path is tried against the folder first. The hooks stay for the model's lifetime;
    ``lm.edit.detach()`` removes them.

    Raises:
        NotFoundError: the base model cannot be found.
        ModelLoadError: the JSON names no base, or the edit does not fit the base (hidden size,
            layers).
    """
    edit = load_reft(folder)
    if not edit.base:
        raise ModelLoadError(f"{folder}/{CONFIG_FILE} names no base model (field 'base')")
    base_spec = edit.base
    if not Path(base_spec).expanduser().is_absolute() and (folder / base_spec).is_dir():
        base_spec = str(folder / base_spec)
    try:
        base = load_model(base_spec, config)
    except NotFoundError as err:
        raise NotFoundError(
            f"{folder}/{CONFIG_FILE} names the base model {edit.base!r} (field 'base'), which "
            f"cannot be found: {err}; put the base model there or edit that field"
        ) from None
    try:
        edit.attach(base)
    except SafegeomError as err:
        raise ModelLoadError(
            f"the RefusalGuard edit in {folder} does not fit its base {edit.base!r}: {err}"
        ) from None
    return dataclasses.replace(base, name=str(spec), source=str(folder), edit=edit)
