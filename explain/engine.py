"""The explainer: one compiled pass per batch-size bucket gives the prediction and the heatmap together.

:class:`BaseCAM` owns the pass, on whichever Keras backend the process runs (TensorFlow, or JAX for a Keras 3
model; see :mod:`explain.backends`): a single compiled function that calls the network once
(``training=False``), records the target feature maps ``A`` and the pre-softmax logits (see
:mod:`explain.layers`), and takes ``G = d y^c / d A`` inside the same computation. A method (see
:mod:`explain.methods`) overrides only :meth:`BaseCAM.weights`; the map is ``ReLU(sum_k W_k * A_k)``
(Selvaraju et al. 2017, eq. 2, with ``W`` broadcastable to ``A``). The method maths is written once, with
``keras.ops``, and runs inside either backend's pass.

A method whose weights depend on ``G`` only through its spatial sum ``S_k = sum_ij G_ijk`` (Grad-CAM's eq. 1)
also defines :meth:`BaseCAM.weights_from_sums`. When ``A`` feeds only a global average or max pooling ``p``,
``S = d y^c / d p`` exactly, and the pass takes that gradient instead, skipping the pooling's backward pass
(for the demo CNN's 32x32 map, most of the cost of the explanation over the bare forward pass).

The pass is compiled once per batch-size bucket (powers of two up to :data:`MAX_BUCKET` on a CPU,
:data:`MAX_GPU_BUCKET` on a GPU; larger batches run in chunks of that size): a batch is padded up to its bucket
and the results sliced, so a worker that sees batches of 1..16 compiles at most five passes.
Explaining the predicted class (what the node does) is one compiled entry point with the images as its only
input; naming classes compiles a second one per bucket, on first use. Either returns its three results packed
in one float32 vector ``[class index as int64 words | probabilities | heatmaps]`` (see :func:`_unpack`): for a
small network at batch 1, each extra input or output of a compiled call costs about a percent of the pass.

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
from typing import Any, ClassVar, Protocol

import numpy as np
from keras import ops

from explain.layers import AUTO, find_target_layer

logger = logging.getLogger(__name__)

MAX_BUCKET = 32  # the largest pass on a CPU; larger batches run in chunks, so a pass's memory stays bounded
MAX_GPU_BUCKET = 256  # a GPU fills up only with batches of hundreds of images
NO_CLASS = -1  # "explain the predicted class", resolved inside the pass


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
    """Which gradient a compiled pass took."""

    FEATURE_MAPS = "feature_maps"  # G = dy/dA, element-wise
    POOLED = "pooled"  # dy/dp of the global pooling fed only by A: the spatial sums of G


@dataclass(frozen=True, slots=True)
class Compiled:
    """One bucket's compiled pass: ``run(images, class_index)`` returns the packed float32 vector.

    ``class_index`` is None for the predicted-class pass (which ignores it). ``function`` is the backend's own
    compiled object (a TensorFlow ConcreteFunction, a JAX ``Compiled``), kept for inspection.
    """

    run: Callable[[np.ndarray, np.ndarray | None], np.ndarray]
    map_shape: tuple[int, int] | None  # the heatmaps' (h, w); None where the vector carries it (see _unpack)
    function: Any


class Pass(Protocol):
    """A backend's compiled pass for one explainer (see :mod:`explain.backends`)."""

    @property
    def on_gpu(self) -> bool: ...

    def compile(self, shape: tuple[int, ...], with_classes: bool) -> Compiled: ...


def _bucket(batch_size: int, max_bucket: int = MAX_BUCKET) -> int:
    return min(max_bucket, 1 << (batch_size - 1).bit_length())


class BaseCAM:
    """The single compiled pass for one (network, target layer); subclasses define the channel weighting.

    Calling the instance explains a batch. The network is held weakly, so a cached explainer does not keep a
    discarded model alive. The weighting hooks take and return ``keras.ops`` tensors of the running backend.
    """

    name: ClassVar[str] = ""
    # True for methods that define weights_from_sums: their weights need only sum_ij G_ijk.
    uses_gradient_sums: ClassVar[bool] = False

    def __init__(self, network: Any, target_layer: str | None = None) -> None:
        from explain.backends import pass_for

        target = find_target_layer(network, target_layer)
        self.target_layer: str = target.path
        # Read once: Keras builds these lists on every access (~30 us, 1% of a small network's pass).
        self.input_shape: tuple[int | None, ...] = tuple(network.inputs[0].shape)[1:]
        self.num_classes: int = int(tuple(network.outputs[0].shape)[-1])
        self._network = weakref.ref(network)
        self._pass: Pass = pass_for(self, network)
        self.max_bucket: int = MAX_GPU_BUCKET if self._pass.on_gpu else MAX_BUCKET
        self._concrete: dict[tuple[tuple[int, ...], bool], Compiled] = {}
        self._lock = threading.Lock()
        # Set by the backend's pass each time it traces (once per bucket and entry point).
        self.trace_count = 0
        # Set by each trace: whether the pass read the weights from the pooled gradient (the same for all buckets).
        self.gradient_source: GradientSource | None = None

    def weights(self, activations: Any, gradients: Any) -> Any:
        """Per-channel (or per-element) weights ``W`` for ``A`` (B, h, w, k), given ``G = dy^c/dA``."""
        raise NotImplementedError

    def weights_from_sums(self, gradient_sums: Any, area: Any) -> Any:
        """Per-channel weights (B, 1, 1, k) from ``S_k = sum_ij G_ijk`` (B, k) and ``Z = h * w``.

        Only for methods with ``uses_gradient_sums``; must equal :meth:`weights` for the same ``G``.
        """
        raise NotImplementedError

    def combine(self, activations: Any, weights: Any) -> Any:
        """Eq. 2: ``ReLU(sum_k W_k A_k)`` -> (B, h, w)."""
        if weights.shape[1] == 1 and weights.shape[2] == 1:  # per-channel weights: one contraction over k
            if activations.shape[0] == 1:
                # One image: a plain (h*w, k) x (k, 1) matmul. oneDNN's batched matmul (what einsum becomes)
                # takes ~5x longer at batch 1 on CPU, several percent of a small network's forward pass.
                channels = activations.shape[-1]
                maps = ops.matmul(ops.reshape(activations, (-1, channels)), ops.reshape(weights, (channels, 1)))
                return ops.relu(ops.reshape(maps, ops.shape(activations)[:3]))
            return ops.relu(ops.einsum("bhwk,bk->bhw", activations, weights[:, 0, 0, :]))
        return ops.relu(ops.sum(weights * activations, axis=-1))

    def heatmaps(self, activations: Any, gradients: Any) -> Any:
        """The maps from ``A`` and ``G`` of any float dtype; the CAM maths runs in float32."""
        activations = ops.cast(activations, "float32")
        return self.combine(activations, self.weights(activations, ops.cast(gradients, "float32")))

    def heatmaps_from_sums(self, activations: Any, gradient_sums: Any) -> Any:
        """The maps from ``A`` and ``S = dy/dp`` (the pooled gradient), in float32."""
        activations = ops.cast(activations, "float32")
        weights = self.weights_from_sums(ops.cast(gradient_sums, "float32"), _area(activations))
        return self.combine(activations, weights)

    def network(self) -> Any:
        """The network explained; raises once it no longer exists."""
        network = self._network()
        if network is None:
            raise RuntimeError("the network this explainer was built for no longer exists")
        return network

    def _compiled(self, shape: tuple[int, ...], with_classes: bool) -> Compiled:
        """The compiled pass for a padded input shape.

        ``with_classes``: the pass also takes a class index per image. The pass without (explain the predicted
        class) is what the node and the warm-up use; one with class input is compiled only when a caller names
        classes.
        """
        key = (shape, with_classes)
        compiled = self._concrete.get(key)  # lock-free when compiled already (a dict read is atomic)
        if compiled is not None:
            return compiled
        with self._lock:
            compiled = self._concrete.get(key)
            if compiled is None:
                logger.debug("compiling %s on %s for input %s", self.name, self.target_layer, shape)
                compiled = self._pass.compile(shape, with_classes)
                self._concrete[key] = compiled
            return compiled

    def __call__(self, images: np.ndarray, class_index: np.ndarray | None = None) -> Explanation:
        """Explain ``images`` (B, H, W, C float32); ``class_index`` (B,) ints, -1 or None for "predicted"."""
        if images.shape[0] == 0:
            raise ValueError("no images to explain")
        if class_index is not None:
            class_index = np.asarray(class_index, dtype=np.int64)
        chunk = self.max_bucket
        if images.shape[0] <= chunk:
            probabilities, chosen, heatmaps = self._run(images, class_index)  # read-only already
        else:
            chunks = [
                self._run(
                    images[start : start + chunk],
                    None if class_index is None else class_index[start : start + chunk],
                )
                for start in range(0, images.shape[0], chunk)
            ]
            probabilities, chosen, heatmaps = (_frozen(np.concatenate(part)) for part in zip(*chunks, strict=True))
        return Explanation(probabilities, chosen, heatmaps, self.name, self.target_layer)

    def _run(self, images: np.ndarray, class_index: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One chunk of at most ``max_bucket`` images: pad up to the bucket, run the pass, slice the padding off."""
        size = images.shape[0]
        padding = _bucket(size, self.max_bucket) - size
        compiled = self._compiled((size + padding, *images.shape[1:]), class_index is not None)
        if padding:
            images = np.concatenate([images, np.zeros((padding, *images.shape[1:]), dtype=np.float32)])
        if class_index is not None:
            class_index = np.concatenate([class_index, np.full(padding, NO_CLASS, dtype=np.int64)])
        return _unpack(compiled.run(images, class_index), size + padding, self.num_classes, compiled.map_shape, size)


def _unpack(
    flat: np.ndarray, batch: int, num_classes: int, map_shape: tuple[int, int] | None, keep: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split a packed result of ``batch`` images back into its three arrays, keeping the first ``keep``.

    The vector is ``[class indices | probabilities | heatmaps]``, each flattened, with the int64 class indices
    travelling bit for bit as two float32 words each (first, so that the host reads them back as an aligned int64
    view without a conversion); where the pass did not know the heatmaps' (h, w) when compiled, ``[h, w]`` ends
    the vector. All three are read-only views of ``flat`` (made read-only first).
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


def _area(feature_maps: Any) -> Any:
    """``Z = h * w`` of (B, h, w, k) maps: a Python float when the shape is static, else a float32 tensor."""
    height, width = feature_maps.shape[1], feature_maps.shape[2]
    if height is not None and width is not None:
        return float(height * width)
    shape = ops.shape(feature_maps)
    return ops.cast(shape[1] * shape[2], "float32")


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

    ``model`` is a Keras 3 model (TensorFlow or JAX backend), a tf_keras model (TensorFlow only) or a
    ``LoadedModel`` (anything with ``.network``; its ``.target_layer`` is the default target). ``class_index``:
    None (the predicted class), an int, or one per image. ``target_layer``: a layer name or nested path;
    None/"auto" picks the last 4-D map above 1x1.
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
    """Compile the pass for every batch-size bucket up to ``max_batch`` now, on zeros; returns the buckets.

    Each bucket is compiled on first use, and compiling costs far more than a pass (seconds of CPU for
    InceptionV3): a server calls this at start so that the first partial batch under load does not stall.
    ``should_stop`` is asked before each bucket (a server that is told to stop meanwhile).
    """
    explainer = _explainer_of(model, method, target_layer)
    declared = explainer.input_shape
    # A model that takes any size: the size it is fed (LoadedModel).
    shape = (*model.input_size, model.channels) if None in declared else tuple(int(n or 0) for n in declared)
    traced = []
    top = explainer.max_bucket
    for bucket in sorted({_bucket(n, top) for n in range(1, min(max_batch, top) + 1)}):
        if should_stop is not None and should_stop():
            break
        explainer(np.zeros((bucket, *shape), dtype=np.float32), None)
        traced.append(bucket)
    return tuple(traced)


def compiled_forward(network: Any, shape: tuple[int, ...]) -> Callable[[np.ndarray], np.ndarray]:
    """The network's bare forward pass for float32 images of ``shape`` (B, H, W, C), compiled on its backend.

    The baseline the benchmarks hold the explainer's pass against. TensorFlow: a ``tf.function``'s concrete
    function; JAX: ``jax.jit`` of the stateless call, compiled ahead of time, with the weights read once (a
    lower bound: the explainer's pass reads them on every call). Numpy images in, numpy outputs out.
    """
    from explain.backends import forward_for

    return forward_for(network, shape)
