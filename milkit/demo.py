"""``milkit demo``: the whole flow on built-in synthetic slides, offline, on a laptop CPU.

synth -> tile -> features (a random ViT, or with ``--pretrain`` the small DINO recipe trained on
the cohort's own tiles) -> ABMIL and DSMIL cross-validation -> WeakSTIL regression -> a short
continual sequence -> heatmaps. Every stage calls the same functions as the corresponding
``milkit`` command; the demo ends with one table of results and the paths worth opening.
Rerunning reuses the finished cohort and features.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from milkit.configs import CONFIG_DIR
from milkit.errors import MilkitError
from milkit.slides.folder import find_slides


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of a demo run.

    Args:
        n_slides: Synthetic slides in the cohort.
        size_px: Level-0 size of each slide (0.5 µm/px).
        encoder: timm architecture used with random weights.
        folds: Cross-validation folds of the MIL and regression heads.
        max_epochs: Epochs per fold (the learning rate decays to 0 over them).
        heatmaps: Slides to draw heatmaps for.
        pretrain_steps: DINO optimiser steps with ``--pretrain``; None keeps the recipe's.
    """

    n_slides: int
    size_px: tuple[int, int]
    encoder: str
    folds: int
    max_epochs: int
    heatmaps: int
    pretrain_steps: int | None = None


# Many small slides rather than a few large ones: MIL needs bags more than tiles per bag.
FULL = DemoPlan(
    n_slides=60,
    size_px=(3000, 3000),
    encoder="vit_small_patch16_224",
    folds=5,
    max_epochs=40,
    heatmaps=4,
)
QUICK = DemoPlan(
    n_slides=36,
    size_px=(2500, 2500),
    encoder="vit_tiny_patch16_224",
    folds=3,
    max_epochs=25,
    heatmaps=2,
    pretrain_steps=200,  # a third of the recipe: the quick demo shows the flow, not the gain
)


@dataclass
class DemoReport:
    """Results and artefacts collected while the demo runs."""

    results: dict[str, str] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def format(self) -> str:
        """One screen: the results table, stage times and where to look."""
        width = max((len(k) for k in self.results), default=10)
        lines = ["", "milkit demo — results", "-" * (width + 30)]
        lines += [f"{name:<{width}}  {value}" for name, value in self.results.items()]
        lines += ["", "stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in self.seconds.items())]
        lines += ["", "open:"] + [f"  {name:<12} {path}" for name, path in self.paths.items()]
        return "\n".join(lines)


def _mean_sd(summary: dict, metric: str) -> str:
    entry = summary["metrics"].get(metric)
    if not entry or entry["mean"] is None:
        return "n/a"
    return f"{entry['mean']:.3f} ± {entry['sd'] or 0.0:.3f} ({entry['n']} folds)"


def _run_cv(argv: list[str]) -> dict:
    from milkit.training import cv

    out = Path(argv[argv.index("--out") + 1])
    if not (out / cv.SUMMARY_JSON).exists():
        if cv.main(argv) != 0:
            raise MilkitError(f"the demo's cross-validation failed: milkit cv {' '.join(argv)}")
    return json.loads((out / cv.SUMMARY_JSON).read_text())


def tile_auroc_of_run(run_dir: Path, *, value: str = "attention") -> float:
    """Tile AUROC of a CV run's held-out attention against the synthetic tumour truth.

    Pooled over every held-out slide of every fold; attention of multi-class models is taken
    for the last class (the positive one, ``tumor``).
    """
    import h5py

    from milkit.synth.annotate import auroc, read_tile_truth

    scores, labels = [], []
    for path in sorted(run_dir.glob("repeat*/fold*/predictions/*.h5")):
        with h5py.File(path, "r") as file:
            values = file[value][()]
            feature_file = file.attrs["feature_file"]
        truth = read_tile_truth(feature_file).get("tile_labels")
        if truth is None:
            continue
        scores.append(values[:, -1] if values.ndim == 2 else values)
        labels.append(truth)
    return auroc(np.concatenate(scores), np.concatenate(labels)) if scores else float("nan")


def _stage(report: DemoReport, name: str, run: Callable[[], None]) -> None:
    print(f"\n== {name} ==", flush=True)
    started = time.perf_counter()
    run()
    report.seconds[name] = time.perf_counter() - started


def run_demo(
    out_dir: Path, *, quick: bool = False, seed: int = 0, pretrain: bool = False
) -> DemoReport:
    """Run every stage on a synthetic cohort.

    Args:
        out_dir: Folder for everything the demo writes (reused: finished stages are skipped).
        quick: A smaller cohort, encoder and CV (about a third of the time).
        seed: Seed of the synthetic cohort and of training.
        pretrain: Pretrain ``configs/ssl/dino_tiny_cpu.yaml`` (DINO) on the cohort's tiles and
            extract features with it instead of a random ViT (adds about 7 minutes on 2 cores,
            2.5 with ``quick``).

    Returns:
        The report (also printed).
    """
    from milkit.features.encoders import load_encoder
    from milkit.features.extract import ExtractionOptions
    from milkit.pipeline.preprocess import run_preprocess
    from milkit.pipeline.tile import TilingOptions, default_workers
    from milkit.synth import make_cohort
    from milkit.synth.annotate import annotate_feature_files

    plan = QUICK if quick else FULL
    out_dir = Path(out_dir).resolve()
    report = DemoReport()
    cohort_dir, pre_dir, runs = out_dir / "cohort", out_dir / "preprocessed", out_dir / "runs"
    if pretrain:  # other features: other folders, so a random-encoder run is not reused
        pre_dir, runs = out_dir / "preprocessed_dino", out_dir / "runs_dino"
    dino_dir = out_dir / "dino"
    labels_csv, features_dir = cohort_dir / "labels.csv", pre_dir / "features"
    configs = CONFIG_DIR
    common = ["--data.features_dir", str(features_dir), "--data.labels_csv", str(labels_csv),
              "--folds", str(plan.folds), "--seed", str(seed), "--trainer.max_epochs", str(plan.max_epochs),
              "--data.num_workers", "0"]  # fmt: skip

    def synth() -> None:
        if labels_csv.exists():
            print(f"reusing the cohort in {cohort_dir}")
            return
        make_cohort(
            cohort_dir,
            n_slides=plan.n_slides,
            seed=seed,
            size_px=plan.size_px,
            workers=default_workers(),
        )
        print(f"{plan.n_slides} synthetic slides in {cohort_dir / 'slides'}")

    tiling = TilingOptions(target_mpp=0.5, tile_size_px=224)

    def self_supervised() -> None:
        from milkit.pipeline.tile import run_tiling
        from milkit.ssl import pretrain as pretrain_cli

        if (dino_dir / "encoder" / "config.json").is_file():
            print(f"reusing the pretrained encoder in {dino_dir / 'encoder'}")
            return
        slides = find_slides(cohort_dir / "slides")
        summary, errors = run_tiling(slides, pre_dir, tiling, workers=default_workers())
        if summary.failed:
            raise MilkitError(f"the demo's tiling failed; see {errors}")
        argv = ["--config", str(configs / "ssl" / "dino_tiny_cpu.yaml"),
                "--data.slides_dir", str(cohort_dir / "slides"),
                "--data.coords_dir", str(pre_dir / "coords"), "--out", str(dino_dir),
                "--seed_everything", str(seed)]  # fmt: skip
        if plan.pretrain_steps is not None:
            argv += ["--trainer.max_steps", str(plan.pretrain_steps)]
        if pretrain_cli.main(argv) != 0:
            raise MilkitError(f"the demo's pretraining failed: milkit pretrain {' '.join(argv)}")

    def preprocess() -> None:
        slides = find_slides(cohort_dir / "slides")
        if pretrain:
            encoder = load_encoder(f"local-dir:{dino_dir / 'encoder'}")
            encoder_note = "DINO-pretrained here"
        else:
            # the random encoder, and so the features, follow the seed
            encoder = load_encoder(plan.encoder, pretrained=False, seed=seed)
            encoder_note = f"{plan.encoder}, random weights"
        tile_summary, feature_summary, errors = run_preprocess(
            slides, pre_dir, encoder, tiling=tiling,
            extraction=ExtractionOptions(batch_size=64, num_workers=1),
            tiling_workers=default_workers(),
        )  # fmt: skip
        print(tile_summary.format(errors_path=errors))
        print(feature_summary.format(errors_path=errors))
        if tile_summary.failed or feature_summary.failed:
            raise MilkitError(f"the demo's preprocessing failed; see {errors}")
        annotate_feature_files(features_dir, cohort_dir / "truth")
        report.results["slides / tiles"] = (
            f"{len(slides)} / {feature_summary.n_tiles} ({encoder_note})"
        )
        report.paths["thumbnails"] = pre_dir / "thumbnails"

    def mil() -> None:
        for name in ("abmil", "dsmil"):
            run = runs / f"{name}_cv"
            summary = _run_cv(
                [
                    "--config",
                    str(configs / "experiments" / f"{name}.yaml"),
                    *common,
                    "--out",
                    str(run),
                ]
            )
            report.results[f"{name.upper()} bag AUROC"] = _mean_sd(summary, "auroc")
            report.results[f"{name.upper()} tile AUROC (attention vs tumour)"] = (
                f"{tile_auroc_of_run(run):.3f}"
            )
        report.paths["ABMIL run"] = runs / "abmil_cv"

    def weakstil() -> None:
        run = runs / "weakstil_cv"
        summary = _run_cv(
            ["--config", str(configs / "experiments" / "weakstil.yaml"), *common, "--out", str(run)]
        )
        report.results["WeakSTIL slide R² (sTIL score)"] = _mean_sd(summary, "r2")
        report.results["WeakSTIL slide Spearman"] = _mean_sd(summary, "spearman")

    def continual() -> None:
        from milkit.training.continual import run as continual_cli

        run = runs / "continual_owlora"
        results_path = run / continual_cli.RESULTS_JSON
        if not results_path.exists():
            argv = ["--config", str(configs / "continual" / "gdat_small_cpu.yaml"), "--data.features_dir", str(features_dir),
                    "--data.labels_csv", str(labels_csv), "--strategy", "owlora", "--seed", str(seed), "--out", str(run), "--data.shared_labels", "true",
                    "--trainer.max_epochs", str(plan.max_epochs)]  # fmt: skip
            if continual_cli.main(argv) != 0:
                raise MilkitError(
                    f"the demo's continual run failed: milkit continual {' '.join(argv)}"
                )
        results = json.loads(results_path.read_text())
        report.results["continual (OWLoRA) average accuracy"] = f"{results['average_accuracy']:.3f}"
        report.results["continual (OWLoRA) BWT"] = f"{results['bwt']:+.3f}"

    def heatmaps() -> None:
        from milkit.pipeline.heatmap import render_run

        fold_dir = runs / "abmil_cv" / "repeat0" / "fold0"
        slides = sorted(p.stem for p in (fold_dir / "predictions").glob("*.h5"))[: plan.heatmaps]
        summary, errors = render_run(fold_dir, slides_dir=cohort_dir / "slides", slides=slides)
        if summary.failed:
            raise MilkitError(f"the demo's heatmaps failed; see {errors}")
        report.paths["heatmaps"] = fold_dir / "heatmaps"
        report.paths["notebook"] = (
            Path(__file__).resolve().parent.parent / "notebooks" / "heatmaps.ipynb"
        )

    stages: list[tuple[str, Callable[[], None]]] = [("synth", synth)]
    if pretrain:
        stages.append(("pretrain", self_supervised))
    stages += [("preprocess", preprocess), ("ABMIL/DSMIL", mil), ("WeakSTIL", weakstil),
               ("continual", continual), ("heatmaps", heatmaps)]  # fmt: skip
    for name, run in stages:
        _stage(report, name, run)
    print(report.format())
    return report
