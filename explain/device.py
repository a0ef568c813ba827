"""Device set-up: GPU memory growth and mixed precision, applied by :func:`configure_device` when called.

Nothing here runs at import: the process calls :func:`configure_device` once at start, before it builds or
loads a model (today ``dicom_node.process.processor.load_processor`` and the benchmarks).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import tensorflow as tf

logger = logging.getLogger(__name__)

MIXED_PRECISION_ENV = "CXR_LENS_MIXED_PRECISION"


@dataclass(frozen=True)
class DeviceSetup:
    """What :func:`configure_device` found and set."""

    gpus: int
    memory_growth: bool
    mixed_precision: bool


def _gpu_supports_float16(gpu: Any) -> bool:
    details = tf.config.experimental.get_device_details(gpu)
    return details.get("compute_capability", (0, 0)) >= (7, 0)


def enable_memory_growth() -> bool:
    """Let TensorFlow grow GPU memory on demand instead of taking all of it; True if set on every GPU."""
    gpus = tf.config.list_physical_devices("GPU")
    enabled = bool(gpus)
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            enabled = False
            logger.warning("GPU %s was initialised before memory growth could be enabled", gpu.name)
    return enabled


def configure_device(mixed_precision: bool | None = None) -> DeviceSetup:
    """Turn on GPU memory growth, and mixed precision where the GPU has fast float16 (compute capability >= 7).

    Call once at start, before building or loading the model (the policy applies to models created afterwards)
    and before the first GPU op (memory growth can only be set on a GPU not yet initialised).
    ``mixed_precision`` None reads ``CXR_LENS_MIXED_PRECISION`` (1/0), else enables it when supported. The CAM
    maths always runs in float32; on CPU nothing changes, so results there are identical.
    """
    growth = enable_memory_growth()
    gpus = tf.config.list_physical_devices("GPU")
    if mixed_precision is None:
        setting = os.environ.get(MIXED_PRECISION_ENV)
        mixed_precision = setting == "1" if setting is not None else True
    enabled = bool(mixed_precision and gpus and all(_gpu_supports_float16(gpu) for gpu in gpus))
    if enabled:
        import keras

        keras.mixed_precision.set_global_policy("mixed_float16")
        try:
            import tf_keras
        except ImportError:
            pass
        else:
            tf_keras.mixed_precision.set_global_policy("mixed_float16")
        logger.info("mixed precision (float16 compute) enabled on %d GPU(s)", len(gpus))
    return DeviceSetup(gpus=len(gpus), memory_growth=growth, mixed_precision=enabled)
