"""Explain a chest-radiograph classifier's decision with class activation maps.

``explain.explain``, ``Explanation`` and ``METHODS`` load TensorFlow on first use (PEP 562), so that
``import explain.render`` — pure numpy/cv2 — stays free of it for the DICOM side of the node.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from explain.cam import (
        METHODS,
        BaseCAM,
        DeviceSetup,
        Explanation,
        configure_device,
        explain,
        explainer_for,
        warm_up,
    )

__all__ = ["METHODS", "BaseCAM", "DeviceSetup", "Explanation", "configure_device", "explain", "explainer_for",
           "warm_up"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from explain import cam

        value = getattr(cam, name)
        # Kept as a module attribute, so this hook (an import statement per access, ~1.5% of the demo CNN's
        # batch-1 pass when called per explanation) runs once per name.
        globals()[name] = value
        return value
    raise AttributeError(f"module 'explain' has no attribute {name!r}")
