"""k-NN accuracy of DINO recipe variants on one synthetic cohort: which settings learn.

Builds the cohort of ``pretrain_small.py`` once, then for each variant (a name and recipe
overrides) pretrains, exports and scores the teacher with the k-NN check of
``milkit.ssl.knn``, against the same architecture at random initialisation. Prints one row per
variant: steps, seconds, loss trend, both accuracies.

    python benchmarks/pretrain_sweep.py --variant base: --variant "long:trainer.max_steps=800" \\
        --variant "lr:model.lr=0.008;trainer.max_steps=400"
"""

from __future__ import annotations

import argparse

from pretrain_small import build_cohort, cohort_options, knn_scores, loss_trend, pretrain

from milkit.ssl.knn import synthetic_tile_labels


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
    args = parser.parse_args()
    coords = build_cohort(args)
    labelled = synthetic_tile_labels(coords, args.work / "cohort" / "truth")
    for variant in args.variant:
        name, _, spec = variant.partition(":")
        overrides = [item for item in spec.split(";") if item]
        run = args.work / f"run_{name}"
        seconds = pretrain(args.config, args.work / "cohort", coords, run, overrides)
        first, last = loss_trend(next(run.rglob("metrics.csv")))
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
