"""``cxr-lens audit`` on generated DICOM data sets: it tells the demo model (looks at the lungs) from the shortcut
TEST model (looks at a burned-in token), writes the same numbers to audit.json and report.html, and every figure
of the report loads in a real browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from dicom_node.audit.summary import LOOKS_AT_THE_LUNGS, LOOKS_ELSEWHERE, MAX_ALARM_RATE
from dicom_node.cli import main
from dicom_node.peers.synthetic_cr import make_cr_dataset
from explain.trust import SHARE_NAMES
from models.synthetic import AnatomySet, generate_anatomy, generate_shortcut

pytestmark = [pytest.mark.tf, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
SHORTCUT_CONFIG = ROOT / "config" / "examples" / "shortcut-test-model.toml"
CASES = 100
# Held-out seeds of each model's metrics.json: never trained on.
DEMO_HELD_OUT, SHORTCUT_HELD_OUT = 3, 103
FINDING = "focal_opacity"


def _write(cases: AnatomySet, directory: Path) -> Path:
    directory.mkdir(parents=True)
    for i, image in enumerate(cases.images):
        make_cr_dataset(pixels=image, bits_stored=8, seed=i).save_as(directory / f"case{i:03d}.dcm",
                                                                      enforce_file_format=True)
    return directory


@pytest.fixture(scope="module")
def audits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, Path]]:
    root = tmp_path_factory.mktemp("audit")
    demo = _write(generate_anatomy(CASES, DEMO_HELD_OUT), root / "demo-data")
    shortcut = _write(generate_shortcut(CASES, SHORTCUT_HELD_OUT), root / "shortcut-data")
    return {
        "demo": (main(["audit", str(demo), "--out", str(root / "demo")]), root / "demo"),
        "shortcut": (main(["audit", "--config", str(SHORTCUT_CONFIG), str(shortcut), "--out", str(root / "shortcut")]),
                     root / "shortcut"),
    }


def _summary(audits: dict[str, tuple[int, Path]], name: str) -> dict[str, Any]:
    code, out = audits[name]
    assert code == 0
    return json.loads((out / "audit.json").read_text())


def test_the_demo_model_looks_at_the_lungs(audits: dict[str, tuple[int, Path]]) -> None:
    summary = _summary(audits, "demo")
    assert summary["conclusion"].startswith(LOOKS_AT_THE_LUNGS)
    assert summary["model"]["id"] == "cxr-lens-demo-cnn" and summary["model"]["label"] == "DEMO MODEL"
    assert summary["images"] == {"processed": CASES, "not_eligible": 0, "failed": 0}
    assert summary["overall"]["alarm_rate"] <= 0.05
    assert summary["randomisation"]["pairs"] > 0 and summary["randomisation"]["passed"] is True


def test_the_shortcut_model_looks_elsewhere(audits: dict[str, tuple[int, Path]]) -> None:
    summary = _summary(audits, "shortcut")
    conclusion = summary["conclusion"]
    assert conclusion.startswith(f"{LOOKS_ELSEWHERE}: ") and FINDING in conclusion and "marker" in conclusion
    assert summary["model"]["label"] == "TEST MODEL"
    calls = summary["by_label"][FINDING]
    assert calls["calls"] >= 0.3 * CASES
    assert calls["alarm_rate"] >= 0.9 > MAX_ALARM_RATE
    assert calls["reasons"]["evidence_on_marker"] >= 0.8 * calls["calls"]


def test_audit_json_holds_every_case_and_consistent_counts(audits: dict[str, tuple[int, Path]]) -> None:
    for name in audits:
        summary = _summary(audits, name)
        cases = summary["cases"]
        assert len(cases) == CASES
        for case in cases:
            assert sum(case["evidence"][share] for share in SHARE_NAMES) == pytest.approx(1.0, abs=1e-3)
        overall = summary["overall"]
        assert sum(overall["verdicts"].values()) == overall["calls"] == CASES
        assert sum(summary["lung_share"]["histogram"]["counts"]) == CASES
        assert {label: counts["calls"] for label, counts in summary["by_label"].items()} == {
            label: sum(case["label"] == label for case in cases) for label in summary["model"]["labels"]}
        for verdict, n in overall["verdicts"].items():
            assert n == sum(case["evidence"]["verdict"] == verdict for case in cases)
        worst = [case["evidence"]["lungs"] for case in summary["worst_cases"]]
        assert len(worst) == 6 and worst == sorted(worst)
        assert worst[-1] <= sorted(case["evidence"]["lungs"] for case in cases)[5]


def test_the_report_says_what_audit_json_says(audits: dict[str, tuple[int, Path]]) -> None:
    for name, (_, out) in audits.items():
        summary = _summary(audits, name)
        html = (out / "report.html").read_text()
        match = re.search(r'<p class="conclusion" id="conclusion">([^<]*)</p>', html)
        assert match is not None and match.group(1) == summary["conclusion"].replace("&", "&amp;")
        assert "src=\"http" not in html and "<link" not in html  # self-contained
        assert len(re.findall(r'<img src="data:image/png;base64,', html)) == 3 + len(summary["worst_cases"])


_PROBE = """<script>
window.addEventListener("load", () => {
  const out = document.createElement("pre");
  out.id = "image-check";
  out.textContent = Array.from(document.images).map(i => i.naturalWidth + "x" + i.naturalHeight).join(" ");
  document.body.appendChild(out);
});
</script>"""
BROKEN_IMAGE = '<img src="data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB" alt="broken on purpose">'


def _loaded_sizes(html: Path, tmp_path: Path, *, extra: str = "") -> list[str]:
    """Each image's natural size as a headless Chromium reports it once the page has loaded (0x0: not loaded)."""
    probe = tmp_path / f"probe-{html.parent.name}.html"
    probe.write_text(html.read_text().replace("</body>", extra + _PROBE + "</body>"))
    chromium = shutil.which("chromium")
    assert chromium is not None
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    match = re.search(r'<pre id="image-check">([^<]*)</pre>', dom)
    assert match is not None, dom[-2000:]
    return match.group(1).split()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium not installed (scripts/test.sh)")
def test_every_figure_of_the_report_loads_in_a_browser(audits: dict[str, tuple[int, Path]], tmp_path: Path) -> None:
    for _, out in audits.values():
        html = out / "report.html"
        sizes = _loaded_sizes(html, tmp_path)
        assert len(sizes) == html.read_text().count("<img ")
        assert all(width > 0 and height > 0 for width, height in (map(int, s.split("x")) for s in sizes)), sizes
    # The check can fail: an image that does not decode reads 0x0.
    _, out = audits["demo"]
    assert _loaded_sizes(out / "report.html", tmp_path, extra=BROKEN_IMAGE)[-1] == "0x0"
