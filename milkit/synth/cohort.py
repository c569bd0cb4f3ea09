"""Synthetic slides on disk: one slide with its truth, or a whole labelled cohort.

A cohort folder looks like::

    <out>/slides/<slide_id>.svs     pyramidal JPEG TIFF (Aperio-style), OpenSlide opens it
    <out>/truth/<slide_id>.h5       class map and TIL density (milkit.synth.truth)
    <out>/labels.csv                slide_id, patient_id, label, tumor_fraction, stil_score, task

Everything is a function of the seed: the same call writes the same pixels and the same
``labels.csv`` bytes.
"""

from __future__ import annotations

import csv
import math
import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from milkit.atomic import atomic_write
from milkit.errors import ConfigError
from milkit.synth.layout import GRID_UM, ONE_LAB_STAIN_SPREAD, SlideParams, build_layout
from milkit.synth.organs import ORGANS, get_organ
from milkit.synth.pyramid import write_pyramid
from milkit.synth.render import SlideRenderer
from milkit.synth.truth import SlideTruth, load_truth, save_truth

LABEL_COLUMNS = ("slide_id", "patient_id", "label", "tumor_fraction", "stil_score", "task")
SLIDE_SUFFIX = ".svs"
_PAIRED_PATIENT_PROBABILITY = 0.3


@dataclass(frozen=True)
class SlideInfo:
    """What :func:`write_slide` wrote.

    Attributes:
        slide_path: The slide file.
        truth_path: Its ground-truth file.
        dimensions: ``(width, height)`` of level 0 in pixels.
        mpp: Microns per level-0 pixel.
        level_count: Number of pyramid levels.
        tumor_fraction: Tumour area / tissue area from the truth map.
        stil_score: 100 x mean TIL density over stroma from the truth map.
    """

    slide_path: Path
    truth_path: Path
    dimensions: tuple[int, int]
    mpp: float
    level_count: int
    tumor_fraction: float
    stil_score: float


def write_slide(
    path: str | Path,
    params: SlideParams,
    *,
    mpp: float = 0.5,
    size_px: tuple[int, int] | None = None,
    size_um: tuple[float, float] | None = None,
    truth_path: str | Path | None = None,
    quality: int = 90,
) -> SlideInfo:
    """Render one synthetic slide and its ground truth.

    The content is defined in µm: the same ``params`` and ``size_um`` at two ``mpp`` give two
    scans of the same tissue (e.g. ``size_um=(1500, 1500)`` at 0.25 and 0.5 µm/px).

    Args:
        path: Slide file to write (``.svs``; OpenSlide reads it by content).
        params: What the slide shows (seed, task, tumour, TIL level, artefacts).
        mpp: Microns per level-0 pixel ("scan" resolution).
        size_px: ``(width, height)`` of level 0 in pixels; the default is 6000 x 6000.
        size_um: ``(width, height)`` in µm instead of ``size_px``.
        truth_path: Where to write the truth; default ``<slide stem>.truth.h5`` beside it.
        quality: JPEG quality (1-100).

    Returns:
        Paths, geometry and the slide-level scores measured on the truth map.

    Raises:
        ConfigError: Both or neither sizes are usable, or ``mpp`` is not positive.
    """
    if not (math.isfinite(mpp) and mpp > 0):
        raise ConfigError(f"synthetic slide mpp must be positive, got {mpp!r}.")
    if size_px is not None and size_um is not None:
        raise ConfigError(
            "give the slide size either in pixels (size_px) or in µm (size_um), not both."
        )
    if size_um is None:
        width_px, height_px = size_px if size_px is not None else (6000, 6000)
        if width_px <= 0 or height_px <= 0:
            raise ConfigError(f"synthetic slide size must be positive, got {size_px} px.")
        size_um = (width_px * mpp, height_px * mpp)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    truth_path = (
        Path(truth_path) if truth_path is not None else path.with_name(f"{path.stem}.truth.h5")
    )

    layout = build_layout(params, size_um)
    renderer = SlideRenderer(layout, mpp)
    levels = write_pyramid(path, renderer.render, renderer.dimensions, mpp, quality=quality)
    truth = SlideTruth(
        class_map=layout.class_map,
        til_density=layout.til_density,
        downsample=GRID_UM / mpp,
        mpp=GRID_UM,
        attrs={
            "slide_id": path.stem,
            "task": params.task,
            "seed": int(params.seed),
            "tumor": bool(params.tumor),
            "slide_mpp": float(mpp),
            "level0_width": renderer.dimensions[0],
            "level0_height": renderer.dimensions[1],
            "size_um": list(layout.size_um),
        },
    )
    save_truth(truth, truth_path)
    return SlideInfo(
        slide_path=path,
        truth_path=truth_path,
        dimensions=renderer.dimensions,
        mpp=float(mpp),
        level_count=len(levels),
        tumor_fraction=truth.tumor_fraction,
        stil_score=truth.stil_score,
    )


@dataclass(frozen=True)
class CohortSlide:
    """One planned slide of a cohort."""

    slide_id: str
    patient_id: str
    params: SlideParams


def plan_cohort(
    n_slides: int,
    seed: int,
    *,
    tasks: Sequence[str],
    artefacts: bool,
    stain_spread: float = ONE_LAB_STAIN_SPREAD,
) -> list[CohortSlide]:
    """Decide every slide's parameters, before anything is rendered.

    Tasks go round-robin; within a task, labels alternate in a shuffled order (half tumour).
    Some patients (the first possible one, then about a third) get a second slide with the
    same task and label and a similar TIL level.

    Args:
        n_slides: Number of slides.
        seed: Cohort seed.
        tasks: Organ families to cycle through.
        artefacts: Whether slides may have pen marks and dust.
        stain_spread: Per-slide stain strength spread (`SlideParams.stain_spread`).

    Returns:
        The plan, in slide order.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC0]))
    task_of = [tasks[i % len(tasks)] for i in range(n_slides)]
    tumour_of: dict[int, bool] = {}
    for task in tasks:
        members = [i for i in range(n_slides) if task_of[i] == task]
        flags = rng.permutation([k % 2 == 0 for k in range(len(members))])
        tumour_of.update(zip(members, (bool(f) for f in flags), strict=True))

    patient_of: dict[int, int] = {}
    til_of: dict[int, float] = {}
    n_patients = n_pairs = 0
    open_patient: dict[tuple[str, bool], int] = {}  # last single-slide patient per (task, label)
    for i in range(n_slides):
        key = (task_of[i], tumour_of[i])
        partner = open_patient.pop(key, None)
        # the first chance always pairs, so any cohort with a repeated (task, label) has a pair
        if partner is not None and (rng.random() < _PAIRED_PATIENT_PROBABILITY or not n_pairs):
            n_pairs += 1
            patient_of[i] = patient_of[partner]
            til_of[i] = float(np.clip(til_of[partner] + rng.normal(0, 0.05), 0, 1))
            continue
        patient_of[i], n_patients = n_patients, n_patients + 1
        til_of[i] = float(rng.beta(0.9, 2.0))
        open_patient[key] = i

    width = max(3, len(str(n_slides - 1)))
    plan = []
    for i in range(n_slides):
        fraction = math.exp(rng.uniform(math.log(0.02), math.log(0.4)))
        params = SlideParams(
            seed=int(np.random.SeedSequence([seed, i]).generate_state(1)[0]),
            task=task_of[i],
            tumor=tumour_of[i],
            tumor_fraction=fraction if tumour_of[i] else None,
            til_level=til_of[i],
            artefacts=artefacts,
            stain_spread=stain_spread,
        )
        plan.append(
            CohortSlide(f"slide_{i:0{width}d}", f"patient_{patient_of[i]:0{width}d}", params)
        )
    return plan


def make_cohort(
    out_dir: str | Path,
    *,
    n_slides: int = 8,
    seed: int = 0,
    mpp: float = 0.5,
    size_px: tuple[int, int] = (6000, 6000),
    tasks: Sequence[str] = tuple(ORGANS),
    artefacts: bool = True,
    stain_spread: float = ONE_LAB_STAIN_SPREAD,
    quality: int = 90,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write a labelled cohort of synthetic slides with ground truth.

    Args:
        out_dir: Output folder (``slides/``, ``truth/``, ``labels.csv`` inside).
        n_slides: Number of slides (at least 2 per task gives both labels in each task).
        seed: Cohort seed; the same seed writes the same files.
        mpp: Microns per level-0 pixel of every slide.
        size_px: ``(width, height)`` of level 0 in pixels.
        tasks: Organ families, assigned round-robin.
        artefacts: Whether slides may carry pen marks and dust.
        stain_spread: How much staining strength varies between slides: hematoxylin and eosin
            are scaled by up to ``1 ± stain_spread`` per slide (default: one lab; 0.5: a cohort
            pooled from several sites).
        quality: JPEG quality (1-100).
        workers: Slides rendered in parallel processes.
        progress: Called with 1 after each finished slide (e.g. ``tqdm.update``).

    Returns:
        Path of ``labels.csv``.

    Raises:
        ConfigError: ``n_slides`` or ``workers`` is not positive, or a task is unknown.
    """
    if n_slides <= 0:
        raise ConfigError(f"n_slides must be positive, got {n_slides}.")
    if workers <= 0:
        raise ConfigError(f"workers must be positive, got {workers}.")
    if not tasks:
        raise ConfigError(f"tasks must name at least one of {', '.join(ORGANS)}.")
    for task in tasks:
        get_organ(task)
    out_dir = Path(out_dir)
    plan = plan_cohort(
        n_slides, seed, tasks=tuple(tasks), artefacts=artefacts, stain_spread=stain_spread
    )
    jobs = [
        (
            out_dir / "slides" / f"{s.slide_id}{SLIDE_SUFFIX}",
            s.params,
            out_dir / "truth" / f"{s.slide_id}.h5",
        )
        for s in plan
    ]
    if workers == 1:
        for slide_path, params, truth_path in jobs:
            write_slide(
                slide_path, params, mpp=mpp, size_px=size_px, truth_path=truth_path, quality=quality
            )
            if progress is not None:
                progress(1)
    else:
        # spawn: forking a process that holds threads (BLAS, torch) can deadlock the child
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [
                pool.submit(
                    write_slide, p, params, mpp=mpp, size_px=size_px, truth_path=t, quality=quality
                )
                for p, params, t in jobs
            ]
            for future in futures:
                future.result()
                if progress is not None:
                    progress(1)
    return _write_labels(out_dir / "labels.csv", plan, [truth for _, _, truth in jobs])


def _write_labels(path: Path, plan: list[CohortSlide], truth_paths: list[Path]) -> Path:
    """``labels.csv`` with scores measured on the saved truth maps."""
    with atomic_write(path, durable=False) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(LABEL_COLUMNS)
        for slide, truth_path in zip(plan, truth_paths, strict=True):
            truth = load_truth(truth_path)
            writer.writerow(
                [
                    slide.slide_id,
                    slide.patient_id,
                    "tumor" if slide.params.tumor else "normal",
                    f"{truth.tumor_fraction:.4f}",
                    f"{truth.stil_score:.2f}",
                    slide.params.task,
                ]
            )
    return path
