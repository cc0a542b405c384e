"""`mlx-transformer <subcommand>`: a table of subcommands, each in its own lazily imported module.

Each module listed here defines `add_arguments(parser)` and `run(args) -> int | None`, next to an
importable API function. Errors a user can cause (`UserError`) print one line and exit with 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__
from .errors import UserError

# name -> (module, one-line help). Modules are imported only when their subcommand runs.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "prepare": (
        "mlx_transformer.data.prepare",
        "train a tokenizer and encode text into token shards",
    ),
    "generate": ("mlx_transformer.generate.api", "generate text from a checkpoint, streaming it"),
    "train": (
        "mlx_transformer.train.trainer",
        "train or fine-tune (full or LoRA) on a prepared dataset",
    ),
    "fuse": ("mlx_transformer.train.fuse", "fuse LoRA adapters into a plain checkpoint"),
    "demo": ("mlx_transformer.demo", "the whole journey on the embedded default corpus"),
    "convert": (
        "mlx_transformer.checkpoint.hf",
        "import a Hugging Face GPT-2/Llama/Qwen checkpoint, or export one",
    ),
    "inspect": (
        "mlx_transformer.interpret.report",
        "attention maps, logit lens, ablations, head scores",
    ),
    "info": (
        "mlx_transformer.checkpoint.info",
        "describe a checkpoint (config, size), checking it",
    ),
    "export": ("export.exporter", "export a checkpoint to ONNX (portable or onnxruntime ops)"),
    "onnx-generate": ("export.runtime", "generate text from an exported ONNX folder (no MLX)"),
    "verify": ("mlx_transformer.verify", "check an ONNX export against MLX on every provider"),
    "web": ("export.web", "write a static web page that generates text from an ONNX export"),
}
# Commands that never run MLX: no BLAS to preload for them (and no re-execution).
WITHOUT_MLX = {"prepare", "info", "export", "onnx-generate", "web"}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlx-transformer",
        description="Train, sample, inspect and export decoder Transformers on MLX.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if only == name:  # import only the module that will run
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    wants_help = not argv or command is None
    if command in SUBCOMMANDS and command not in WITHOUT_MLX:
        from .cpu.blas import ensure_fast_blas

        ensure_fast_blas()  # Linux CPU: may re-exec once with an optimized OpenBLAS preloaded
    parser = build_parser(only=command if command in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    if wants_help or args.command is None:
        parser.print_help()
        return 0 if argv else 2
    try:
        return importlib.import_module(args._module).run(args) or 0
    except UserError as e:
        print(f"mlx-transformer {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mlx-transformer {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
