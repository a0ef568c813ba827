"""highdicom's IOD lookups, answered once per process instead of once per object built.

highdicom asks "is this attribute part of that IOD?" (``highdicom._standard_utils.is_attribute_in_iod``) while it
builds each Secondary Capture, Parametric Map and SR: whether the source is an image (for its Contributing
Equipment), whether the IOD has Content Date and Time, whether a referenced image is multi-frame. Each call scans
every module of the IOD in the standard's tables that highdicom ships: about 15 calls per image with the default
outputs. Cached, the stage process spent 8-10 core-ms less per RG1 image (~80 -> ~72; bench.pipeline, alternating
runs with and without, 2-core test VM). The answer depends only on the arguments and those tables, so
:func:`install` caches it.

Written by hand because highdicom (0.28.2) has no cache or switch for it. It is installed only over the function
it was written for (same parameters), in each highdicom module that holds it under that name; after an upgrade
that changes it, highdicom runs uncached (slower, never wrong) and tests/test_secondary_capture.py says so.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
from collections.abc import Callable, Sequence

import highdicom  # noqa: F401  (its modules must be imported before they can be found below)
import highdicom._standard_utils as standard_utils

LOG = logging.getLogger(__name__)

_PARAMETERS = ["attribute", "sop_class_uid", "exclude_path_elements"]
_original: Callable[..., bool] = standard_utils.is_attribute_in_iod


@functools.lru_cache(maxsize=4096)
def _cached(attribute: str, sop_class_uid: str, exclude: tuple[str, ...] | None) -> bool:
    return bool(_original(attribute, sop_class_uid, list(exclude) if exclude is not None else None))


def is_attribute_in_iod(
    attribute: str, sop_class_uid: str, exclude_path_elements: Sequence[str] | None = None
) -> bool:
    """highdicom's ``is_attribute_in_iod``, cached (a UID value, as str, is the key)."""
    exclude = tuple(exclude_path_elements) if exclude_path_elements is not None else None
    return _cached(str(attribute), str(sop_class_uid), exclude)


def install() -> int:
    """Put the cached lookup in place of highdicom's in every highdicom module that holds it; returns how many.

    0 when highdicom's function is no longer the one this cache was written for (then nothing is changed)."""
    if list(inspect.signature(_original).parameters) != _PARAMETERS:
        LOG.warning("highdicom's is_attribute_in_iod has changed; its lookups are not cached")
        return 0
    modules = [module for name, module in list(sys.modules.items())
               if (name == "highdicom" or name.startswith("highdicom.")) and module is not None
               and getattr(module, "is_attribute_in_iod", None) is _original]
    for module in modules:
        module.is_attribute_in_iod = is_attribute_in_iod  # type: ignore[attr-defined]
    return len(modules)


def load_tables() -> None:
    """Read highdicom's tables of the standard now (~200,000 Python objects, 0.2 s), not at the first lookup.

    Called where a process that builds outputs starts (:class:`dicom_node.process.processor.Processor`), so that
    they are alive when its start-up ends and freezes its heap (:func:`dicom_node.startup.freeze_heap`): the cyclic
    collector then never walks them again. Read by the first image's outputs instead, they would be walked by
    every full collection of that process (one over a stage process's ~330,000 objects took ~60 ms here)."""
    standard_utils.get_sop_class_iod_map()
    standard_utils.get_iod_module_map()
    standard_utils.get_module_attribute_map()


installed = install()
