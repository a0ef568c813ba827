"""explain.render: normalisation policy, resizing, colouring and blending — pure numpy/cv2, no TensorFlow."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from explain import render

ROOT = Path(__file__).resolve().parents[1]


def heatmap() -> np.ndarray:
    rng = np.random.default_rng(7)
    return (rng.random((6, 8)) * 3e-3).astype(np.float32)


def test_importing_render_does_not_import_tensorflow() -> None:
    code = "import sys, explain.render; assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_the_lazy_public_names_resolve_once_to_the_engine() -> None:
    code = (
        "import sys, explain\n"
        "assert 'tensorflow' not in sys.modules and 'explain' not in vars(explain)\n"
        "from explain import engine\n"
        "assert explain.explain is engine.explain and explain.Explanation is engine.Explanation\n"
        "assert vars(explain)['explain'] is engine.explain  # kept: later accesses skip the module __getattr__\n"
        "try:\n"
        "    explain.nothing\n"
        "except AttributeError as exc:\n"
        "    assert 'nothing' in str(exc)\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_normalise_scales_by_the_maximum_not_min_max() -> None:
    raw = heatmap() + 1e-3  # a floor that min-max would wrongly stretch to zero
    result = render.normalise(raw)
    assert not result.no_evidence
    assert result.raw_max == pytest.approx(float(raw.max()))
    assert result.map.dtype == np.float32 and result.map.shape == raw.shape
    assert result.map.max() == pytest.approx(1.0)
    np.testing.assert_allclose(result.map, raw / raw.max(), rtol=1e-6)
    assert result.map.min() > 0.2  # the floor stays visible


@pytest.mark.parametrize("raw", [np.zeros((6, 6)), np.full((6, 6), 1e-7), np.full((6, 6), 1e-6)])
def test_normalise_reports_no_evidence_instead_of_stretching_noise(raw: np.ndarray) -> None:
    result = render.normalise(raw)
    assert result.no_evidence
    assert result.raw_max == pytest.approx(float(raw.max()))
    np.testing.assert_array_equal(result.map, 0.0)


def test_normalise_threshold_is_configurable_and_nan_rejected() -> None:
    raw = np.full((4, 4), 1e-4, dtype=np.float32)
    assert not render.normalise(raw).no_evidence
    assert render.normalise(raw, no_evidence_threshold=1e-3).no_evidence
    raw[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        render.normalise(raw)


def test_upsample_shape_and_bilinear_values() -> None:
    raw = heatmap()
    up = render.upsample(raw, (60, 80))
    assert up.shape == (60, 80) and up.dtype == np.float32
    np.testing.assert_allclose(up, cv2.resize(raw, (80, 60), interpolation=cv2.INTER_LINEAR))
    assert raw.min() - 1e-9 <= up.min() and up.max() <= raw.max() + 1e-9  # bilinear never overshoots
    constant = render.upsample(np.full((3, 3), 0.5, np.float32), (10, 7))
    np.testing.assert_allclose(constant, 0.5)
    ramp = render.upsample(np.array([[0.0, 1.0]], np.float32), (1, 4))
    assert np.all(np.diff(ramp[0]) >= 0)  # interpolates, not nearest-neighbour blocks
    assert len(np.unique(ramp)) > 2
    with pytest.raises(ValueError):
        render.upsample(np.zeros((2, 2, 2)), (4, 4))


def test_colorize_is_rgb_uint8_and_colormap_matters() -> None:
    map01 = render.normalise(heatmap()).map
    inferno = render.colorize(map01)
    assert inferno.shape == (6, 8, 3) and inferno.dtype == np.uint8
    assert not np.array_equal(inferno, render.colorize(map01, "turbo"))
    # RGB, not cv2's BGR: inferno's hottest colour is pale yellow (R, G high, B lower).
    r, g, b = render.colorize(np.ones((1, 1), np.float32))[0, 0].astype(int)
    assert r > b and g > b
    expected = cv2.applyColorMap(np.full((1, 1), 255, np.uint8), cv2.COLORMAP_INFERNO)[0, 0, ::-1]
    np.testing.assert_array_equal(render.colorize(np.ones((1, 1), np.float32))[0, 0], expected)
    for name in render.COLORMAPS:
        assert render.colorize(map01, name).shape == (6, 8, 3)
    with pytest.raises(ValueError, match="unknown colormap"):
        render.colorize(map01, "rainbow")


def test_blend_shows_the_radiograph_where_the_map_is_cold() -> None:
    gray = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (32, 1))  # 32 x 64
    map01 = np.zeros((32, 64), np.float32)
    map01[8:16, 16:32] = 1.0
    out = render.blend(gray, map01, colormap="inferno", alpha=0.6)
    assert out.shape == (32, 64, 3) and out.dtype == np.uint8
    cold = map01 == 0
    np.testing.assert_array_equal(out[cold], np.repeat(gray[cold][:, None], 3, axis=1))
    hot = render.colorize(map01, "inferno").astype(float)
    expected = np.rint(0.4 * gray[8:16, 16:32, None] + 0.6 * hot[8:16, 16:32])
    np.testing.assert_array_equal(out[8:16, 16:32], expected)
    assert not np.array_equal(out, render.blend(gray, map01, colormap="viridis", alpha=0.6))
    with pytest.raises(ValueError, match="upsample first"):
        render.blend(gray, map01[:16], colormap="inferno", alpha=0.5)
    with pytest.raises(ValueError, match="alpha"):
        render.blend(gray, map01, colormap="inferno", alpha=1.5)


def test_colour_bar_runs_hot_at_top_to_cold_at_bottom() -> None:
    bar = render.colour_bar(100, 12, "inferno")
    assert bar.shape == (100, 12, 3) and bar.dtype == np.uint8
    np.testing.assert_array_equal(bar[0, 0], render.colorize(np.ones((1, 1), np.float32))[0, 0])
    np.testing.assert_array_equal(bar[-1, 0], render.colorize(np.zeros((1, 1), np.float32))[0, 0])
    assert np.all(bar == bar[:, :1])  # constant across each row
    assert not np.array_equal(bar, render.colour_bar(100, 12, "jet"))


def test_every_function_leaves_its_inputs_untouched() -> None:
    raw = heatmap()
    gray = np.random.default_rng(3).integers(0, 256, (6, 8), dtype=np.uint8)
    raw_copy, gray_copy = raw.copy(), gray.copy()
    map01 = render.normalise(raw).map
    map_copy = map01.copy()
    render.upsample(raw, (12, 16))
    render.colorize(map01, "magma")
    render.blend(gray, map01, colormap="jet", alpha=0.5)
    np.testing.assert_array_equal(raw, raw_copy)
    np.testing.assert_array_equal(gray, gray_copy)
    np.testing.assert_array_equal(map01, map_copy)
    assert render.normalise(raw).map is not raw
