"""The ``ditx`` command.

Each subcommand is a pair of functions: ``add_<name>_parser(subparsers)`` declares its
arguments and sets ``func`` to ``run_<name>(args) -> int``. ``COMMANDS`` lists the
adders; ``main`` parses, runs and turns bad input into a one-line error with exit code 2
(an interrupt exits with 130). Every command runs with ``ditx.cpu_allocator.reuse_freed_memory``
(``DITX_CPU_ALLOCATOR=default`` keeps glibc's malloc behaviour).

    ditx recipes                                    # what ships
    ditx recipes show image/digits train.steps=200  # the resolved config
    ditx train image/digits train.batch_size=64     # -> runs/image-digits-<time>/
    ditx sample runs/image-digits-<time> --num 16
    ditx eval runs/image-digits-<time>
    ditx train-autoencoder my-latent-recipe.yaml --out vae/mine   # then autoencoder.pretrained=vae/mine
    ditx convert dit-official DiT-XL-2-256x256.pt out/dit-xl-2-256
    ditx env                                        # versions and what works here, for bug reports

Recipe overrides are positional ``section.key=value`` arguments after the recipe (or
run); they may be mixed with options and are applied in order.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ditx.cpu_allocator import reuse_freed_memory
from ditx.registry import MissingDependencyError, RegistryError

EXIT_USAGE = 2  # bad input, as argparse uses for bad arguments
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C

# Errors that mean "the input is wrong" and print as a message, not a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, RegistryError, MissingDependencyError)


def _subparsers(parser: argparse.ArgumentParser, dest: str, title: str, required: bool = True):
    return parser.add_subparsers(dest=dest, title=title, metavar=f"<{dest}>", required=required)


def _add_command(subparsers, name: str, help: str, description: str, epilog: str = "") -> argparse.ArgumentParser:
    """A subcommand whose help keeps the line breaks of its description and examples."""
    parser = subparsers.add_parser(
        name, help=help, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.set_defaults(_parser=parser)  # so that errors found after parsing show this command's usage
    return parser


OVERRIDES_HELP = "recipe overrides, applied in order (e.g. train.batch_size=8 sample.guidance_scale=4.0)"


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", default=[], metavar="section.key=value", help=OVERRIDES_HELP)


def _check_overrides(overrides: list[str]) -> list[str]:
    """Reject a positional that is not ``section.key=value`` before any slow work starts."""
    from ditx.recipe import RecipeError, parse_override

    for text in overrides:
        try:
            parse_override(text)
        except RecipeError:
            raise RecipeError(
                f"unexpected argument {text!r}: after the recipe, positional arguments are overrides "
                f"of the form section.key=value (e.g. train.batch_size=8)"
            ) from None
    return list(overrides)


def _load_recipe(name_or_path: str, overrides: list[str]):
    from ditx.recipe import load_recipe

    return load_recipe(name_or_path, _check_overrides(overrides))


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
    from ditx.checkpoint import save_model
    from ditx.official import inspect_official_dit, load_official_dit, read_state_dict

    if args.out.exists() and not args.overwrite:  # fail before the (slow) load
        raise FileExistsError(f"{args.out} already exists; pass --overwrite to replace it")
    state_dict = read_state_dict(args.path)
    spec = inspect_official_dit(state_dict, args.num_heads)
    model = load_official_dit(state_dict, args.num_heads)
    metadata = {"source": "facebookresearch/DiT", "source_file": args.path.name, **spec.as_dict(),
                "latent_shape": [spec.in_channels, spec.input_size, spec.input_size]}  # fmt: skip
    save_model(model, args.out, overwrite=args.overwrite, metadata=metadata)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.out}: {spec.summary()}, {params:,} parameters")
    return 0


# ---------------------------------------------------------------------------------------
# recipes
# ---------------------------------------------------------------------------------------


def add_recipes_parser(subparsers) -> None:
    recipes = _add_command(
        subparsers,
        "recipes",
        help="list the shipped recipes, or show one resolved",
        description="List the recipes that ship with ditx (name and one-line description), or print one\n"
        "recipe fully resolved: defaults filled in, overrides applied, validated against the schema.",
        epilog="examples:\n"
        "  ditx recipes\n"
        "  ditx recipes show image/digits train.batch_size=8 > my-digits.yaml\n"
        "  ditx train my-digits.yaml",
    )
    recipes.set_defaults(func=run_recipes_list)
    actions = _subparsers(recipes, "action", "actions", required=False)
    listing = actions.add_parser("list", help="list shipped recipes (the default)", description="List shipped recipes.")
    listing.set_defaults(func=run_recipes_list)
    show = _add_command(
        actions,
        "show",
        help="print a recipe resolved, as YAML",
        description="Print the resolved recipe as YAML on stdout: every section with its defaults, the\n"
        "overrides applied and everything validated. The output is itself a recipe: save it to a\n"
        "file, edit it and pass the path to `ditx train`.",
        epilog="example:\n  ditx recipes show image/digits train.batch_size=8 model.layout='[[height, width], all]'",
    )
    show.add_argument("recipe", metavar="RECIPE", help="a shipped recipe name (e.g. image/digits) or a .yaml path")
    _add_overrides(show)
    show.set_defaults(func=run_recipes_show)


def run_recipes_list(args: argparse.Namespace) -> int:
    from ditx.recipe import list_recipes, recipes_root

    recipes = list_recipes()
    if not recipes:
        print(f"no recipes found in {recipes_root()}", file=sys.stderr)
        return 0
    width = max(len(name) for name in recipes)
    for name, description in recipes.items():
        print(f"{name:<{width}}  {description}".rstrip())
    return 0


def run_recipes_show(args: argparse.Namespace) -> int:
    recipe = _load_recipe(args.recipe, args.overrides)
    print(f"# {recipe.name or args.recipe} ({recipe.source})")
    if args.overrides:
        print(f"# overrides: {' '.join(args.overrides)}")
    print(recipe.to_yaml(), end="")
    return 0


# ---------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------


DEFAULT_RECIPE = "image/digits"


def add_train_parser(subparsers) -> None:
    train = _add_command(
        subparsers,
        "train",
        help="train a recipe (resumable)",
        description="Train the DiT of a recipe. The run directory gets the resolved config.yaml, checkpoints/,\n"
        "metrics.jsonl, logs and preview samples/. By default it is a new folder\n"
        "<train.output_dir>/<recipe>-<date>-<time> (train.output_dir defaults to runs/).\n"
        "For several processes, start it with `accelerate launch --multi_gpu --num_processes N -m ditx.cli train ...`\n"
        "(on CPU-only machines too: the processes then talk through gloo).",
        epilog="examples:\n"
        "  ditx train image/digits\n"
        "  ditx train image/digits train.steps=300 train.batch_size=64 --run-dir runs/quick\n"
        "  ditx train image/digits --run-dir runs/quick --resume   # continue after an interruption",
    )
    train.add_argument(
        "recipe",
        metavar="RECIPE",
        nargs="?",
        default=DEFAULT_RECIPE,
        help=f"a shipped recipe name or a .yaml path (default: {DEFAULT_RECIPE}, the tiny CPU recipe)",
    )
    _add_overrides(train)
    train.add_argument(
        "--run-dir", type=Path, default=None, metavar="DIR", help="where the run is written (default: a new folder)"
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest complete checkpoint in --run-dir (default: the newest run of this recipe)",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in a --run-dir that holds an earlier run, deleting it (without this, or --resume, "
        "such a folder is refused before anything is written)",
    )
    train.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    if "=" in args.recipe and not args.recipe.endswith((".yaml", ".yml")):  # `ditx train key=value ...`
        args.overrides, args.recipe = [args.recipe, *args.overrides], DEFAULT_RECIPE
    recipe = _load_recipe(args.recipe, args.overrides)  # bad config fails before the trainer imports
    from ditx.pipeline import train_recipe

    run_dir = train_recipe(recipe, run_dir=args.run_dir, resume=args.resume, overwrite=args.overwrite)
    print(run_dir)
    return 0


# ---------------------------------------------------------------------------------------
# sample
# ---------------------------------------------------------------------------------------


def add_sample_parser(subparsers) -> None:
    sample = _add_command(
        subparsers,
        "sample",
        help="generate samples from a trained run or a model",
        description="Generate samples with the recipe's `sample` section (scheduler, steps, guidance) and write\n"
        "them as the modality's files (e.g. a PNG grid for images). PATH is a run directory (its\n"
        "newest complete checkpoint and its config.yaml are used), one of its checkpoints, or a ditx\n"
        "model directory (e.g. from `ditx convert`), which needs --recipe. By default the files go to\n"
        "PATH/samples/sample_<scheduler>_<steps>/; the output folder is printed at the end.",
        epilog="examples:\n"
        "  ditx sample runs/image-digits-20250101-120000 --num 40 sample.guidance_scale=4.0\n"
        "  ditx sample out/dit-xl-2-256 --recipe my-imagenet-256.yaml --out samples/xl\n"
        '  ditx sample runs/video-moving-digits-text-20250101-120000 --prompt "a 7 moving left and right" --num 4\n'
        "  ditx sample RUN --prompts prompts.txt --negative-prompt \"blurry\" sample.guidance_scale=6\n"
        "  ditx sample RUN --first-frame digit.png --num 4          # image-to-video (train.frame_masks)\n"
        "  ditx sample RUN --first-frame a.png --last-frame b.png   # interpolation\n"
        "  ditx sample RUN --extend clip.mp4 --frames 4             # keep 4 frames, generate the rest",
    )
    sample.add_argument("path", type=Path, metavar="CHECKPOINT_OR_RUN", help="run, checkpoint or model directory")
    _add_overrides(sample)
    sample.add_argument(
        "--num", type=int, default=None, metavar="N", help="how many samples (default: sample.num_samples)"
    )
    sample.add_argument("--out", type=Path, default=None, metavar="DIR", help="output folder (default: see above)")
    sample.add_argument(
        "--recipe",
        default=None,
        metavar="NAME_OR_PATH",
        help="recipe to sample with (default: the run's config.yaml; required for a model directory)",
    )
    sample.add_argument(
        "--format",
        default=None,
        metavar="FORMAT",
        help="an extra output format of the modality, e.g. npz (images: ADM evaluation-suite samples.npz)",
    )
    sample.add_argument(
        "--overwrite", action="store_true", help="replace the files of an output folder that already holds some"
    )
    sample.add_argument(
        "--prompt", action="append", default=None, metavar="TEXT",
        help="text recipes: a prompt to sample (repeat for more); with --num N the prompts are taken in turn",
    )  # fmt: skip
    sample.add_argument(
        "--prompts", type=Path, default=None, metavar="FILE",
        help="text recipes: prompts from a file, one per line (or a .json list), after any --prompt",
    )  # fmt: skip
    sample.add_argument(
        "--negative-prompt", default=None, metavar="TEXT",
        help="text recipes: guide away from this caption instead of the empty one (sample.negative_prompt)",
    )  # fmt: skip
    for flag, metavar, text in (  # given frames (video models trained with train.frame_masks)
        ("--first-frame", "IMAGE", "video models trained with train.frame_masks: clips that start from this image"),
        ("--last-frame", "IMAGE", "...that end on this image (with --first-frame: interpolation between the two)"),
        ("--extend", "CLIP", "...that continue this clip: its first --frames N frames are kept, the rest generated"),
    ):
        sample.add_argument(flag, type=Path, default=None, metavar=metavar, help=text)
    sample.add_argument("--frames", type=int, default=None, metavar="N", help="with --extend: frames of CLIP kept")
    sample.set_defaults(func=run_sample)


def run_sample(args: argparse.Namespace) -> int:
    overrides = _check_overrides(args.overrides)
    if args.num is not None and args.num < 1:
        raise ValueError(f"--num must be at least 1, got {args.num}")
    from ditx.sample import sample_from

    prompts = list(args.prompt or []) + (read_prompts(args.prompts) if args.prompts else [])
    out = sample_from(
        args.path, num=args.num, out=args.out, recipe=args.recipe, overrides=overrides, fmt=args.format,
        overwrite=args.overwrite, prompts=prompts or None, negative_prompt=args.negative_prompt,
        first_frame=args.first_frame, last_frame=args.last_frame, extend=args.extend, extend_frames=args.frames,
    )
    print(out)
    return 0


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: a JSON list of strings (``.json``), else one prompt per line (blank lines skipped)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        prompts = json.loads(text)
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts file {str(path)!r} must hold a JSON list of strings")
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {str(path)!r} holds no prompt")
    return prompts


# ---------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------


def add_eval_parser(subparsers) -> None:
    evaluate = _add_command(
        subparsers,
        "eval",
        help="compute a run's metrics",
        description="Evaluate a trained run with the metrics of its recipe's `eval` section (eval.metrics,\n"
        "eval.num_samples, ...) on samples from its newest complete checkpoint. The metrics are\n"
        "printed as JSON on stdout and written, with the protocol used (checkpoint, scheduler, seed,\n"
        "...), to RUN/metrics.json or --out.",
        epilog="examples:\n"
        "  ditx eval runs/image-digits-20250101-120000\n"
        "  ditx eval runs/image-digits-20250101-120000 eval.num_samples=200 --out digits-eval.json",
    )
    evaluate.add_argument("run", type=Path, metavar="RUN", help="a run directory written by `ditx train`")
    _add_overrides(evaluate)
    evaluate.add_argument(
        "--out", type=Path, default=None, metavar="FILE", help="where the metrics JSON goes (default: RUN/metrics.json)"
    )
    evaluate.set_defaults(func=run_eval)


def _json_value(value):
    """Tensors and numpy scalars/arrays as plain numbers and lists, paths as strings."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def run_eval(args: argparse.Namespace) -> int:
    overrides = _check_overrides(args.overrides)
    from ditx.evaluate import evaluate_run

    metrics = evaluate_run(args.run, overrides=overrides, out=args.out)
    print(json.dumps(metrics, indent=2, default=_json_value))
    return 0


# ---------------------------------------------------------------------------------------
# cache-latents
# ---------------------------------------------------------------------------------------


def add_cache_latents_parser(subparsers) -> None:
    cache = _add_command(
        subparsers,
        "cache-latents",
        help="encode a recipe's dataset with its autoencoder once, for faster training",
        description="Run the recipe's autoencoder over its whole dataset once and store the latents in\n"
        "safetensors shards. Training reads the cache when train.latent_cache points at it, so the\n"
        "autoencoder is not run at every step. The output folder defaults to train.latent_cache, or\n"
        "cache/<recipe> when that is not set; it is printed at the end. Rerunning with the same\n"
        "settings reuses finished shards.",
        epilog="examples:\n"
        "  ditx cache-latents my-imagenet-256.yaml --out cache/imagenet-256\n"
        "  ditx train my-imagenet-256.yaml train.latent_cache=cache/imagenet-256",
    )
    cache.add_argument("recipe", metavar="RECIPE", help="a shipped recipe name (e.g. image/digits) or a .yaml path")
    _add_overrides(cache)
    cache.add_argument("--out", type=Path, default=None, metavar="DIR", help="cache folder (default: see above)")
    cache.add_argument(
        "--overwrite",
        action="store_true",
        help="delete a folder that holds a cache for other settings (or other files) and encode afresh",
    )
    cache.set_defaults(func=run_cache_latents)


def run_cache_latents(args: argparse.Namespace) -> int:
    recipe = _load_recipe(args.recipe, args.overrides)
    from ditx.cache import cache_latents

    print(cache_latents(recipe, out=args.out, overwrite=args.overwrite))
    return 0


# ---------------------------------------------------------------------------------------
# train-autoencoder
# ---------------------------------------------------------------------------------------


def add_train_autoencoder_parser(subparsers) -> None:
    parser = _add_command(
        subparsers,
        "train-autoencoder",
        help="train a recipe's autoencoder from scratch on its dataset",
        description="Train the recipe's autoencoder (e.g. sd-vae with `config: tiny`) from scratch on the\n"
        "recipe's dataset, with the settings of its `autoencoder_train` section. The output folder\n"
        "(default: autoencoder_train.out, or <train.output_dir>/<recipe>-autoencoder) gets the\n"
        "autoencoder's save_pretrained files, a reconstruction preview/ and metrics.json\n"
        "(held-out MSE/PSNR); it is printed at the end. Then point autoencoder.pretrained at it.",
        epilog="examples:\n"
        "  ditx train-autoencoder my-latent-digits.yaml autoencoder_train.steps=2000 --out vae/digits\n"
        "  ditx train my-latent-digits.yaml autoencoder.pretrained=vae/digits autoencoder.config=null",
    )
    parser.add_argument("recipe", metavar="RECIPE", help="a shipped recipe name (e.g. image/digits) or a .yaml path")
    _add_overrides(parser)
    parser.add_argument("--out", type=Path, default=None, metavar="DIR", help="output folder (default: see above)")
    parser.add_argument("--overwrite", action="store_true", help="replace the output folder if it already exists")
    parser.set_defaults(func=run_train_autoencoder)


def run_train_autoencoder(args: argparse.Namespace) -> int:
    recipe = _load_recipe(args.recipe, args.overrides)
    from ditx.train_autoencoder import train_autoencoder

    print(train_autoencoder(recipe, out=args.out, overwrite=args.overwrite))
    return 0


# ---------------------------------------------------------------------------------------
# env
# ---------------------------------------------------------------------------------------


def add_env_parser(subparsers) -> None:
    env = _add_command(
        subparsers,
        "env",
        help="print what a bug report needs (versions, usable modalities, attention backends, hardware)",
        description="Print the versions of ditx, Python, torch and the other packages; which modalities are\n"
        "usable here and, for each unusable one, what is missing and how to install it; the attention\n"
        "backends that run here (a tiny call checked against math attention, xformers' probe included);\n"
        "the CPU/GPU, bf16 support and thread count. Paste it into bug reports.",
        epilog="examples:\n  ditx env\n  ditx env --json > env.json",
    )
    env.add_argument("--json", action="store_true", help="print the report as JSON")
    env.set_defaults(func=run_env)


def run_env(args: argparse.Namespace) -> int:
    from ditx.env import collect_env, format_env

    report = collect_env()
    print(json.dumps(report, indent=2) if args.json else format_env(report), end="\n" if args.json else "")
    return 0


# ---------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------

COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_recipes_parser,
    add_train_parser,
    add_sample_parser,
    add_eval_parser,
    add_cache_latents_parser,
    add_train_autoencoder_parser,
    add_convert_parser,
    add_env_parser,
]


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


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Like ``parse_args``, but overrides may also come after options (``RECIPE --resume k=v``)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(a.startswith("-") for a in extra):
            getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines()]
    return " ".join(line for line in lines if line) or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ditx`` command line; returns the exit code (0 ok, 2 bad input, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = _parse(parser, argv)
    subcommand = getattr(args, "source", None) or getattr(args, "action", None)
    command = " ".join(filter(None, ("ditx", args.command, subcommand)))
    try:
        # freed CPU tensors stay mapped for the next step (no page faults per activation)
        reuse_freed_memory()
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        print(f"{command}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        message = f"{command}: interrupted"
        if args.command == "train":
            again = argv if "--resume" in argv else [*argv, "--resume"]
            message += f"; continue from the last checkpoint with: ditx {shlex.join(again)}"
        print(message, file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
