"""``bench.stages``: the node's own steps, each measured, on a real radiograph.

Full-size run: ``python -m bench.stages`` (32 images per transfer syntax).
"""

from __future__ import annotations

import pytest

from bench import stages


@pytest.mark.tf
@pytest.mark.slow
def test_every_step_of_an_image_is_measured(capsys: pytest.CaptureFixture[str]) -> None:
    rows = stages.main(["--n", "2", "--syntaxes", "J2KI"])
    steps = dict(rows["J2KI"])
    for step in ("spool key", "parse", "render", "model", "outputs", "enqueue"):
        assert steps[step] > 0, step
    # build_outputs' own steps under it, with the default outputs: all three DICOM objects and the ORU
    for part in ("trust", "overlay", "secondary_capture", "parametric_map", "structured_report", "hl7",
                 "Part 10 SC", "Part 10 map", "Part 10 SR"):
        assert steps[f"  {part}"] > 0, part
    assert "total" in capsys.readouterr().out
