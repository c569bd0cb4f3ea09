"""The ``milkit heatmap RUN_DIR`` command: its arguments and its run.

``milkit.cli`` adds a ``heatmap`` subparser, calls :func:`add_arguments` on it and dispatches to
:func:`run`; the work itself is :func:`milkit.pipeline.heatmap.render_run`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from milkit.heatmaps.colour import DEFAULT_CMAP, NORMALIZE_MODES
from milkit.heatmaps.render import DEFAULT_MAX_SIZE_PX
from milkit.pipeline.heatmap import HeatmapOptions, prediction_files, render_run

#: One line for the subcommand list of ``milkit --help``.
HELP = "heatmaps, top tiles and QuPath GeoJSON for every prediction file of a run"
#: The subcommand's description in ``milkit heatmap --help``.
DESCRIPTION = (
    "Draws the per-tile values of RUN_DIR/predictions/<slide_id>.h5 over each slide (no features "
    "are re-extracted). Writes RUN_DIR/heatmaps/<slide_id>/: <value>.png, <value>_figure.png "
    "(slide | heatmap with a colour bar), <value>_tiles.png (top and bottom tiles), "
    "tiles.geojson and tissue.geojson for QuPath; failures go to RUN_DIR/heatmaps/errors.csv."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``milkit heatmap`` arguments to a (sub)parser."""
    from milkit.pipeline.tile import default_workers

    parser.add_argument("run_dir", type=Path, help="run folder holding predictions/<slide_id>.h5")
    parser.add_argument(
        "--slides-dir",
        type=Path,
        default=None,
        help="folder of slides, found by slide id (default: the files' slide_path attribute)",
    )
    parser.add_argument(
        "--slides", nargs="+", default=None, metavar="SLIDE_ID", help="only these slides"
    )
    parser.add_argument(
        "--value",
        action="append",
        default=None,
        dest="values",
        metavar="SPEC",
        help="what to draw, repeatable: attention[:head], score[:class], tile_score[:class] "
        "(default: attention and the score of interest)",
    )
    parser.add_argument(
        "--normalize",
        choices=NORMALIZE_MODES,
        default="auto",
        help="raw: fixed range (--range); rank: percentile within the slide; minmax: the slide's "
        "range; auto: rank for attention, raw for probabilities and regression (default)",
    )
    parser.add_argument(
        "--range",
        type=float,
        nargs=2,
        default=None,
        metavar=("VMIN", "VMAX"),
        help="value range of --normalize raw, in the value's units",
    )
    parser.add_argument(
        "--cmap", default=DEFAULT_CMAP, help=f"matplotlib colour map (default {DEFAULT_CMAP})"
    )
    parser.add_argument(
        "--alpha", type=float, default=0.5, help="opacity of the colours (default 0.5)"
    )
    parser.add_argument(
        "--smooth",
        type=float,
        default=0.0,
        metavar="TILES",
        help="Gaussian smoothing sigma in tile sides (default 0: none)",
    )
    parser.add_argument(
        "--no-tissue-mask",
        action="store_true",
        help="colour wherever tiles are, not only on tissue",
    )
    parser.add_argument(
        "--max-size",
        type=int,
        default=DEFAULT_MAX_SIZE_PX,
        help=f"longest side of the heatmaps in pixels (default {DEFAULT_MAX_SIZE_PX})",
    )
    parser.add_argument("--top-k", type=int, default=8, help="top and bottom tiles shown (0: none)")
    parser.add_argument("--no-geojson", action="store_true", help="skip the QuPath GeoJSON files")
    parser.add_argument(
        "--object-type",
        choices=("tile", "detection"),
        default="tile",
        help="QuPath object type of the tiles (default tile)",
    )
    parser.add_argument(
        "--slide-mpp", type=float, default=None, help="scan µm/px of slides that record none"
    )
    parser.add_argument("--workers", type=int, default=default_workers(), help="slides rendered in parallel")  # fmt: skip


def options_from_args(args: argparse.Namespace) -> HeatmapOptions:
    """The :class:`HeatmapOptions` of parsed ``milkit heatmap`` arguments."""
    return HeatmapOptions(
        values=tuple(args.values or ()),
        normalize=args.normalize,
        value_range=tuple(args.range) if args.range else None,
        cmap=args.cmap,
        alpha=args.alpha,
        smooth_sigma_tiles=args.smooth,
        tissue_only=not args.no_tissue_mask,
        max_size_px=args.max_size,
        top_k=args.top_k,
        geojson=not args.no_geojson,
        object_type=args.object_type,
        slide_mpp=args.slide_mpp,
    )


def run(args: argparse.Namespace) -> int:
    """Run ``milkit heatmap`` with parsed arguments; returns the exit code (1 if a slide failed)."""
    from tqdm import tqdm

    options = options_from_args(args)
    n_files = len(args.slides) if args.slides else len(prediction_files(args.run_dir))
    with tqdm(total=n_files, desc="heatmap", unit="slide") as bar:
        summary, errors_path = render_run(
            args.run_dir, slides_dir=args.slides_dir, slides=args.slides, options=options,
            workers=args.workers, progress=bar.update,
        )  # fmt: skip
    print(summary.format(errors_path=errors_path))
    print(f"  heatmaps in {args.run_dir / 'heatmaps'}")
    return 1 if summary.failed else 0
