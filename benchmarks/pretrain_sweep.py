"""k-NN accuracy of DINO recipe variants on one synthetic cohort: which settings learn.

Builds the cohort of ``pretrain_small.py`` once, then for each variant (a name and recipe
overrides) pretrains, exports and scores the teacher with the k-NN check of
``milkit.ssl.knn``, against the same architecture at random initialisation. Prints one row per
variant: steps, seconds, loss trend, both accuracies. With ``--export-every N`` the teacher is
also exported every N steps and each export is scored (the accuracy along training).

    python benchmarks/pretrain_sweep.py --variant base: --variant "long:trainer.max_steps=800" \\
        --variant "lr:model.lr=0.008;trainer.max_steps=400"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lightning import Callback, LightningModule, Trainer
from pretrain_small import build_cohort, cohort_options, knn_scores, loss_trend, pretrain

from milkit.features.encoders import load_encoder
from milkit.ssl.export import export_backbone
from milkit.ssl.knn import knn_by_slide
from milkit.synth.knn_cohort import synthetic_tile_labels


class ExportEvery(Callback):
    """Export the teacher backbone to ``out_dir/encoder_step{N}`` every ``every`` steps.

    Args:
        every: Steps between exports.
        out_dir: The run folder.
    """

    def __init__(self, every: int, out_dir: str) -> None:
        self.every = every
        self.out_dir = Path(out_dir)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, *args: object
    ) -> None:
        """Export after every ``every``-th optimiser step."""
        if trainer.global_step % self.every == 0:
            export_backbone(pl_module, self.out_dir / f"encoder_step{trainer.global_step}",
                            overwrite=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cohort_options(parser)
    parser.add_argument(
        "--variant",
        action="append",
        required=True,
        metavar="NAME:KEY=VALUE;...",
        help="a named variant and its recipe overrides (repeat the option)",
    )
    parser.add_argument("--export-every", type=int, default=None, metavar="N",
                        help="also score the teacher every N steps")  # fmt: skip
    args = parser.parse_args()
    coords = build_cohort(args)
    labelled = synthetic_tile_labels(coords, args.work / "cohort" / "truth")
    for variant in args.variant:
        name, _, spec = variant.partition(":")
        overrides = [item for item in spec.split(";") if item]
        run = args.work / f"run_{name}"
        if args.export_every:
            callback = {"class_path": "pretrain_sweep.ExportEvery",
                        "init_args": {"every": args.export_every, "out_dir": str(run)}}  # fmt: skip
            overrides.append(f"trainer.callbacks={json.dumps([callback])}")
        seconds = pretrain(
            [args.config, *args.overlay], args.work / "cohort", coords, run, overrides
        )
        for export in sorted(
            run.glob("encoder_step*"), key=lambda p: int(p.name.removeprefix("encoder_step"))
        ):
            accuracy = knn_by_slide(load_encoder(f"local-dir:{export}"), labelled).accuracy
            print(f"SWEEP {name} {export.name}: k-NN {accuracy:.3f}", flush=True)
        first, last = loss_trend(run)
        random, trained = knn_scores(run, labelled)
        print(
            f"SWEEP {name} [{spec}]: {seconds:.0f} s, loss {first:.3f} -> {last:.3f}, k-NN random "
            f"{random.accuracy:.3f}, pretrained {trained.accuracy:.3f} "
            f"({100 * (trained.accuracy - random.accuracy):+.1f} points, embed std "
            f"{trained.embed_std:.4f})",
            flush=True,
        )


if __name__ == "__main__":
    main()
