"""Explain a chest-radiograph classifier's decision with class activation maps.

The public names load Keras and its backend (TensorFlow or JAX, fixed per process by ``KERAS_BACKEND``) on first
use (PEP 562), so that ``import explain.render`` — pure numpy/cv2 — stays free of them for the DICOM side of the
node. Importing sets nothing up: a process calls :func:`configure_device` itself, once, before it loads a model.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from explain.device import DeviceSetup, configure_device
    from explain.engine import BaseCAM, Explanation, compiled_forward, explain, explainer_for, warm_up
    from explain.methods import METHODS

# Public name -> the submodule that defines it.
_SOURCES = {
    "METHODS": "explain.methods",
    "BaseCAM": "explain.engine",
    "DeviceSetup": "explain.device",
    "Explanation": "explain.engine",
    "compiled_forward": "explain.engine",
    "configure_device": "explain.device",
    "explain": "explain.engine",
    "explainer_for": "explain.engine",
    "warm_up": "explain.engine",
}

__all__ = ["METHODS", "BaseCAM", "DeviceSetup", "Explanation", "compiled_forward", "configure_device", "explain",
           "explainer_for", "warm_up"]


def __getattr__(name: str) -> Any:
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module 'explain' has no attribute {name!r}")
    value = getattr(importlib.import_module(source), name)
    # Kept as a module attribute, so this hook (an import per access, ~1.5% of the demo CNN's batch-1 pass when
    # called per explanation) runs once per name.
    globals()[name] = value
    return value
