"""The compiled pass per Keras backend: TensorFlow (``tf.function`` + ``GradientTape``) and JAX (``jax.jit`` +
``jax.vjp``).

Keras fixes its backend per process, when it is first imported (``KERAS_BACKEND``; the node sets it from
``model.backend`` before that, see ``dicom_node.startup.configure_keras_backend``). A tf_keras model is a
TensorFlow model whatever Keras' backend, so it runs on TensorFlow only. Each backend's module is imported only
when chosen: a JAX process never imports TensorFlow.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from explain.engine import BaseCAM, Pass

BACKENDS = ("tensorflow", "jax")


def is_tf_keras(network: Any) -> bool:
    """True for a model built or loaded by tf_keras (the legacy Keras 2 package)."""
    return type(network).__module__.split(".")[0] == "tf_keras"


def backend_of(network: Any) -> str:
    """The backend that runs ``network``: Keras' own for a Keras 3 model, TensorFlow for a tf_keras one."""
    import keras

    keras_backend = keras.config.backend()
    if is_tf_keras(network):
        if keras_backend != "tensorflow":
            raise ValueError(
                f"a tf_keras model runs on TensorFlow only, and Keras in this process runs on {keras_backend!r}"
            )
        return "tensorflow"
    if keras_backend not in BACKENDS:
        raise ValueError(f"Keras backend {keras_backend!r} is not supported; use one of {', '.join(BACKENDS)}")
    return keras_backend


def pass_for(explainer: BaseCAM, network: Any) -> Pass:
    """The compiled pass of ``explainer`` on the backend that runs ``network``."""
    if backend_of(network) == "jax":
        from explain.backends.jax import JaxPass

        return JaxPass(explainer, network)
    from explain.backends.tensorflow import TensorFlowPass

    return TensorFlowPass(explainer)


def forward_for(network: Any, shape: tuple[int, ...]) -> Callable[[np.ndarray], np.ndarray]:
    """The bare forward pass of ``network`` for images of ``shape``, compiled on its backend."""
    if backend_of(network) == "jax":
        from explain.backends.jax import compiled_forward

        return compiled_forward(network, shape)
    from explain.backends.tensorflow import compiled_forward as tf_forward

    return tf_forward(network, shape)
