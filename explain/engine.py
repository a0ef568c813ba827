"""The compiled pass: one traced call gives the prediction and the heatmap together.

:class:`BaseCAM` owns the pass: a single ``tf.function`` that calls the network once (``training=False``),
records the target feature maps ``A`` and the pre-softmax logits (see :mod:`explain.layers`), and takes
``G = d y^c / d A`` inside the same graph. A method (see :mod:`explain.methods`) overrides only
:meth:`BaseCAM.weights`; the map is ``ReLU(sum_k W_k * A_k)`` (Selvaraju et al. 2017, eq. 2, with ``W``
broadcastable to ``A``).

A method whose weights depend on ``G`` only through its spatial sum ``S_k = sum_ij G_ijk`` (Grad-CAM's eq. 1)
also defines :meth:`BaseCAM.weights_from_sums`. When ``A`` feeds only a global average or max pooling ``p``,
``S = d y^c / d p`` exactly, and the pass takes that gradient instead, skipping the pooling's backward pass
(for the demo CNN's 32x32 map, most of the cost of the explanation over the bare forward pass).

The pass is traced once per batch-size bucket (powers of two up to :data:`MAX_BUCKET`): a batch is padded up
to its bucket and the results sliced, so a worker that sees batches of 1..16 compiles at most five graphs.
Explaining the predicted class (what the node does) is one traced entry point with the images as its only
input; naming classes traces a second one per bucket, on first use. Either returns its three results packed in
one vector (see :func:`_pack`): for a small network at batch 1, each extra input or output of a traced call
costs about a percent of the pass.

:func:`explainer_for` keeps one explainer per (network, method, target layer); :func:`explain` and
:func:`warm_up` are what callers use. Importing this module sets nothing up: see :mod:`explain.device`.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

import numpy as np
import tensorflow as tf

from explain.layers import AUTO, Head, HeadKind, capture, find_global_pooling, find_head, find_target_layer

logger = logging.getLogger(__name__)

MAX_BUCKET = 32
_NO_CLASS = -1  # "explain the predicted class", resolved inside the graph


@dataclass(frozen=True)
class Explanation:
    """Prediction and heatmaps from one pass.

    ``heatmaps`` are at the target layer's resolution, after the method's ReLU, before any normalisation or
    resizing (see :mod:`explain.render`). Arrays are read-only.
    """

    probabilities: np.ndarray  # (B, C) float32, the model's own outputs
    class_index: np.ndarray  # (B,) int, the explained class per image
    heatmaps: np.ndarray  # (B, h, w) float32
    method: str
    target_layer: str


class GradientSource(Enum):
    """Which gradient a traced pass took."""

    FEATURE_MAPS = "feature_maps"  # G = dy/dA, element-wise
    POOLED = "pooled"  # dy/dp of the global pooling fed only by A: the spatial sums of G


def _bucket(batch_size: int) -> int:
    return min(MAX_BUCKET, 1 << (batch_size - 1).bit_length())


class BaseCAM:
    """The single compiled pass for one (network, target layer); subclasses define the channel weighting.

    Calling the instance explains a batch. The network is held weakly, so a cached explainer does not keep a
    discarded model alive.
    """

    name: ClassVar[str] = ""
    # True for methods that define weights_from_sums: their weights need only sum_ij G_ijk.
    uses_gradient_sums: ClassVar[bool] = False

    def __init__(self, network: Any, target_layer: str | None = None) -> None:
        target = find_target_layer(network, target_layer)
        self.target_layer: str = target.path
        # Read once: Keras builds these lists on every access (~30 us, 1% of a small network's pass).
        self.input_shape: tuple[int | None, ...] = tuple(network.inputs[0].shape)[1:]
        self.num_classes: int = int(tuple(network.outputs[0].shape)[-1])
        self._network = weakref.ref(network)
        # Two traced entry points with required arguments only: a ConcreteFunction traced from one method with an
        # optional argument (class_index=None) was measured ~0.7 ms slower per call (~25% of the demo CNN's pass).
        self._predicted_function = tf.function(self._pass_predicted, autograph=False)
        self._classes_function = tf.function(self._pass_classes, autograph=False)
        self._concrete: dict[tuple[tuple[int, ...], bool], tuple[Any, tuple[int, int] | None]] = {}
        # Heatmap (h, w) per traced input shape; None where it is only known when the pass runs (see _pack).
        self._map_shapes: dict[tuple[int, ...], tuple[int, int] | None] = {}
        self._lock = threading.Lock()
        self.trace_count = 0
        # Set by each trace: whether the pass read the weights from the pooled gradient (the same for all buckets).
        self.gradient_source: GradientSource | None = None

    def weights(self, activations: tf.Tensor, gradients: tf.Tensor) -> tf.Tensor:
        """Per-channel (or per-element) weights ``W`` for ``A`` (B, h, w, k), given ``G = dy^c/dA``."""
        raise NotImplementedError

    def weights_from_sums(self, gradient_sums: tf.Tensor, area: tf.Tensor) -> tf.Tensor:
        """Per-channel weights (B, 1, 1, k) from ``S_k = sum_ij G_ijk`` (B, k) and ``Z = h * w``.

        Only for methods with ``uses_gradient_sums``; must equal :meth:`weights` for the same ``G``.
        """
        raise NotImplementedError

    def combine(self, activations: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
        """Eq. 2: ``ReLU(sum_k W_k A_k)`` -> (B, h, w)."""
        if weights.shape[1] == 1 and weights.shape[2] == 1:  # per-channel weights: one contraction over k
            if activations.shape[0] == 1:
                # One image: a plain (h*w, k) x (k, 1) matmul. oneDNN's batched matmul (what einsum becomes)
                # takes ~5x longer at batch 1 on CPU, several percent of a small network's forward pass.
                channels = activations.shape[-1]
                maps = tf.matmul(tf.reshape(activations, (-1, channels)), tf.reshape(weights, (channels, 1)))
                return tf.nn.relu(tf.reshape(maps, tf.shape(activations)[:3]))
            return tf.nn.relu(tf.einsum("bhwk,bk->bhw", activations, weights[:, 0, 0, :]))
        return tf.nn.relu(tf.reduce_sum(weights * activations, axis=-1))

    def _network_or_raise(self) -> Any:
        network = self._network()
        if network is None:
            raise RuntimeError("the network this explainer was built for no longer exists")
        return network

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
        self.trace_count += 1
        network = self._network_or_raise()
        target = find_target_layer(network, self.target_layer)
        head: Head = find_head(network)
        pooling = find_global_pooling(network, target) if self.uses_gradient_sums else None
        # Only A is watched (in the capture hook): the backbone before A is not recorded, so the graph holds
        # no backward ops for it — just the head's, from y^c back to A. The pooled output p is watched on a tape
        # of its own, so that the gradient taken there does not also go back through the pooling to A.
        with (
            tf.GradientTape(watch_accessed_variables=False) as tape,
            tf.GradientTape(watch_accessed_variables=False) as pooled_tape,
        ):
            with capture(target, head, tape, pooling, None if pooling is None else pooled_tape) as captured:
                probabilities = network(images, training=False)
        if captured.activations is None:
            raise RuntimeError(f"target layer {self.target_layer!r} was not called by the network")
        logits = probabilities if head.kind is HeadKind.OUTPUT else captured.logits
        if logits is None:
            raise RuntimeError(f"the final layer {head.layer.name!r} did not apply its activation")
        # "Explain the predicted class" is traced without a class input (the common case): no input to feed and
        # no select in the graph, ~2% of the demo CNN's batch-1 pass on CPU.
        chosen = tf.argmax(probabilities, axis=-1, output_type=tf.int64)
        if class_index is not None:
            chosen = tf.where(class_index == _NO_CLASS, chosen, class_index)
        # y^c summed over the batch, through its gradient: d(sum_b y_b[c_b])/dlogits is the one-hot of the chosen
        # classes, given as the seed of the backward pass instead of building the sum (and its gradient) in the
        # graph. Images are independent (training=False), so d(sum_b y_b)/dA_b = dy_b/dA_b.
        one_hot = tf.one_hot(chosen, tf.shape(logits)[-1], dtype=logits.dtype)
        activations = tf.cast(captured.activations, tf.float32)
        if pooling is not None and captured.pooled is not None:
            self.gradient_source = GradientSource.POOLED
            logger.debug(
                "%s on %s: weights from the gradient of the global %s pooling %r",
                self.name,
                self.target_layer,
                pooling.reduction,
                pooling.layer.name,
            )
            weights = self.weights_from_sums(
                tf.cast(self._gradient(pooled_tape, logits, one_hot, captured.pooled), tf.float32),
                _area(activations),
            )
        else:
            self.gradient_source = GradientSource.FEATURE_MAPS
            gradients = tf.cast(self._gradient(tape, logits, one_hot, captured.activations), tf.float32)
            weights = self.weights(activations, gradients)
        heatmaps = self.combine(activations, weights)
        return tf.cast(probabilities, tf.float32), chosen, heatmaps

    def _gradient(self, tape: tf.GradientTape, logits: tf.Tensor, one_hot: tf.Tensor, source: tf.Tensor) -> tf.Tensor:
        """``d(sum_b y_b[c_b]) / d source``, the backward pass seeded with the one-hot of the chosen classes."""
        gradient = tape.gradient(logits, source, output_gradients=one_hot)
        if gradient is None:
            raise ValueError(f"the class score does not depend on target layer {self.target_layer!r}")
        return gradient

    def _compiled(self, shape: tuple[int, ...], with_classes: bool) -> tuple[Any, tuple[int, int] | None]:
        """The concrete pass for a padded input shape, and its heatmaps' (h, w) if known when traced.

        ``with_classes``: the pass also takes a class index per image. The pass without (explain the predicted
        class) is what the node and the warm-up use; one with class input is traced only when a caller names
        classes.
        """
        key = (shape, with_classes)
        compiled = self._concrete.get(key)  # lock-free when traced already (a dict read is atomic)
        if compiled is not None:
            return compiled
        with self._lock:
            compiled = self._concrete.get(key)
            if compiled is None:
                logger.debug("tracing %s on %s for input %s", self.name, self.target_layer, shape)
                images = tf.TensorSpec(shape, tf.float32)
                if with_classes:
                    function = self._classes_function.get_concrete_function(images, tf.TensorSpec(shape[:1], tf.int64))
                else:
                    function = self._predicted_function.get_concrete_function(images)
                compiled = (function, self._map_shapes[shape])
                self._concrete[key] = compiled
            return compiled

    def __call__(self, images: np.ndarray, class_index: np.ndarray | None = None) -> Explanation:
        """Explain ``images`` (B, H, W, C float32); ``class_index`` (B,) ints, -1 or None for "predicted"."""
        if images.shape[0] == 0:
            raise ValueError("no images to explain")
        if class_index is not None:
            class_index = np.asarray(class_index, dtype=np.int64)
        if images.shape[0] <= MAX_BUCKET:
            probabilities, chosen, heatmaps = self._run(images, class_index)  # read-only already
        else:
            chunks = [
                self._run(
                    images[start : start + MAX_BUCKET],
                    None if class_index is None else class_index[start : start + MAX_BUCKET],
                )
                for start in range(0, images.shape[0], MAX_BUCKET)
            ]
            probabilities, chosen, heatmaps = (_frozen(np.concatenate(part)) for part in zip(*chunks, strict=True))
        return Explanation(probabilities, chosen, heatmaps, self.name, self.target_layer)

    def _run(self, images: np.ndarray, class_index: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One chunk of at most MAX_BUCKET images: pad up to the bucket, run the pass, slice the padding off."""
        size = images.shape[0]
        padding = _bucket(size) - size
        function, map_shape = self._compiled((size + padding, *images.shape[1:]), class_index is not None)
        if padding:
            images = np.concatenate([images, np.zeros((padding, *images.shape[1:]), dtype=np.float32)])
        if class_index is None:
            packed = function(tf.constant(images))
        else:
            classes = np.concatenate([class_index, np.full(padding, _NO_CLASS, dtype=np.int64)])
            packed = function(tf.constant(images), tf.constant(classes))
        return _unpack(packed.numpy(), size + padding, self.num_classes, map_shape, size)


def _pack(
    probabilities: tf.Tensor, chosen: tf.Tensor, heatmaps: tf.Tensor
) -> tuple[tf.Tensor, tuple[int, int] | None]:
    """The pass's three results as one float32 vector ``[class index | probabilities | heatmaps]``, flattened.

    One output instead of three: every output of a traced call costs a host conversion and structure packing,
    ~1% of the demo CNN's batch-1 pass on CPU. The int64 class indices travel bit for bit (two float32 words
    each, first, so that the host reads them back as an aligned int64 view without a conversion). Also returns
    the heatmaps' static (h, w); where the graph does not know it, ``[h, w]`` is appended to the vector.
    """
    classes = tf.bitcast(tf.cast(chosen, tf.int64), tf.float32)  # (B, 2)
    parts = [tf.reshape(part, [-1]) for part in (classes, probabilities, heatmaps)]
    height, width = heatmaps.shape[1:]
    if height is not None and width is not None:
        return tf.concat(parts, axis=0), (int(height), int(width))
    return tf.concat([*parts, tf.cast(tf.shape(heatmaps)[1:], tf.float32)], axis=0), None


def _unpack(
    flat: np.ndarray, batch: int, num_classes: int, map_shape: tuple[int, int] | None, keep: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split a :func:`_pack` result of ``batch`` images back into its three arrays, keeping the first ``keep``.

    All three are read-only views of ``flat`` (made read-only first).
    """
    flat.setflags(write=False)
    if map_shape is None:
        map_shape = (int(flat[-2]), int(flat[-1]))
        flat = flat[:-2]
    end_classes = 2 * batch
    end_probabilities = end_classes + batch * num_classes
    classes = flat[:end_classes].view(np.int64)
    probabilities = flat[end_classes:end_probabilities].reshape(batch, num_classes)
    heatmaps = flat[end_probabilities:].reshape(batch, *map_shape)
    if keep == batch:
        return probabilities, classes, heatmaps
    return probabilities[:keep], classes[:keep], heatmaps[:keep]


def _frozen(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


def _area(feature_maps: tf.Tensor) -> tf.Tensor:
    """``Z = h * w`` of (B, h, w, k) maps, as float32 (static when the shape is known)."""
    height, width = feature_maps.shape[1], feature_maps.shape[2]
    if height is not None and width is not None:
        return tf.constant(float(height * width), tf.float32)
    shape = tf.shape(feature_maps)
    return tf.cast(shape[1] * shape[2], tf.float32)


_CACHE: weakref.WeakKeyDictionary[Any, dict[tuple[str, str], BaseCAM]] = weakref.WeakKeyDictionary()
_CACHE_LOCK = threading.Lock()


def explainer_for(network: Any, method: str = "gradcam", target_layer: str | None = None) -> BaseCAM:
    """The cached explainer for (network, method, target layer); built on first use."""
    requested = AUTO if target_layer is None else target_layer
    # Lock-free lookup first (a dict read is atomic): explain() calls this per batch, and the lock plus the
    # WeakKeyDictionary's bookkeeping cost ~1% of the demo CNN's pass at batch 1.
    per_network = _CACHE.get(network)
    explainer = None if per_network is None else per_network.get((method, requested))
    if explainer is not None:
        return explainer
    # Imported on a miss only: the methods subclass BaseCAM, so this module cannot import them at its top.
    from explain.methods import METHODS

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    with _CACHE_LOCK:
        per_network = _CACHE.setdefault(network, {})
        explainer = per_network.get((method, requested))
        if explainer is None:
            explainer = METHODS[method](network, requested)
            per_network[(method, requested)] = explainer
            per_network.setdefault((method, explainer.target_layer), explainer)
        return explainer


def _class_indices(class_index: int | Sequence[int] | None, batch: int, num_classes: int) -> np.ndarray | None:
    if class_index is None:
        return None
    if isinstance(class_index, (int, np.integer)):
        indices = np.full(batch, int(class_index), dtype=np.int64)
    else:
        indices = np.asarray(class_index)
        if indices.shape != (batch,) or not np.issubdtype(indices.dtype, np.integer):
            raise ValueError(f"class_index must be an int or {batch} ints, got {class_index!r}")
    if np.any((indices < 0) | (indices >= num_classes)):
        raise ValueError(f"class_index {class_index!r} out of range for {num_classes} classes")
    return indices.astype(np.int64, copy=False)


_FLOAT32 = np.dtype(np.float32)


def _checked_images(images: Any, expected: tuple[int | None, ...]) -> np.ndarray:
    if type(images) is np.ndarray and images.dtype is _FLOAT32 and images.shape[1:] == expected and len(images):
        return images  # what the node passes; the checks below take a few microseconds more (0.2% at batch 1)
    array = np.asarray(images)
    if array.ndim != 4 or array.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (B, H, W, C) array, got shape {array.shape}")
    if array.dtype != np.float32 and not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"images must be preprocessed floating point, got {array.dtype}")
    if any(e is not None and e != a for e, a in zip(expected, array.shape[1:], strict=True)):
        raise ValueError(f"images have shape {array.shape[1:]}, the model expects {expected}")
    return array.astype(np.float32, copy=False)


def _explainer_of(model: Any, method: str, target_layer: str | None) -> BaseCAM:
    """The explainer for a Keras model or a ``LoadedModel`` (whose ``target_layer`` is the default target)."""
    network = getattr(model, "network", model)
    if target_layer is None:
        target_layer = getattr(model, "target_layer", None) if network is not model else None
    return explainer_for(network, method, target_layer)


def explain(
    model: Any,
    images: np.ndarray,
    *,
    method: str = "gradcam",
    class_index: int | Sequence[int] | None = None,
    target_layer: str | None = None,
) -> Explanation:
    """Predict and explain ``images`` (B, H, W, C float32, preprocessed) in one compiled pass.

    ``model`` is a Keras 3 / tf_keras model or a ``LoadedModel`` (anything with ``.network``; its
    ``.target_layer`` is the default target). ``class_index``: None (the predicted class), an int, or one per
    image. ``target_layer``: a layer name or nested path; None/"auto" picks the last 4-D map above 1x1.
    """
    explainer = _explainer_of(model, method, target_layer)
    array = _checked_images(images, explainer.input_shape)
    if class_index is None:
        return explainer(array)
    return explainer(array, _class_indices(class_index, array.shape[0], explainer.num_classes))


def warm_up(
    model: Any,
    max_batch: int,
    *,
    method: str = "gradcam",
    target_layer: str | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[int, ...]:
    """Trace the pass for every batch-size bucket up to ``max_batch`` now, on zeros; returns the buckets traced.

    Each bucket is traced on first use, and tracing costs far more than a pass (seconds of CPU for
    InceptionV3): a server calls this at start so that the first partial batch under load does not stall.
    ``should_stop`` is asked before each bucket (a server that is told to stop meanwhile).
    """
    explainer = _explainer_of(model, method, target_layer)
    shape = explainer.input_shape
    if None in shape:  # a model that takes any size: the size it is fed (LoadedModel)
        shape = (*model.input_size, model.channels)
    traced = []
    for bucket in sorted({_bucket(n) for n in range(1, min(max_batch, MAX_BUCKET) + 1)}):
        if should_stop is not None and should_stop():
            break
        explainer(np.zeros((bucket, *shape), dtype=np.float32), None)
        traced.append(bucket)
    return tuple(traced)
