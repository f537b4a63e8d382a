"""``AttackSet``: adversarial prompts optimised against one source model, with provenance.

An attack set is a prompt set. Every prompt-taking function accepts it where a spec goes:

- :func:`safegeom.prompts.load_prompts` reads it as text (:meth:`AttackSet.as_prompt_set`: the
  adversarial user turns, the targets as completions);
- the chat encoding (:func:`safegeom.models.chat.encode_set`, so ``generate``, ``evaluate``,
  ``refusal_scores``) takes its token ids as optimised (:meth:`AttackSet.encoded_for`) when the
  tokenizer, chat template and system prompt are the source's; otherwise it re-encodes the text
  and warns, naming the mismatch.

A set saves as one JSON file (``DIR/attack_set.json``), atomically, and loads back equal.

Example (not a doctest: it needs a loaded model ``lm``)::

    attacks = load_attack_set("runs/gcg")
    result = evaluate(lm, attacks)            # the optimised token ids, replayed
    attacks.success_rate                      # success on the source model, by its judge
    # -> 0.6
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from safegeom.artifacts import Provenance, read_json, write_json
from safegeom.errors import ArtifactError, SafegeomError
from safegeom.models.chat import EncodedPrompt, EncodedSet, encode_prompts, template_hash
from safegeom.models.plain_text import encode_plain
from safegeom.prompts import PromptSet, load_prompts

__all__ = [
    "FILE_NAME",
    "FORMAT",
    "AttackRecord",
    "AttackSet",
    "is_attack_folder",
    "load_attack_set",
    "prompt_spec",
    "tokenizer_hash",
]

FORMAT = "safegeom-attack-set"
"""The ``format`` tag of a saved attack set."""
FILE_NAME = "attack_set.json"
"""The file an attack set is saved as inside its folder."""


def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 of a tokenizer's vocabulary (token → id) and special ids: equal hashes mean the
    same text gives the same ids, so saved ids can be replayed."""
    vocab = sorted(tokenizer.get_vocab().items())
    specials = sorted(getattr(tokenizer, "all_special_ids", []) or [])
    payload = json.dumps([vocab, specials], separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class AttackRecord:
    """One behaviour's attack: the adversarial prompt and how it was found."""

    behaviour: str
    """The harmful request, as given."""
    target: str
    """The string the attack made likely (``"Sure, here is ..."``)."""
    prompt: str
    """The adversarial user turn as text (the behaviour with its adversarial string, or the
    behaviour inside a template)."""
    input_ids: tuple[int, ...]
    """The whole chat prompt's token ids as optimised (through the assistant header, plus the
    prefilled tokens for a prefilling attack)."""
    inst_start: int
    """Index of the first token of the user turn in ``input_ids``."""
    t_inst: int
    """Index of its last token."""
    losses: tuple[float, ...]
    """Target loss (mean cross-entropy, nats per token) after each step."""
    initial_loss: float
    """Target loss before the first step."""
    steps: int
    """Optimisation steps run (0 for prefilling)."""
    seconds: float
    """Wall time of this behaviour's attack."""
    prefill: str = ""
    """Text the assistant turn starts with (prefilling); empty otherwise."""
    success: bool | None = None
    """Whether the source model's greedy completion was judged not refused (``None``: not judged)."""
    completion: str | None = None
    """The source model's greedy completion (after the prefill)."""

    def __post_init__(self) -> None:
        """Coerce lists to tuples and check the positions.

        Raises:
            ArtifactError: positions outside the ids.
        """
        object.__setattr__(self, "input_ids", tuple(int(i) for i in self.input_ids))
        object.__setattr__(self, "losses", tuple(float(x) for x in self.losses))
        if not 0 <= self.inst_start <= self.t_inst < len(self.input_ids):
            raise ArtifactError(
                f"attack record for {self.behaviour[:40]!r}: positions {self.inst_start}..{self.t_inst} "
                f"outside its {len(self.input_ids)} ids; re-run the attack"
            )

    @property
    def final_loss(self) -> float:
        """The loss of the saved prompt (the lowest reached), nats per token."""
        return min(self.losses, default=self.initial_loss)


@dataclass(frozen=True)
class AttackSet:
    """Adversarial prompts from one attack on one source model (see the module docstring)."""

    method: str
    """``gcg``, ``autodan`` or ``prefill``."""
    name: str
    """What the set is called in results (``gcg:advbench:val``)."""
    records: tuple[AttackRecord, ...]
    """One per behaviour, in the prompt set's order."""
    tokenizer_hash: str
    """:func:`tokenizer_hash` of the source tokenizer."""
    template_hash: str
    """sha256 of the chat template the ids were made with."""
    system: str | None = None
    """The system prompt the ids were made with."""
    judge: str = "substring"
    """The judge of :attr:`AttackRecord.success`."""
    provenance: Provenance = field(default_factory=Provenance)
    """Source model (name, weight hash), prompt set, the attack's config."""

    def __post_init__(self) -> None:
        """Coerce records and provenance from plain mappings (a loaded file)."""
        records = tuple(
            r if isinstance(r, AttackRecord) else AttackRecord(**r) for r in self.records
        )
        object.__setattr__(self, "records", records)
        if not isinstance(self.provenance, Provenance):
            object.__setattr__(self, "provenance", Provenance.from_dict(dict(self.provenance)))

    def __len__(self) -> int:
        return len(self.records)

    @property
    def prompts(self) -> tuple[str, ...]:
        """The adversarial user turns, in order."""
        return tuple(r.prompt for r in self.records)

    @property
    def success_rate(self) -> float | None:
        """Fraction of judged behaviours the source model did not refuse (``None``: none judged)."""
        judged = [r.success for r in self.records if r.success is not None]
        return sum(judged) / len(judged) if judged else None

    def take(self, n: int) -> AttackSet:
        """The set of the first ``n`` records."""
        return replace(self, records=self.records[:n])

    def content_hash(self) -> str:
        """sha256 of the records (prompts, ids, prefills, targets), independent of timings."""
        keys = ("prompt", "input_ids", "prefill", "target")
        rows = [[getattr(r, k) for k in keys] for r in self.records]
        return hashlib.sha256(json.dumps(rows).encode("utf-8")).hexdigest()

    def as_prompt_set(self) -> PromptSet:
        """The adversarial user turns as a :class:`~safegeom.prompts.PromptSet` (text only; the
        prefills and exact ids go through :meth:`encoded_for`)."""
        return PromptSet(
            name=f"attack:{self.name}",
            prompts=self.prompts,
            completions=tuple(r.target for r in self.records),
            source=f"attack set {self.name} on {self.provenance.model}",
        )

    def encoded_for(
        self, tokenizer: Any, *, system: str | None = None, chat_template: str | None = None
    ) -> EncodedSet:
        """The prompts encoded for ``tokenizer``: the saved ids when the tokenizer, template and
        system prompt are the source's, else the text re-encoded (the prefill appended as plain
        text) with a warning naming what differs.

        Returns:
            An :class:`~safegeom.models.chat.EncodedSet` for that tokenizer, template and system.
        """
        t_hash = template_hash(tokenizer, chat_template)
        differs = [
            what
            for what, same in (
                ("tokenizer", tokenizer_hash(tokenizer) == self.tokenizer_hash),
                ("chat template", t_hash == self.template_hash),
                ("system prompt", system == self.system),
            )
            if not same
        ]
        if not differs:
            encoded = tuple(
                EncodedPrompt(r.input_ids, r.t_inst, r.inst_start) for r in self.records
            )
        else:
            warnings.warn(
                f"attack set {self.name!r} was optimised with another {' and '.join(differs)}; "
                "its prompts are replayed as text, not as the optimised token ids",
                stacklevel=3,
            )
            plain = encode_prompts(
                tokenizer, self.prompts, system=system, chat_template=chat_template
            )
            encoded = tuple(
                replace(e, input_ids=(*e.input_ids, *encode_plain(tokenizer, r.prefill)))
                if r.prefill
                else e
                for e, r in zip(plain, self.records, strict=True)
            )
        return EncodedSet(
            prompts=self.prompts,
            encoded=encoded,
            system=system,
            template_hash=t_hash,
            name=f"attack:{self.name}",
            content_hash=self.content_hash(),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON document :meth:`save` writes."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["records"] = [asdict(r) for r in self.records]
        out["provenance"] = self.provenance.to_dict()
        return {"format": FORMAT, **out}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the set atomically: to ``path`` if it ends in ``.json``, else to
        ``path/attack_set.json`` (the folder is made).

        Returns:
            The file written.
        """
        target = _file(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        return write_json(target, self.to_dict())


def _file(path: str | os.PathLike[str]) -> Path:
    target = Path(path)
    return target if target.suffix == ".json" else target / FILE_NAME


def attack_set_from_dict(data: Mapping[str, Any], where: object) -> AttackSet:
    """Rebuild an :class:`AttackSet` from :meth:`AttackSet.to_dict` output.

    Raises:
        ArtifactError: ``data`` is not a safegeom attack set (the message names ``where``).
    """
    if not isinstance(data, Mapping) or data.get("format") != FORMAT:
        raise ArtifactError(
            f"{where} is not a safegeom attack set; write one with `safegeom attack`"
        )
    known = {f.name for f in fields(AttackSet)}
    try:
        return AttackSet(**{k: v for k, v in data.items() if k in known})
    except (TypeError, AttributeError) as err:
        raise ArtifactError(
            f"{where} is a damaged attack set ({err}); re-run `safegeom attack`"
        ) from None


def load_attack_set(path: str | os.PathLike[str]) -> AttackSet:
    """Load an attack set saved by :meth:`AttackSet.save` (a folder or its JSON file).

    Returns:
        The set, equal to the one saved.

    Raises:
        NotFoundError: no attack set there.
        ArtifactError: a truncated or foreign file.
    """
    target = _file(path)
    data = read_json(target, what="attack set")
    return attack_set_from_dict(data, target)


def is_attack_folder(spec: str | os.PathLike[str]) -> bool:
    """Whether ``spec`` names a saved attack set (a folder holding ``attack_set.json``, or it)."""
    target = Path(spec)
    return (target / FILE_NAME).is_file() or (target.name == FILE_NAME and target.is_file())


def prompt_spec(
    spec: str | os.PathLike[str], *, column: str | None = None, n: int | None = None
) -> AttackSet | PromptSet:
    """A prompt spec on the command line: an attack set's folder (or its JSON file) as an
    :class:`AttackSet`, anything else through :func:`~safegeom.prompts.load_prompts`.

    Returns:
        The attack set (its first ``n`` records) or the prompt set.

    Raises:
        SafegeomError: as :func:`load_attack_set` and :func:`~safegeom.prompts.load_prompts`.
    """
    if not is_attack_folder(spec):
        return load_prompts(spec, column=column, n=n)
    if n is not None and n < 1:
        raise SafegeomError(f"n (--limit) must be a positive number of prompts, got {n}")
    attacks = load_attack_set(spec)
    if len(attacks) == 0:
        raise SafegeomError(f"the attack set at {spec} is empty; run `safegeom attack` into it")
    return attacks if n is None else attacks.take(n)
