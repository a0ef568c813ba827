"""Load, scaled (issue #6 item 5): four associations at once while the model runs, then RSS over a stream.

Full-size runs: ``python -m bench.load`` and ``python -m bench.soak``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench.scenarios import NodeUnderTest, run_load, run_memory

pytestmark = [pytest.mark.tf, pytest.mark.slow]

MEMORY_IMAGE_SIDE = 768  # 1.1 MiB of pixels per image: a per-image leak shows well above the bound
MEMORY_WARMUP = 80
MEMORY_MEASURED = 100
MEMORY_BOUND_MB = 60.0


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeUnderTest]:
    """One node (demo model, default batch size) with its PACS and HL7 receiver, for both tests."""
    with NodeUnderTest(tmp_path_factory.mktemp("load")) as nut:
        yield nut


def test_four_associations_answered_in_time_and_delivered_once(node: NodeUnderTest) -> None:
    report = run_load(node, streams=4, per_stream=12, preload=16)
    print(report.table())
    assert report.problems() == [], report.table() + "\n" + node.node.log_tail()


def test_rss_does_not_grow_with_images_processed(node: NodeUnderTest) -> None:
    report = run_memory(node, warmup=MEMORY_WARMUP, measured=MEMORY_MEASURED, every=20, bound_mb=MEMORY_BOUND_MB,
                        rows=MEMORY_IMAGE_SIDE)
    print(report.table())
    # The check must be able to fail: keeping only the input pixels of every image would exceed the bound twice.
    assert report.measured * report.image_bytes / 2**20 > 1.8 * MEMORY_BOUND_MB
    assert report.problems() == [], report.table()
