"""The audit's report: ``audit.json`` and a self-contained ``report.html`` whose figures are PNGs embedded in it.

The figures are drawn with matplotlib's object API (no pyplot: no global figure state, no GUI backend).
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from dicom_node.audit.collect import Findings
from dicom_node.audit.summary import OK, REASON_TEXTS, SUSPECT, VERDICTS
from dicom_node.process.processor import encode_png

_VERDICT_COLOURS = {OK: "#2e7d32", SUSPECT: "#c62828", "no_lung_fields": "#757575"}
_DPI = 100


def write_report(out: Path, findings: Findings, summary: Mapping[str, Any], *, colormap: str = "inferno") -> Path:
    """Write ``out/audit.json`` and ``out/report.html``; returns the report's path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    figures = {
        "mean": mean_heatmap_png(findings, colormap),
        "lung_shares": lung_share_png(findings, summary),
        "verdicts": verdict_rates_png(summary),
    }
    path = out / "report.html"
    path.write_text(report_html(summary, figures, [(case.input, encode_png(overlay))
                                                   for case, overlay in findings.worst]), encoding="utf-8")
    return path


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight")
    return buffer.getvalue()


def mean_heatmap_png(findings: Findings, colormap: str) -> bytes | None:
    """Where the model looks: the mean heatmap over the data set over the mean radiograph."""
    if findings.mean_radiograph is None or findings.mean_heatmap is None:
        return None
    heat = findings.mean_heatmap
    scaled = heat / heat.max() if heat.max() > 0 else heat
    figure = Figure(figsize=(5.2, 4.6))
    ax = figure.add_subplot()
    ax.imshow(findings.mean_radiograph, cmap="gray", vmin=0, vmax=255)
    shown = ax.imshow(scaled, cmap=colormap, vmin=0.0, vmax=1.0, alpha=np.clip(0.65 * scaled, 0.0, 1.0))
    figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="mean heatmap (relative)")
    ax.set_title(f"mean heatmap over {len(findings.cases)} images")
    ax.set_axis_off()
    return _png(figure)


def lung_share_png(findings: Findings, summary: Mapping[str, Any]) -> bytes:
    """The histogram of lung shares, stacked by verdict, with the ``min_lung_share`` threshold."""
    figure = Figure(figsize=(6.4, 3.6))
    ax = figure.add_subplot()
    edges = summary["lung_share"]["histogram"]["edges"]
    groups = [[c.lung_share for c in findings.cases if c.evidence["verdict"] == v] for v in VERDICTS]
    ax.hist(groups, bins=edges, stacked=True, color=[_VERDICT_COLOURS[v] for v in VERDICTS], label=list(VERDICTS))
    threshold = summary["thresholds"].get("min_lung_share")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"min_lung_share {threshold}")
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("share of the evidence on the lung fields")
    ax.set_ylabel("images")
    ax.legend(loc="upper right", fontsize="small")
    return _png(figure)


def verdict_rates_png(summary: Mapping[str, Any]) -> bytes:
    """Verdict rates (left) and reason rates (right), over all calls and by predicted label."""
    rows = [("all", summary["overall"])] + list(summary["by_label"].items())
    names = [f"{name} ({counts['calls']})" for name, counts in rows]
    figure = Figure(figsize=(9.0, 0.6 * len(rows) + 1.6))
    left, right = figure.subplots(1, 2, sharey=True)
    y = np.arange(len(rows))
    start = np.zeros(len(rows))
    for verdict in VERDICTS:
        rates = np.array([_rate(counts["verdicts"][verdict], counts["calls"]) for _, counts in rows])
        left.barh(y, rates, left=start, color=_VERDICT_COLOURS[verdict], label=verdict)
        start += rates
    left.set_yticks(y, names)
    left.invert_yaxis()
    left.set_xlim(0.0, 1.0)
    left.set_xlabel("share of calls")
    left.set_title("verdicts")
    left.legend(loc="lower right", fontsize="small")
    height = 0.8 / len(REASON_TEXTS)
    for i, (reason, text) in enumerate(REASON_TEXTS.items()):
        rates = np.array([_rate(counts["reasons"][reason], counts["calls"]) for _, counts in rows])
        right.barh(y - 0.4 + height * (i + 0.5), rates, height=height, label=f"evidence {text}")
    right.set_xlim(0.0, 1.0)
    right.set_xlabel("share of calls with the reason")
    right.set_title("reasons")
    right.legend(loc="lower right", fontsize="small")
    return _png(figure)


def _rate(n: int, calls: int) -> float:
    return n / calls if calls else 0.0


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _figure(figures: Mapping[str, bytes | None], key: str, alt: str) -> str:
    png = figures.get(key)
    return _img(png, alt) if png else "<p>no image was processed</p>"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{100.0 * rate:.1f}%"


def report_html(summary: Mapping[str, Any], figures: Mapping[str, bytes | None],
                worst: Sequence[tuple[str, bytes]]) -> str:
    """The report as one HTML document; every figure is an embedded PNG."""
    model = summary["model"]
    title = f"CXR Lens audit: {model['id']} {model['version']}" + (f" ({model['label']})" if model["label"] else "")
    images = summary["images"]
    shares = summary["lung_share"]
    randomisation = summary["randomisation"]
    counts = [("all", summary["overall"]), *summary["by_label"].items()]
    verdict_rows = [
        [name, c["calls"], *(c["verdicts"][v] for v in VERDICTS), *(c["reasons"][r] for r in REASON_TEXTS),
         _percent(c["alarm_rate"]), "-" if c["median_lung_share"] is None else f"{c['median_lung_share']:.3f}"]
        for name, c in counts
    ]
    verdict_header = ["predicted", "calls", *VERDICTS, *(f"evidence {t}" for t in REASON_TEXTS.values()),
                      "alarm rate", "median lung share"]
    sanity = ("not run" if randomisation["pairs"] == 0 else
              f"Spearman rank correlation {randomisation['spearman']:.3f} over {randomisation['pairs']} image pairs: "
              + ("passed" if randomisation["passed"] else "FAILED")
              + f" (at most {randomisation['max_spearman']})")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}"
        "th{background:#eee}.conclusion{font-size:1.4em;font-weight:bold;padding:.6em;border:3px solid #222}"
        ".worst{display:flex;flex-wrap:wrap;gap:12px}.worst figure{margin:0;width:340px}"
        ".worst img{width:100%}img{max-width:100%}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="conclusion" id="conclusion">{html.escape(summary["conclusion"])}</p>',
        "<p>AI GENERATED - NOT FOR DIAGNOSTIC USE. An audit of the model on this data set, not a statement about "
        "any patient.</p>",
        f"<p>{images['processed']} images processed, {images['not_eligible']} not eligible, {images['failed']} "
        f"failed; explanation method {html.escape(model['method'])}; thresholds "
        f"{html.escape(', '.join(f'{k} {v}' for k, v in summary['thresholds'].items()))}.</p>",
        "<h2>Where does this model look?</h2>",
        _figure(figures, "mean", "mean heatmap over the mean radiograph"),
        "<h2>Share of the evidence on the lung fields</h2>",
        _figure(figures, "lung_shares", "histogram of lung shares"),
        _table(["mean", "p5", "median", "p95", "min", "max"],
               [[shares.get(k, "-") for k in ("mean", "p5", "median", "p95", "min", "max")]]),
        "<h2>Verdicts by reason</h2>",
        _figure(figures, "verdicts", "verdict and reason rates"),
        _table(verdict_header, verdict_rows),
        "<h2>Model-randomisation sanity check</h2>",
        "<p>Adebayo et al. 2018: the maps of the model against those of a copy with re-initialised weights, on a "
        "sample of the images. A low rank correlation means the maps depend on what the model learnt.</p>",
        f"<p>{html.escape(sanity)}</p>",
        "<h2>Worst cases (lowest share of the evidence on the lungs)</h2>",
        '<div class="worst">',
        *(f"<figure>{_img(png, name)}<figcaption>{html.escape(name)}: {html.escape(_worst_text(record))}"
          f"</figcaption></figure>" for (name, png), record in zip(worst, summary["worst_cases"], strict=True)),
        "</div>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _worst_text(record: Mapping[str, Any]) -> str:
    evidence = record["evidence"]
    reasons = ", ".join(evidence.get("reasons") or ()) or "no reason"
    return (f"{record['label']} p={record['probability']:.3f}, lungs {100 * evidence['lungs']:.0f}%, "
            f"{evidence['verdict']} ({reasons})")
