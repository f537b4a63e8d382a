"""Arguments shared by several subcommands, and how to act on them."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from safegeom.models import LoadedModel, load_model
from safegeom.prompts import PromptSet, load_prompts

__all__ = ["add_model_args", "add_prompt_args", "emit_json", "model_from_args", "prompts_from_args"]


def add_model_args(parser: argparse.ArgumentParser, *, positional: bool = True) -> None:
    """``MODEL`` plus --dtype, --device, --merge-adapter, --allow-pickle, --trust-remote-code,
    --layout and --chat-template."""
    if positional:
        parser.add_argument(
            "model", metavar="MODEL", help="tiny-chat, a checkpoint or adapter dir, or a hub id"
        )
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or auto")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: auto)")
    parser.add_argument(
        "--merge-adapter", action="store_true", help="fold a PEFT adapter into the base weights"
    )
    parser.add_argument(
        "--allow-pickle", action="store_true", help="allow pickled .bin weights (unsafe)"
    )
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="run code shipped with a checkpoint"
    )
    parser.add_argument(
        "--layout", default=None, help="JSON layout override for an unknown architecture"
    )
    parser.add_argument(
        "--chat-template", default=None, help="file with a Jinja chat template to use instead"
    )


def model_from_args(args: argparse.Namespace, spec: str | None = None) -> LoadedModel:
    """Load the model named on the command line."""
    template = Path(args.chat_template).read_text() if args.chat_template else None
    return load_model(
        spec or args.model,
        dtype=args.dtype,
        device=args.device,
        merge_adapter=args.merge_adapter,
        allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
        layout=json.loads(args.layout) if args.layout else None,
        chat_template=template,
    )


def add_prompt_args(parser: argparse.ArgumentParser, *, flag: str = "--prompts") -> None:
    """A prompt SPEC option plus --column and --limit."""
    parser.add_argument(
        flag, required=True, metavar="SPEC", help="bundled set[:split] or a CSV/JSON/JSONL file"
    )
    parser.add_argument("--column", default=None, help="prompt column of a user file")
    parser.add_argument("--limit", type=int, default=None, help="use the first N prompts")


def prompts_from_args(args: argparse.Namespace, spec: str | None = None) -> PromptSet:
    """Load the prompt set named on the command line."""
    return load_prompts(spec or args.prompts, column=args.column, n=args.limit)


def emit_json(payload: Any) -> None:
    """Print a JSON document to stdout."""
    json.dump(payload, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")
