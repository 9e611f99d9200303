"""The ``ditx`` command.

Each subcommand is a pair of functions: ``add_<name>_parser(subparsers)`` declares its
arguments and sets ``func`` to ``run_<name>(args) -> int``. ``COMMANDS`` lists the
adders; ``main`` parses, runs and turns bad input into a one-line error with exit code 2.

    ditx convert dit-official DiT-XL-2-256x256.pt out/dit-xl-2-256
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ditx.registry import RegistryError

EXIT_USAGE = 2  # bad input, as argparse uses for bad arguments

# Errors that mean "the input is wrong" and print as a message, not a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, RegistryError)


def _subparsers(parser: argparse.ArgumentParser, dest: str, title: str):
    return parser.add_subparsers(dest=dest, title=title, metavar=f"<{dest}>", required=True)


# ---------------------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------------------


def add_convert_parser(subparsers) -> None:
    convert = subparsers.add_parser(
        "convert",
        help="convert weights from another project into a ditx checkpoint",
        description="Convert weights from another project into a ditx model checkpoint directory "
        "(config.json + model.safetensors), verifying them on the way.",
    )
    sources = _subparsers(convert, "source", "sources")
    official = sources.add_parser(
        "dit-official",
        help="a facebookresearch/DiT checkpoint (e.g. DiT-XL-2-256x256.pt)",
        description="Convert a facebookresearch/DiT checkpoint: a released state dict (.pt/.pth), "
        "a training checkpoint (its 'ema' weights) or a .safetensors file. Keys are checked strictly, "
        "the architecture is read from the tensor shapes, and pos_embed must be the fixed sin-cos codes.",
    )
    official.add_argument("path", type=Path, help="official checkpoint (.pt, .pth or .safetensors)")
    official.add_argument("out", type=Path, help="output directory for the ditx checkpoint (written atomically)")
    official.add_argument(
        "--num-heads",
        type=int,
        default=None,
        metavar="N",
        help="attention heads; needed only when depth and hidden size match no DiT preset",
    )
    official.add_argument("--overwrite", action="store_true", help="replace OUT if it already exists")
    official.set_defaults(func=run_convert_dit_official)


def run_convert_dit_official(args: argparse.Namespace) -> int:
    from ditx.checkpoint import inspect_official_dit, load_official_dit, read_state_dict, save_model

    if args.out.exists() and not args.overwrite:  # fail before the (slow) load
        raise FileExistsError(f"{args.out} already exists; pass --overwrite to replace it")
    state_dict = read_state_dict(args.path)
    spec = inspect_official_dit(state_dict, args.num_heads)
    model = load_official_dit(state_dict, args.num_heads)
    metadata = {"source": "facebookresearch/DiT", "source_file": args.path.name, **spec.as_dict()}
    save_model(model, args.out, overwrite=args.overwrite, metadata=metadata)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.out}: {spec.summary()}, {params:,} parameters")
    return 0


# ---------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_convert_parser]


def build_parser() -> argparse.ArgumentParser:
    import ditx

    parser = argparse.ArgumentParser(
        prog="ditx",
        description="ditx: one Diffusion Transformer backbone for images, video and 3D.",
    )
    parser.add_argument("--version", action="version", version=f"ditx {ditx.__version__}")
    commands = _subparsers(parser, "command", "commands")
    for add in COMMANDS:
        add(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ditx`` command line; returns the exit code (0 ok, 2 bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        command = " ".join(filter(None, ("ditx", args.command, getattr(args, "source", None))))
        print(f"{command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
