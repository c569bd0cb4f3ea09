"""The ``milkit`` command: one console script, one subcommand per stage."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from milkit import __version__
from milkit.errors import MilkitError

Handler = Callable[[argparse.Namespace], int]


class _ListEncoders(argparse.Action):
    """``--list-encoders``: print the named encoder presets and exit (no other argument needed)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        from milkit.features.encoder_presets import presets_help

        print(
            "Encoder presets (name, feature size, weights, licence); --encoder also takes any "
            "timm model name, hf-hub:ORG/NAME or local-dir:PATH.\n" + presets_help()
        )
        parser.exit()


def _add_synth(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "synth",
        help="write a synthetic cohort of H&E-like slides with ground truth",
        description="Write pyramidal TIFF slides that OpenSlide opens, labels.csv and ground-truth "
        "maps (tumour, stroma, lymphocyte density) for tests, demos and benchmarks.",
    )
    parser.add_argument("out", type=Path, help="output folder (slides/, truth/, labels.csv)")
    parser.add_argument("--n-slides", type=int, default=8, help="number of slides (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--mpp", type=float, default=0.5, help="scan resolution, µm/px (default 0.5)"
    )
    parser.add_argument(
        "--size-px", type=int, nargs=2, metavar=("W", "H"), default=(6000, 6000),
        help="level-0 size in pixels (default 6000 6000)",
    )  # fmt: skip
    parser.add_argument("--no-artefacts", action="store_true", help="no pen marks or dust")
    parser.add_argument(
        "--stain-spread", type=float, default=None,
        help="per-slide stain strength varies by up to ±this fraction (default 0.15, one lab; "
        "0.5 mimics a cohort pooled from several sites)",
    )  # fmt: skip
    parser.add_argument(
        "--workers", type=int, default=1, help="slides rendered in parallel processes"
    )
    parser.set_defaults(handler=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from milkit.synth import make_cohort
    from milkit.synth.layout import ONE_LAB_STAIN_SPREAD

    # the default lives with the slides; the parser stays free of numpy imports
    spread = ONE_LAB_STAIN_SPREAD if args.stain_spread is None else args.stain_spread
    with tqdm(total=args.n_slides, desc="synth", unit="slide") as bar:
        labels = make_cohort(
            args.out,
            n_slides=args.n_slides,
            seed=args.seed,
            mpp=args.mpp,
            size_px=tuple(args.size_px),
            artefacts=not args.no_artefacts,
            stain_spread=spread,
            workers=args.workers,
            progress=bar.update,
        )
    print(f"milkit synth: {args.n_slides} slide(s) in {args.out / 'slides'}, labels in {labels}")
    return 0


def _add_tiling_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``tile`` and ``preprocess``: what to tile and how to run the batch."""
    parser.add_argument("slides_dir", type=Path, help="folder of slides (searched recursively)")
    parser.add_argument("out_dir", type=Path, help="output folder")
    parser.add_argument(
        "--mpp", type=float, default=0.5, help="resolution to tile at, µm/px (default 0.5 = 20x)"
    )
    parser.add_argument(
        "--tile-size", type=int, default=224, help="tile side in pixels at --mpp (default 224)"
    )
    parser.add_argument(
        "--overlap", type=int, default=0, help="overlap of neighbouring tiles, px at --mpp"
    )
    parser.add_argument(
        "--min-tissue",
        type=float,
        default=0.25,
        help="keep tiles with at least this tissue fraction",
    )
    parser.add_argument(
        "--mpp-tolerance",
        type=float,
        default=0.05,
        help="relative mpp mismatch read without resampling (default 0.05)",
    )
    parser.add_argument(
        "--slide-mpp",
        type=float,
        default=None,
        help="scan resolution for slides whose files record none",
    )
    parser.add_argument(
        "--mpp-csv",
        type=Path,
        default=None,
        help="CSV slide_id,mpp with per-slide scan resolutions",
    )
    parser.add_argument(
        "--shard",
        default=None,
        metavar="I/N",
        help="process only shard I of N (0-based), for cluster arrays",
    )
    parser.add_argument("--no-recursive", action="store_true", help="do not search sub-folders")
    parser.add_argument(
        "--slide-id-from",
        choices=("stem", "relative-path"),
        default="stem",
        help="slide ids (which name every output file and the labels CSV rows): the file name "
        "without extension (default), or the path below the slide folder with folders joined "
        "by '__' (siteA/case1.svs -> siteA__case1), for folders that reuse file names",
    )


def _tiling_job(
    args: argparse.Namespace,
) -> tuple[Any, dict[str, Path], tuple[int, int], dict[str, float] | None]:
    """Tiling options, this shard's slides (id -> file), the shard and per-slide mpps from
    ``tile``/``preprocess`` args."""
    from milkit.pipeline.batch import parse_shard, take_shard
    from milkit.pipeline.tile import TilingOptions, read_mpp_csv
    from milkit.slides.folder import find_slides_by_id

    options = TilingOptions(
        target_mpp=args.mpp,
        tile_size_px=args.tile_size,
        overlap_px=args.overlap,
        min_tissue=args.min_tissue,
        mpp_tolerance=args.mpp_tolerance,
        slide_mpp=args.slide_mpp,
    )
    shard = parse_shard(args.shard)
    found = find_slides_by_id(
        args.slides_dir, id_from=args.slide_id_from, recursive=not args.no_recursive
    )
    slides = dict(take_shard(list(found.items()), *shard))
    mpp_by_slide = read_mpp_csv(args.mpp_csv) if args.mpp_csv else None
    return options, slides, shard, mpp_by_slide


def _batch_os_error(command: str, out_dir: Path, slide_ids: Iterable[str], exc: OSError) -> int:
    """One line for an OS error that stopped a batch (disk full, a folder gone, permissions),
    after removing the half-written files of this run's slides; finished files stay.

    Returns:
        The exit code, 1.
    """
    from milkit.atomic import TMP_SUFFIX

    mine = {f"{slide_id}.h5{TMP_SUFFIX}" for slide_id in slide_ids}
    for folder in ("coords", "features"):  # another shard's files in progress are not ours
        for leftover in (out_dir / folder).glob(f"*{TMP_SUFFIX}"):
            if leftover.name in mine:
                leftover.unlink(missing_ok=True)
    where = f" ({exc.filename})" if exc.filename else ""
    fix = "free some space" if exc.errno == errno.ENOSPC else "fix the cause"
    print(
        f"milkit {command}: error: {exc.strerror or exc}{where}. Finished slides are kept: "
        f"{fix} and rerun the same command to do the rest (errors so far: "
        f"{out_dir / 'errors.csv'}).",
        file=sys.stderr,
    )
    return 1


def _add_tile(subparsers: argparse._SubParsersAction) -> None:
    from milkit.pipeline.tile import default_workers

    parser = subparsers.add_parser(
        "tile",
        help="detect tissue and write tile coordinates for a folder of slides",
        description="Tissue detection and tiling at a physical resolution. Writes OUT/coords/"
        "<slide>.h5, OUT/masks/, OUT/thumbnails/, OUT/errors.csv; finished slides are skipped.",
    )
    _add_tiling_arguments(parser)
    parser.add_argument(
        "--workers", type=int, default=default_workers(), help="slides tiled in parallel"
    )
    parser.set_defaults(handler=_run_tile)


def _run_tile(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from milkit.pipeline.tile import run_tiling

    options, slides, shard, mpp_by_slide = _tiling_job(args)
    try:
        with tqdm(total=len(slides), desc="tile", unit="slide") as bar:
            summary, errors_path = run_tiling(
                slides, args.out_dir, options, mpp_by_slide=mpp_by_slide, workers=args.workers,
                shard=shard, progress=bar.update,
            )  # fmt: skip
    except OSError as exc:
        return _batch_os_error("tile", args.out_dir, slides, exc)
    print(summary.format(errors_path=errors_path))
    return 1 if summary.failed else 0


def _add_preprocess(subparsers: argparse._SubParsersAction) -> None:
    from milkit.pipeline.tile import default_workers

    parser = subparsers.add_parser(
        "preprocess",
        help="tile a folder of slides and extract tile features to HDF5",
        description="Tiling (reusing finished coordinate files) and feature extraction. Writes "
        "OUT/features/<slide>.h5 (docs/design.md §4); resumable; finished files whose encoder, "
        "weights, tile spec and dtype match are skipped, anything else is recomputed.",
    )
    _add_tiling_arguments(parser)
    parser.add_argument(
        "--encoder",
        default="vit_small_patch16_224",
        help="timm name, hf-hub:ORG/NAME, local-dir:PATH or a preset (see --list-encoders)",
    )
    parser.add_argument(
        "--list-encoders", action=_ListEncoders, help="print the encoder presets and exit"
    )
    parser.add_argument(
        "--encoder-weights",
        type=Path,
        default=None,
        help="local checkpoint (.safetensors or torch weights) for the encoder",
    )
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="randomly initialised encoder (tests and demos; recorded in the files)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of --random-weights: the same seed gives the same encoder (and features); "
        "files from another seed are stale and recomputed",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="tiles per forward pass")
    parser.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="DataLoader workers reading tiles (default: one per core but one)",
    )
    parser.add_argument(
        "--precision",
        choices=("auto", "bf16", "fp16", "fp32"),
        default="auto",
        help="autocast precision (auto: bf16 where the device supports it)",
    )
    parser.add_argument(
        "--dtype", choices=("float16", "float32"), default="float16", help="stored feature dtype"
    )
    parser.add_argument(
        "--device", default=None, help="torch device (default: cuda if available, else cpu)"
    )
    parser.add_argument(
        "--devices",
        type=int,
        default=1,
        help="processes/GPUs through Lightning; each slide is written by one of them",
    )
    parser.add_argument("--num-nodes", type=int, default=1, help="nodes for multi-node extraction")
    parser.add_argument(
        "--tiling-workers", type=int, default=default_workers(), help="slides tiled in parallel"
    )
    parser.set_defaults(handler=_run_preprocess)  # fmt: skip


def _run_preprocess(args: argparse.Namespace) -> int:
    import torch

    from milkit.features.encoders import load_encoder
    from milkit.features.extract import ExtractionOptions, default_loader_workers
    from milkit.pipeline.preprocess import run_preprocess

    tiling, slides, shard, mpp_by_slide = _tiling_job(args)
    extraction = ExtractionOptions(
        batch_size=args.batch_size,
        num_workers=default_loader_workers() if args.num_workers is None else args.num_workers,
        precision=args.precision,
        dtype=args.dtype,
    )
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    encoder = load_encoder(
        args.encoder,
        pretrained=not args.random_weights,
        weights_path=args.encoder_weights,
        seed=args.seed,
    )
    try:
        tile_summary, feature_summary, errors_path = run_preprocess(
            slides, args.out_dir, encoder, tiling=tiling, extraction=extraction,
            mpp_by_slide=mpp_by_slide, device=device, tiling_workers=args.tiling_workers,
            shard=shard, devices=args.devices, num_nodes=args.num_nodes,
        )  # fmt: skip
    except OSError as exc:
        return _batch_os_error("preprocess", args.out_dir, slides, exc)
    print(tile_summary.format(errors_path=errors_path))
    print(feature_summary.format(errors_path=errors_path))
    return 1 if tile_summary.failed or feature_summary.failed else 0


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the whole flow on built-in synthetic slides (offline)",
        description="synth -> tile -> features -> MIL heads -> heatmaps on a synthetic cohort, "
        "ending with a table of results. Rerunning reuses finished stages.",
    )
    parser.add_argument(
        "out",
        type=Path,
        nargs="?",
        default=Path("milkit-demo"),
        help="output folder (default ./milkit-demo)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smaller cohort and encoder (about 3 minutes on 2 cores)",
    )
    parser.add_argument(
        "--pretrain",
        action="store_true",
        help="pretrain the small DINO recipe on the cohort's tiles and extract with it instead "
        "of a random ViT (about 7 more minutes on 2 cores, 2.5 with --quick)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.set_defaults(handler=_run_demo)  # fmt: skip


def _add_configs(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "configs",
        help="list the configs that ship with milkit (--config NAME finds them anywhere)",
        description="The packaged YAML configs: pass a name (--config abmil) or a path inside "
        "the folder (--config experiments/abmil.yaml); a file that exists is used as given.",
    )
    parser.set_defaults(handler=_run_configs)


def _run_configs(args: argparse.Namespace) -> int:
    from milkit.configs import configs_listing

    print(configs_listing())
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from milkit.demo import run_demo

    run_demo(args.out, quick=args.quick, seed=args.seed, pretrain=args.pretrain)
    return 0


def _add_heatmap(subparsers: argparse._SubParsersAction) -> None:
    from milkit.pipeline import heatmap_command as command

    parser = subparsers.add_parser("heatmap", help=command.HELP, description=command.DESCRIPTION)
    command.add_arguments(parser)
    parser.set_defaults(handler=command.run)


_COMMANDS = (_add_synth, _add_tile, _add_preprocess, _add_heatmap, _add_demo, _add_configs)


#: Subcommands parsed by LightningCLI/jsonargparse: ``module:function`` taking the remaining argv.
_LIGHTNING_COMMANDS = {
    "fit": (
        "milkit.training.cli",
        "run_lightning",
        "train a MIL head (LightningCLI; --config YAML)",
    ),
    "validate": ("milkit.training.cli", "run_lightning", "validate a checkpoint"),
    "test": ("milkit.training.cli", "run_lightning", "test a checkpoint"),
    "predict": ("milkit.training.cli", "run_lightning", "write prediction files of a checkpoint"),
    "cv": (
        "milkit.training.cv",
        "main",
        "K-fold x R cross-validation with a summary of every metric",
    ),
    "continual": (
        "milkit.training.continual.run",
        "main",
        "continual MIL over a task sequence (CoMEL)",
    ),
    "pretrain": (
        "milkit.ssl.pretrain",
        "main",
        "DINO pretraining of a ViT on tiles; exports local-dir:",
    ),
}
#: Of those, the ones whose entry point wants the subcommand itself as its first argument.
_KEEPS_SUBCOMMAND = {"fit", "validate", "test", "predict"}


def _run_lightning_command(argv: list[str]) -> int:
    import importlib

    from milkit.configs import resolve_config_args

    module_name, function, _ = _LIGHTNING_COMMANDS[argv[0]]
    entry = getattr(importlib.import_module(module_name), function)
    argv = resolve_config_args(argv)  # packaged configs by name, from any folder
    return int(entry(argv if argv[0] in _KEEPS_SUBCOMMAND else argv[1:]))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every non-Lightning subcommand."""
    parser = argparse.ArgumentParser(
        prog="milkit",
        description="Weakly supervised computational pathology: slides -> tiles -> features -> "
        "MIL heads -> heatmaps.",
    )
    parser.add_argument("--version", action="version", version=f"milkit {__version__}")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show every message of the libraries milkit uses (given before the subcommand)",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _COMMANDS:
        add(subparsers)
    for name, (_, _, help_text) in _LIGHTNING_COMMANDS.items():
        # Listed for --help only: main() hands these to their jsonargparse parsers (see `milkit NAME --help`).
        subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``milkit`` command.

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit code: 0 on success, 1 when a slide or step failed, 2 on bad usage.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--verbose"]:  # every third-party message too (milkit.training.quiet)
        argv = argv[1:]
        os.environ["MILKIT_VERBOSE"] = "1"
    if argv and argv[0] in _LIGHTNING_COMMANDS:
        return _run_lightning_command(argv)
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except MilkitError as exc:
        print(f"milkit {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
