"""Synthetic slides: files OpenSlide opens, pixels that agree with the truth, scale consistency."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from milkit.errors import ConfigError
from milkit.slides.reader import open_slide
from milkit.synth import SlideInfo, SlideParams, load_truth, write_slide
from milkit.synth.layout import Layout, build_layout
from milkit.synth.nuclei import LYMPHOCYTE, nuclei_in_block_row
from milkit.synth.pyramid import level_dimensions
from milkit.synth.render import SlideRenderer

PARAMS = SlideParams(seed=3, task="breast", tumor=True, tumor_fraction=0.3, artefacts=False)


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> SlideInfo:
    out = tmp_path_factory.mktemp("slide")
    return write_slide(out / "s.svs", PARAMS, mpp=0.5, size_px=(2400, 2000))


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[SlideInfo, SlideInfo]:
    out = tmp_path_factory.mktemp("pair")
    params = SlideParams(seed=5, task="colon", tumor=True, tumor_fraction=0.3, til_level=0.5)
    return tuple(  # type: ignore[return-value]
        write_slide(out / f"scan_{mpp}.svs", params, mpp=mpp, size_um=(700.0, 600.0))
        for mpp in (0.5, 0.25)
    )


def class_per_pixel(
    truth_path: Path, shape: tuple[int, int], level_downsample: float
) -> np.ndarray:
    """The truth class of every pixel of a level, eroded by one map pixel at class borders."""
    truth = load_truth(truth_path)
    scale = level_downsample / truth.downsample
    rows = np.minimum((np.arange(shape[0]) + 0.5) * scale, truth.class_map.shape[0] - 1).astype(int)
    cols = np.minimum((np.arange(shape[1]) + 0.5) * scale, truth.class_map.shape[1] - 1).astype(int)
    classes = truth.class_map.astype(np.int16)
    for value in range(5):  # keep only map pixels whose 3 x 3 neighbourhood agrees
        same = ndi.binary_erosion(truth.class_map == value, iterations=1, border_value=1)
        classes[(truth.class_map == value) & ~same] = -1
    return classes[np.ix_(rows, cols)]


def test_slide_opens_as_a_pyramid_with_mpp(slide: SlideInfo) -> None:
    with open_slide(slide.slide_path) as reader:
        assert reader.dimensions == (2400, 2000) == slide.dimensions
        assert reader.level_count >= 3 and reader.level_count == slide.level_count
        np.testing.assert_allclose(reader.level_downsamples[:3], [1, 4, 16], rtol=1e-3)
        assert reader.mpp == pytest.approx(0.5)
        assert reader.properties["openslide.vendor"] == "aperio"
        for level in range(reader.level_count):
            gray = reader.read_level(level).astype(float).mean(axis=2)
            classes = class_per_pixel(slide.truth_path, gray.shape, reader.level_downsamples[level])
            tissue, glass = np.isin(classes, (1, 2, 3)), classes == 0
            assert tissue.sum() > 50 and glass.sum() > 50, f"level {level}: no tissue or no glass"
            assert gray[tissue].mean() < gray[glass].mean() - 40, f"level {level}"


def test_pyramid_levels_shrink_by_four_until_small(slide: SlideInfo) -> None:
    assert level_dimensions((6000, 6000)) == [(6000, 6000), (1500, 1500), (375, 375)]
    assert level_dimensions((40000, 30000))[-1] == (156, 117)
    assert len(level_dimensions((40000, 30000))) == 5
    assert level_dimensions((500, 300)) == [(500, 300)]
    assert sorted(p.name for p in slide.slide_path.parent.iterdir()) == ["s.svs", "s.truth.h5"]


def test_pixels_agree_with_truth(slide: SlideInfo) -> None:
    with open_slide(slide.slide_path) as reader:
        rgb = reader.read_level(0).astype(np.int16)
    classes = class_per_pixel(slide.truth_path, rgb.shape[:2], 1.0)
    gray = rgb.mean(axis=2)
    saturation = rgb.max(axis=2) - rgb.min(axis=2)
    glass = classes == 0
    assert np.mean((gray[glass] > 225) & (saturation[glass] < 25)) > 0.99
    tissue = np.isin(classes, (1, 2, 3))
    assert np.mean(saturation[tissue] > 25) > 0.95  # stained
    dark = gray < 130  # nuclei
    tumour_dark, stroma_dark = dark[classes == 2].mean(), dark[classes == 1].mean()
    assert tumour_dark > 1.5 * stroma_dark, (tumour_dark, stroma_dark)


def test_two_scans_of_the_same_content_agree(pair: tuple[SlideInfo, SlideInfo]) -> None:
    coarse, fine = pair
    assert fine.dimensions == (2 * coarse.dimensions[0], 2 * coarse.dimensions[1])
    assert fine.dimensions[0] * fine.mpp == pytest.approx(coarse.dimensions[0] * coarse.mpp)
    np.testing.assert_array_equal(
        load_truth(coarse.truth_path).class_map, load_truth(fine.truth_path).class_map
    )
    assert load_truth(fine.truth_path).downsample == 2 * load_truth(coarse.truth_path).downsample
    with open_slide(coarse.slide_path) as a, open_slide(fine.slide_path) as b:
        assert (a.mpp, b.mpp) == (pytest.approx(0.5), pytest.approx(0.25))
        region_a = a.read_region((200, 150), 0, (800, 700)).astype(float)  # 100..500 µm
        region_b = b.read_region((400, 300), 0, (1600, 1400)).astype(float)
    region_b = region_b.reshape(700, 2, 800, 2, 3).mean(axis=(1, 3))
    gray_a = ndi.gaussian_filter(region_a.mean(axis=2), 1.0)
    gray_b = ndi.gaussian_filter(region_b.mean(axis=2), 1.0)
    assert gray_a.std() > 10  # the region has structure to compare
    assert np.corrcoef(gray_a.ravel(), gray_b.ravel())[0, 1] > 0.9


def test_regions_render_independently() -> None:
    renderer = SlideRenderer(build_layout(PARAMS, (400.0, 300.0)), 0.5)
    whole = renderer.render((0, 0), (800, 600))
    again = SlideRenderer(build_layout(PARAMS, (400.0, 300.0)), 0.5)
    np.testing.assert_array_equal(again.render((250, 130), (300, 200)), whole[130:330, 250:550])


def test_til_level_controls_lymphocytes() -> None:
    def lymphocytes(til_level: float) -> int:
        params = SlideParams(
            seed=8, task="lung", tumor=False, til_level=til_level, aggregates=False
        )
        layout = build_layout(params, (1500.0, 1500.0))
        return sum(
            int((nuclei_in_block_row(layout, row).kind == LYMPHOCYTE).sum()) for row in range(24)
        )

    poor, rich = lymphocytes(0.05), lymphocytes(0.8)
    assert rich > 4 * poor > 0


def test_tumour_switch_and_target_fraction() -> None:
    for target in (0.05, 0.3):
        layout = build_layout(
            SlideParams(seed=2, task="lung", tumor_fraction=target), (2000.0, 1500.0)
        )
        classes = layout.class_map
        measured = np.count_nonzero(classes == 2) / np.count_nonzero(np.isin(classes, (1, 2, 3)))
        assert measured == pytest.approx(target, abs=0.03)
    normal = build_layout(SlideParams(seed=2, task="lung", tumor=False), (2000.0, 1500.0))
    assert not (normal.class_map == 2).any() and (normal.class_map == 1).any()


def test_artefacts_are_class_4_and_visible() -> None:
    size_um = (1200.0, 1000.0)
    clean = [build_layout(SlideParams(seed=s, artefacts=False), size_um) for s in range(6)]
    assert all(not (layout.class_map == 4).any() for layout in clean)
    pens = [
        layout
        for layout in (build_layout(SlideParams(seed=s), size_um) for s in range(12))
        if (layout.fields["pen"] > 0.9).any()
    ]
    assert pens, "no pen mark in 12 slides"
    layout = pens[0]
    rows, cols = np.nonzero(layout.fields["pen"] > 0.9)
    pixels = SlideRenderer(layout, 1.0).render((0, 0), (1200, 1000))
    assert (layout.class_map[rows, cols] == 4).all()
    ink = pixels[(rows * 8 + 4), (cols * 8 + 4)].astype(float)
    assert ink.mean() < 200  # ink absorbs light, on glass and on tissue


def test_organs_differ_in_colour() -> None:
    means = []
    for task in ("breast", "colon", "lung"):
        layout = build_layout(
            SlideParams(seed=1, task=task, tumor=False, artefacts=False), (600.0, 600.0)
        )
        pixels = SlideRenderer(layout, 1.0).render((0, 0), (600, 600)).astype(float)
        stroma = np.repeat(np.repeat(layout.class_map == 1, 8, axis=0), 8, axis=1)[:600, :600]
        means.append(pixels[stroma].mean(axis=0))
    distances = [np.abs(means[i] - means[j]).max() for i, j in ((0, 1), (0, 2), (1, 2))]
    assert min(distances) > 5, means


def test_stain_spread_changes_staining_not_content() -> None:
    size_um = (300.0, 300.0)

    def layouts(spread: float) -> list[Layout]:
        return [build_layout(SlideParams(seed=s, stain_spread=spread), size_um) for s in range(16)]

    one_lab, pooled, uniform = layouts(0.15), layouts(0.5), layouts(0.0)
    assert all(layout.stain_scale == (1.0, 1.0) for layout in uniform)
    for spread, cohort in ((0.15, one_lab), (0.5, pooled)):
        scales = np.array([layout.stain_scale for layout in cohort])
        assert (np.abs(scales - 1) <= spread).all()
    # the same draws, stretched: every slide keeps its content and its direction of change
    for narrow, wide in zip(one_lab, pooled, strict=True):
        np.testing.assert_array_equal(narrow.class_map, wide.class_map)
        np.testing.assert_allclose(
            np.array(wide.stain_scale) - 1, (np.array(narrow.stain_scale) - 1) * 0.5 / 0.15
        )
    # the pixels follow: tissue stained above average gets darker as the spread widens
    seed = int(np.argmax([min(layout.stain_scale) for layout in one_lab]))
    assert min(one_lab[seed].stain_scale) > 1.05
    narrow_px, wide_px = (
        SlideRenderer(cohort[seed], 1.0).render((0, 0), (300, 300)).astype(float).mean(axis=2)
        for cohort in (one_lab, pooled)
    )
    tissue = narrow_px < 200
    assert tissue.mean() > 0.1
    assert wide_px[tissue].mean() < narrow_px[tissue].mean() - 5


def test_bad_parameters_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="breast, colon, lung"):
        SlideParams(seed=0, task="kidney")
    with pytest.raises(ConfigError, match="non-negative"):
        SlideParams(seed=-1)
    with pytest.raises(ConfigError, match=r"stain_spread must be in \[0, 0.9\], got 1.2"):
        SlideParams(seed=0, stain_spread=1.2)
    with pytest.raises(ConfigError, match="not both"):
        write_slide(tmp_path / "x.svs", PARAMS, size_px=(100, 100), size_um=(50.0, 50.0))
    with pytest.raises(ConfigError, match="mpp must be positive"):
        write_slide(tmp_path / "x.svs", PARAMS, mpp=0)
    assert not list(tmp_path.iterdir())
