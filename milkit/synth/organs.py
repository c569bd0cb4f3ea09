"""Organ families ("tasks"): stain palette and morphology of each kind of synthetic slide.

A continual-learning sequence walks through organs, so the families differ where a model would
notice: stain hue, how tumour grows (nests, glands, solid sheets), nucleus size and the holes of
normal tissue (fat, alveoli).
"""

from __future__ import annotations

from dataclasses import dataclass

from milkit.errors import ConfigError


@dataclass(frozen=True)
class NucleusKind:
    """Shape and staining of one kind of nucleus.

    Attributes:
        density_per_um2: Nuclei per µm² where this kind is at its densest.
        radius_um: Range of the mean radius in µm.
        elongation: Range of the long/short axis ratio.
        irregularity: Amplitude of the wobble of the outline (0: ellipse).
        hematoxylin: Hematoxylin concentration at the nucleus (optical density units).
        vesicular: How much paler the centre is than the rim (0: solid, 1: rim only).
    """

    density_per_um2: float
    radius_um: tuple[float, float]
    elongation: tuple[float, float]
    irregularity: float
    hematoxylin: float
    vesicular: float = 0.0


@dataclass(frozen=True)
class OrganStyle:
    """Palette and morphology of one organ family.

    Attributes:
        name: Task name written to ``labels.csv``.
        hematoxylin_od: Optical density (R, G, B) of one unit of hematoxylin.
        eosin_od: Optical density (R, G, B) of one unit of eosin.
        stroma_stain: ``(hematoxylin, eosin)`` concentrations of stroma.
        tumor_stain: ``(hematoxylin, eosin)`` concentrations of tumour cytoplasm.
        fibre_contrast: Relative eosin variation along collagen fibres.
        fibre_um: ``(along, across)`` correlation lengths of the fibres in µm.
        tumor_pattern: ``"nests"``, ``"glands"`` (epithelium around lumens) or ``"sheets"``.
        pattern_um: Correlation length of the tumour pattern in µm.
        hole_um: Correlation length of holes in normal tissue (fat, alveoli) in µm.
        hole_fraction: Area fraction of normal tissue that is holes.
        stroma_nuclei: Fibroblasts (sparse, spindle-shaped, along the fibres).
        tumor_nuclei: Tumour cells (large, crowded, irregular).
        lymphocytes: Lymphocytes (small, round, very dark).
    """

    name: str
    hematoxylin_od: tuple[float, float, float]
    eosin_od: tuple[float, float, float]
    stroma_stain: tuple[float, float]
    tumor_stain: tuple[float, float]
    fibre_contrast: float
    fibre_um: tuple[float, float]
    tumor_pattern: str
    pattern_um: float
    hole_um: float
    hole_fraction: float
    stroma_nuclei: NucleusKind
    tumor_nuclei: NucleusKind
    lymphocytes: NucleusKind


_FIBROBLAST = NucleusKind(1 / 1000, (3.0, 4.0), (2.8, 4.2), 0.1, 0.7)
_LYMPHOCYTE = NucleusKind(1 / 36, (2.4, 3.1), (1.0, 1.15), 0.1, 1.05)

ORGANS: dict[str, OrganStyle] = {
    "breast": OrganStyle(
        name="breast",
        hematoxylin_od=(0.62, 0.72, 0.30),
        eosin_od=(0.10, 0.82, 0.30),
        stroma_stain=(0.04, 0.26),
        tumor_stain=(0.16, 0.22),
        fibre_contrast=0.5,
        fibre_um=(12.0, 2.2),
        tumor_pattern="nests",
        pattern_um=38.0,
        hole_um=26.0,
        hole_fraction=0.10,
        stroma_nuclei=_FIBROBLAST,
        tumor_nuclei=NucleusKind(1 / 110, (4.2, 5.8), (1.05, 1.5), 0.3, 0.75, 0.35),
        lymphocytes=_LYMPHOCYTE,
    ),
    "colon": OrganStyle(
        name="colon",
        hematoxylin_od=(0.74, 0.66, 0.22),
        eosin_od=(0.06, 0.74, 0.46),
        stroma_stain=(0.06, 0.28),
        tumor_stain=(0.20, 0.24),
        fibre_contrast=0.4,
        fibre_um=(14.0, 2.6),
        tumor_pattern="glands",
        pattern_um=30.0,
        hole_um=40.0,
        hole_fraction=0.04,
        stroma_nuclei=_FIBROBLAST,
        tumor_nuclei=NucleusKind(1 / 80, (3.2, 4.2), (1.8, 2.6), 0.15, 0.85, 0.15),
        lymphocytes=_LYMPHOCYTE,
    ),
    "lung": OrganStyle(
        name="lung",
        hematoxylin_od=(0.55, 0.70, 0.38),
        eosin_od=(0.14, 0.86, 0.20),
        stroma_stain=(0.05, 0.22),
        tumor_stain=(0.13, 0.18),
        fibre_contrast=0.35,
        fibre_um=(10.0, 3.0),
        tumor_pattern="sheets",
        pattern_um=60.0,
        hole_um=22.0,
        hole_fraction=0.42,
        stroma_nuclei=_FIBROBLAST,
        tumor_nuclei=NucleusKind(1 / 150, (5.0, 7.0), (1.0, 1.35), 0.4, 0.7, 0.55),
        lymphocytes=_LYMPHOCYTE,
    ),
}


def get_organ(task: str) -> OrganStyle:
    """The style of a task.

    Raises:
        ConfigError: ``task`` is not one of :data:`ORGANS`.
    """
    try:
        return ORGANS[task]
    except KeyError:
        raise ConfigError(
            f"unknown synthetic task {task!r}; choose from {', '.join(sorted(ORGANS))}."
        ) from None
