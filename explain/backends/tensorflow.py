"""The TensorFlow pass: one ``tf.function`` per entry point, traced once per batch-size bucket.

The network is called once inside the traced function; ``A`` is watched on a ``GradientTape`` as it is recorded
(see :func:`explain.layers.capture`), so the graph holds no backward ops for the backbone before ``A`` — just the
head's, from ``y^c`` back to ``A`` (or back to the pooled ``p``, on a tape of its own, for the pooled-gradient
shortcut). Keras 3 models on the TensorFlow backend and tf_keras models both run here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf

from explain.engine import NO_CLASS, Compiled, GradientSource
from explain.layers import Function, Recorder, capture, find_global_pooling, find_head, find_target_layer

if TYPE_CHECKING:
    from explain.engine import BaseCAM

logger = logging.getLogger(__name__)


class _TapeRecorder(Recorder):
    """Watches ``A`` on ``tape`` and the pooled ``p`` on ``pooled_tape``; reads consumers from the graph."""

    def __init__(self, tape: tf.GradientTape, pooled_tape: tf.GradientTape) -> None:
        self._tape = tape
        self._pooled_tape = pooled_tape

    def feature_maps(self, activations: Any) -> Any:
        self._tape.watch(activations)
        return activations

    def pooled(self, pooled: Any) -> Any:
        self._pooled_tape.watch(pooled)
        return pooled

    def readers(self, tensor: Any) -> frozenset[str] | None:
        if tf.executing_eagerly() or not hasattr(tensor, "consumers"):
            return None
        return frozenset(op.name for op in tensor.consumers())

    def hook(self, function: Function) -> Function:
        return tf.autograph.experimental.do_not_convert(function)


class TensorFlowPass:
    """Two traced entry points with required arguments only: the predicted class (images in), named classes.

    A ConcreteFunction traced from one method with an optional argument (class_index=None) was measured ~0.7 ms
    slower per call (~25% of the demo CNN's pass).
    """

    def __init__(self, explainer: BaseCAM) -> None:
        self._explainer = explainer
        self.on_gpu = bool(tf.config.list_logical_devices("GPU"))  # where TensorFlow places the pass
        self._predicted_function = tf.function(self._pass_predicted, autograph=False)
        self._classes_function = tf.function(self._pass_classes, autograph=False)
        # Heatmap (h, w) per traced input shape; None where it is only known when the pass runs (see _pack).
        self._map_shapes: dict[tuple[int, ...], tuple[int, int] | None] = {}

    def compile(self, shape: tuple[int, ...], with_classes: bool) -> Compiled:
        images = tf.TensorSpec(shape, tf.float32)
        run: Callable[[np.ndarray, np.ndarray | None], np.ndarray]
        if with_classes:
            function = self._classes_function.get_concrete_function(images, tf.TensorSpec(shape[:1], tf.int64))

            def run(images: np.ndarray, class_index: np.ndarray | None) -> np.ndarray:
                return function(tf.constant(images), tf.constant(class_index)).numpy()

        else:
            function = self._predicted_function.get_concrete_function(images)

            def run(images: np.ndarray, class_index: np.ndarray | None) -> np.ndarray:
                return function(tf.constant(images)).numpy()

        return Compiled(run, self._map_shapes[shape], function)

    def _pass_predicted(self, images: tf.Tensor) -> tf.Tensor:
        return self._packed_pass(images, None)

    def _pass_classes(self, images: tf.Tensor, class_index: tf.Tensor) -> tf.Tensor:
        return self._packed_pass(images, class_index)

    def _packed_pass(self, images: tf.Tensor, class_index: tf.Tensor | None) -> tf.Tensor:
        packed, map_shape = _pack(*self._pass(images, class_index))
        self._map_shapes[tuple(images.shape)] = map_shape
        return packed

    def _pass(self, images: tf.Tensor, class_index: tf.Tensor | None) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        # Python here runs only while tracing; the hooks it installs are gone before the graph ever runs.
        explainer = self._explainer
        explainer.trace_count += 1
        network = explainer.network()
        target = find_target_layer(network, explainer.target_layer)
        head = find_head(network)
        pooling = find_global_pooling(network, target) if explainer.uses_gradient_sums else None
        # Only A is watched (in the capture hook): the backbone before A is not recorded, so the graph holds
        # no backward ops for it — just the head's, from y^c back to A. The pooled output p is watched on a tape
        # of its own, so that the gradient taken there does not also go back through the pooling to A.
        with (
            tf.GradientTape(watch_accessed_variables=False) as tape,
            tf.GradientTape(watch_accessed_variables=False) as pooled_tape,
        ):
            with capture(target, head, _TapeRecorder(tape, pooled_tape), pooling) as captured:
                probabilities = network(images, training=False)
        logits = captured.class_scores(head, probabilities, explainer.target_layer)
        # "Explain the predicted class" is traced without a class input (the common case): no input to feed and
        # no select in the graph, ~2% of the demo CNN's batch-1 pass on CPU.
        chosen = tf.argmax(probabilities, axis=-1, output_type=tf.int64)
        if class_index is not None:
            chosen = tf.where(class_index == NO_CLASS, chosen, class_index)
        # y^c summed over the batch, through its gradient: d(sum_b y_b[c_b])/dlogits is the one-hot of the chosen
        # classes, given as the seed of the backward pass instead of building the sum (and its gradient) in the
        # graph. Images are independent (training=False), so d(sum_b y_b)/dA_b = dy_b/dA_b.
        one_hot = tf.one_hot(chosen, tf.shape(logits)[-1], dtype=logits.dtype)
        if pooling is not None and captured.pooled is not None:
            explainer.gradient_source = GradientSource.POOLED
            logger.debug(
                "%s on %s: weights from the gradient of the global %s pooling %r",
                explainer.name,
                explainer.target_layer,
                pooling.reduction,
                pooling.layer.name,
            )
            gradient_sums = self._gradient(pooled_tape, logits, one_hot, captured.pooled)
            heatmaps = explainer.heatmaps_from_sums(captured.activations, gradient_sums)
        else:
            explainer.gradient_source = GradientSource.FEATURE_MAPS
            gradients = self._gradient(tape, logits, one_hot, captured.activations)
            heatmaps = explainer.heatmaps(captured.activations, gradients)
        return tf.cast(probabilities, tf.float32), chosen, heatmaps

    def _gradient(self, tape: tf.GradientTape, logits: tf.Tensor, one_hot: tf.Tensor, source: tf.Tensor) -> tf.Tensor:
        """``d(sum_b y_b[c_b]) / d source``, the backward pass seeded with the one-hot of the chosen classes."""
        gradient = tape.gradient(logits, source, output_gradients=one_hot)
        if gradient is None:
            raise ValueError(f"the class score does not depend on target layer {self._explainer.target_layer!r}")
        return gradient


def _pack(
    probabilities: tf.Tensor, chosen: tf.Tensor, heatmaps: tf.Tensor
) -> tuple[tf.Tensor, tuple[int, int] | None]:
    """The pass's three results as one float32 vector ``[class index | probabilities | heatmaps]``, flattened.

    One output instead of three: every output of a traced call costs a host conversion and structure packing,
    ~1% of the demo CNN's batch-1 pass on CPU. The int64 class indices travel bit for bit (two float32 words
    each; see ``explain.engine._unpack``). Also returns the heatmaps' static (h, w); where the graph does not know
    it, ``[h, w]`` is appended to the vector.
    """
    classes = tf.bitcast(tf.cast(chosen, tf.int64), tf.float32)  # (B, 2)
    parts = [tf.reshape(part, [-1]) for part in (classes, probabilities, heatmaps)]
    height, width = heatmaps.shape[1:]
    if height is not None and width is not None:
        return tf.concat(parts, axis=0), (int(height), int(width))
    return tf.concat([*parts, tf.cast(tf.shape(heatmaps)[1:], tf.float32)], axis=0), None


def compiled_forward(network: Any, shape: tuple[int, ...]) -> Callable[[np.ndarray], np.ndarray]:
    """The bare forward pass for float32 images of ``shape``: a ``tf.function``'s concrete function."""
    forward = tf.function(lambda images: network(images, training=False), autograph=False)
    function = forward.get_concrete_function(tf.TensorSpec(shape, tf.float32))

    def run(images: np.ndarray) -> np.ndarray:
        return function(tf.constant(images)).numpy()

    return run
