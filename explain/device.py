"""Device set-up: GPU memory growth and mixed precision, applied by :func:`configure_device` when called.

Nothing here runs at import: the process calls :func:`configure_device` once at start, before it builds or
loads a model (today ``dicom_node.process.processor.load_processor`` and the benchmarks), and after Keras'
backend is chosen (``KERAS_BACKEND``). On TensorFlow it sets memory growth on every GPU; on JAX it turns off
XLA's up-front reservation of most of the GPU's memory (``XLA_PYTHON_CLIENT_PREALLOCATE=false``, effective when
set before JAX first touches a device). Only the chosen backend's framework is imported.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

MIXED_PRECISION_ENV = "CXR_LENS_MIXED_PRECISION"
# Half-precision compute on both backends (variables, the output layer and the CAM maths stay float32): float16,
# fast from compute capability 7.0. bfloat16 (capability 8.0) would keep float32's exponent range, but its maps
# were 5x further from float32's (README, "Performance").
MIXED_POLICY = "mixed_float16"
_MINIMUM_CAPABILITY = (7, 0)
_PREALLOCATE_ENV = "XLA_PYTHON_CLIENT_PREALLOCATE"


@dataclass(frozen=True)
class DeviceSetup:
    """What :func:`configure_device` found and set."""

    gpus: int
    memory_growth: bool
    mixed_precision: bool
    backend: str = "tensorflow"
    policy: str = "float32"  # the global Keras dtype policy afterwards


def _gpu_supports_float16(gpu: Any) -> bool:
    import tensorflow as tf

    details = tf.config.experimental.get_device_details(gpu)
    return bool(details.get("compute_capability", (0, 0)) >= _MINIMUM_CAPABILITY)


def enable_memory_growth() -> bool:
    """Let TensorFlow grow GPU memory on demand instead of taking all of it; True if set on every GPU."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    enabled = bool(gpus)
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            enabled = False
            logger.warning("GPU %s was initialised before memory growth could be enabled", gpu.name)
    return enabled


def _tensorflow_gpus() -> tuple[int, bool, bool]:
    """(GPUs, memory growth set on all, all fast in half precision) on TensorFlow."""
    import tensorflow as tf

    growth = enable_memory_growth()
    gpus = tf.config.list_physical_devices("GPU")
    return len(gpus), growth, bool(gpus) and all(_gpu_supports_float16(gpu) for gpu in gpus)


def _capability(device: Any) -> tuple[int, ...]:
    text = str(getattr(device, "compute_capability", "0.0"))
    try:
        return tuple(int(part) for part in text.split("."))
    except ValueError:
        return (0, 0)


def _jax_gpus() -> tuple[int, bool, bool]:
    """(GPUs, on-demand allocation, all fast in float16) on JAX."""
    os.environ.setdefault(_PREALLOCATE_ENV, "false")  # read when JAX creates its GPU client, on first device use
    import jax

    gpus = [device for device in jax.devices() if device.platform == "gpu"]
    growth = bool(gpus) and os.environ[_PREALLOCATE_ENV].lower() == "false"
    fast = bool(gpus) and all(_capability(device) >= _MINIMUM_CAPABILITY for device in gpus)
    return len(gpus), growth, fast


def configure_device(mixed_precision: bool | None = None) -> DeviceSetup:
    """Turn on GPU memory growth, and mixed precision where every GPU has fast half precision.

    Call once at start, before building or loading the model (the policy applies to models created or loaded
    afterwards) and before the first GPU operation (memory growth can only be set on a GPU not yet initialised).
    ``mixed_precision`` None reads ``CXR_LENS_MIXED_PRECISION`` (1/0), else enables it when supported. The CAM
    maths always runs in float32; on CPU nothing changes, so results there are identical.
    """
    import keras

    backend = keras.config.backend()
    gpus, growth, capable = _jax_gpus() if backend == "jax" else _tensorflow_gpus()
    if mixed_precision is None:
        setting = os.environ.get(MIXED_PRECISION_ENV)
        mixed_precision = setting == "1" if setting is not None else True
    enabled = bool(mixed_precision and capable)
    if enabled:
        keras.mixed_precision.set_global_policy(MIXED_POLICY)
        if backend == "tensorflow":
            try:
                import tf_keras
            except ImportError:
                pass
            else:
                tf_keras.mixed_precision.set_global_policy(MIXED_POLICY)
        logger.info("mixed precision (float16 compute) enabled on %d GPU(s)", gpus)
    return DeviceSetup(
        gpus=gpus,
        memory_growth=growth,
        mixed_precision=enabled,
        backend=backend,
        policy=keras.mixed_precision.global_policy().name,
    )
