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


def test_legend_lines_give_the_lung_share_when_there_is_one() -> None:
    lines = legend_lines("focal_opacity", 0.9, "gradcam", "m 1", no_evidence=False, lung_share=0.8149)
    assert "evidence in the lungs 81%" in lines
    assert not any("lungs" in line for line in legend_lines("x", 0.9, "gradcam", "m 1", no_evidence=False))


def test_an_alert_gets_a_red_strip_between_the_radiograph_and_the_legend() -> None:
    display, heatmap = _inputs()
    plain = _compose(display, heatmap)
    alerted = _compose(display, heatmap, alerts=["CHECK: evidence outside the lungs (markers 64%, lungs 3%)"])
    np.testing.assert_array_equal(alerted[:300], plain[:300])  # the radiograph untouched
    red = np.all(alerted == np.array([200, 0, 0], np.uint8), axis=2).mean(axis=1) > 0.5
    rows = np.flatnonzero(red)
    assert rows.size >= 10 and rows.min() >= 300
    strip = alerted[rows.min():rows.max() + 1]
    assert (strip > 180).all(axis=2).sum() > 20  # white text on it
    np.testing.assert_array_equal(alerted[-(plain.shape[0] - 300):], plain[300:])  # the legend as before
    assert not np.all(plain == np.array([200, 0, 0], np.uint8), axis=2).any()
