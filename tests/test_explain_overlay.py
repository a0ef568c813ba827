"""The overlay picture: heatmap over the radiograph, legend band below, never over the anatomy."""

from __future__ import annotations

import numpy as np

from explain.overlay import compose_overlay, legend_lines
from explain.render import blend, normalise, upsample


def _inputs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    display = rng.integers(0, 256, (300, 240), dtype=np.uint8)
    heatmap = np.zeros((8, 8), np.float32)
    heatmap[2, 5] = 3.0
    return display, heatmap


def _compose(display: np.ndarray, heatmap: np.ndarray, **kw: object) -> np.ndarray:
    args = dict(lines=["focal_opacity  p=0.900", "gradcam | m 1 (DEMO MODEL)"], warnings=["AI GENERATED"],
                colormap="inferno", alpha=0.5)
    args.update(kw)
    return compose_overlay(display, normalise(heatmap), **args)  # type: ignore[arg-type]


def test_picture_is_the_blend_and_the_legend_is_below() -> None:
    display, heatmap = _inputs()
    out = _compose(display, heatmap)
    assert out.dtype == np.uint8 and out.shape[1:] == (240, 3) and out.shape[0] > 300
    expected = blend(display, upsample(normalise(heatmap).map, (300, 240)), colormap="inferno", alpha=0.5)
    np.testing.assert_array_equal(out[:300], expected)
    band = out[300:]
    assert (band > 180).all(axis=2).sum() > 20  # white legend text
    assert (band[..., 0] > 200).sum() > (band[..., 2] > 200).sum()  # amber warnings: red channel dominates


def test_heat_peak_lands_where_the_map_peaks() -> None:
    display = np.full((320, 320), 40, np.uint8)
    _, heatmap = _inputs()
    out = _compose(display, heatmap)[:320].astype(int)
    change = np.abs(out - 40).sum(axis=2)
    row, col = np.unravel_index(np.argmax(change), change.shape)
    assert abs(row - (2.5 * 40)) <= 40 and abs(col - (5.5 * 40)) <= 40  # inside the peak's cell


def test_no_evidence_shows_the_radiograph_unchanged() -> None:
    display, _ = _inputs()
    out = _compose(display, np.zeros((8, 8), np.float32))
    np.testing.assert_array_equal(out[:300], np.repeat(display[..., None], 3, axis=2))


def test_pure_and_ascii_safe() -> None:
    display, heatmap = _inputs()
    before = (display.copy(), heatmap.copy())
    _compose(display, heatmap, lines=["opacité  p=0.5", "x" * 500])
    np.testing.assert_array_equal(display, before[0])
    np.testing.assert_array_equal(heatmap, before[1])


def test_legend_lines_name_method_model_and_no_evidence() -> None:
    lines = legend_lines("focal_opacity", 0.91234, "gradcam", "demo 1.0.0 (DEMO MODEL)", no_evidence=True)
    assert lines[0] == "focal_opacity  p=0.912"
    assert "gradcam" in lines[1] and "DEMO MODEL" in lines[1]
    assert any("NO EVIDENCE" in line for line in lines)
