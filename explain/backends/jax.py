"""The JAX pass: ``jax.jit`` of the network's stateless call, compiled ahead of time once per batch-size bucket.

The gradient is taken in the same compiled computation as the forward pass, with ``jax.vjp``: the recorded
``A`` (or, for the pooled-gradient shortcut, the pooled ``p``) gets a zero perturbation ``e`` added as the
network computes (see :func:`explain.layers.capture`), and the backward pass of ``e -> y`` seeded with the
one-hot of the chosen classes gives ``d y^c / d A`` (``d y^c / d p``). Only the operations after ``A`` depend
on ``e``, so only they get backward operations; XLA folds the addition of zeros away. The weights travel as
arguments (read from the model's variables on every call, so that a model whose weights change is explained with
its current ones), not as constants baked into the executable.

Each bucket is traced twice when compiled: once abstractly (``jax.eval_shape``) to learn the shape and dtype
of ``A`` or ``p`` and whether the pooling shortcut applies, then for real. A JAX process never imports
TensorFlow.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from explain.engine import NO_CLASS, Compiled, GradientSource
from explain.layers import Recorder, capture, find_global_pooling, find_head, find_target_layer

if TYPE_CHECKING:
    from explain.engine import BaseCAM

logger = logging.getLogger(__name__)


class _Perturbing(Recorder):
    """Adds the zero perturbation ``e`` to ``A`` (full gradient) or to ``p`` (pooled gradient)."""

    def __init__(self, at_feature_maps: Any = None, at_pooled: Any = None) -> None:
        self._at_feature_maps = at_feature_maps
        self._at_pooled = at_pooled

    def feature_maps(self, activations: Any) -> Any:
        return activations if self._at_feature_maps is None else activations + self._at_feature_maps

    def pooled(self, pooled: Any) -> Any:
        return pooled if self._at_pooled is None else pooled + self._at_pooled


@dataclass(frozen=True)
class _Plan:
    """What the abstract trace found: where the perturbation goes, its shape and dtype, and the maps' size."""

    pooled: bool
    perturbation: jax.ShapeDtypeStruct
    map_shape: tuple[int, int]


class JaxPass:
    """The compiled pass of one explainer on the JAX backend (Keras 3 models only)."""

    def __init__(self, explainer: BaseCAM, network: Any) -> None:
        self._explainer = explainer
        self.on_gpu = jax.default_backend() == "gpu"  # where jax.jit places the pass
        # The variables (not their values), read once: Keras builds these lists on every access.
        self._trainable = list(network.trainable_variables)
        self._non_trainable = list(network.non_trainable_variables)
        # Keras' JAX Variable keeps its current array in _value; .value adds stateless- and autocast-scope checks
        # that cost ~2% of the demo CNN's batch-1 pass when read per call. _value is read where it is what .value
        # gives (not, say, under Flax NNX, which stores the array elsewhere).
        self._read_stored = all(
            getattr(v, "_value", None) is v.value for v in (*self._trainable, *self._non_trainable)
        )

    def _weights(self) -> tuple[list[Any], list[Any]]:
        """The variables' current values (read on every call: a model whose weights change is explained with them)."""
        if self._read_stored:
            return [v._value for v in self._trainable], [v._value for v in self._non_trainable]
        return [v.value for v in self._trainable], [v.value for v in self._non_trainable]

    def compile(self, shape: tuple[int, ...], with_classes: bool) -> Compiled:
        trainable, non_trainable = self._weights()
        specs = (_specs(trainable), _specs(non_trainable), jax.ShapeDtypeStruct(shape, jnp.float32))
        plan = self._plan(*specs)
        run: Callable[[np.ndarray, np.ndarray | None], np.ndarray]
        if with_classes:
            classes_spec = jax.ShapeDtypeStruct(shape[:1], jnp.int32)
            function = jax.jit(lambda t, n, x, c: self._pass(plan, t, n, x, c)).lower(*specs, classes_spec).compile()

            def run(images: np.ndarray, class_index: np.ndarray | None) -> np.ndarray:
                trainable, non_trainable = self._weights()
                classes = np.asarray(class_index, dtype=np.int32)  # JAX runs in 32 bits; indices are small
                return np.asarray(function(trainable, non_trainable, images, classes))

        else:
            function = jax.jit(lambda t, n, x: self._pass(plan, t, n, x, None)).lower(*specs).compile()

            def run(images: np.ndarray, class_index: np.ndarray | None) -> np.ndarray:
                trainable, non_trainable = self._weights()
                return np.asarray(function(trainable, non_trainable, images))

        return Compiled(run, plan.map_shape, function)

    def _forward(
        self, trainable: Any, non_trainable: Any, images: Any, recorder: Recorder, with_pooling: bool
    ) -> tuple[Any, Any, Any, bool]:
        """One call of the network: ``(class scores, outputs, A, whether p was recorded)``."""
        explainer = self._explainer
        network = explainer.network()
        target = find_target_layer(network, explainer.target_layer)
        head = find_head(network)
        pooling = find_global_pooling(network, target) if with_pooling else None
        with capture(target, head, recorder, pooling) as captured:
            outputs, _ = network.stateless_call(trainable, non_trainable, images, training=False)
        scores = captured.class_scores(head, outputs, explainer.target_layer)
        return scores, outputs, captured.activations, captured.pooled is not None

    def _plan(self, *specs: Any) -> _Plan:
        """The abstract trace: does the pooled shortcut apply, and what do the perturbation and the maps look like."""
        found: dict[str, bool] = {}

        def probe(trainable: Any, non_trainable: Any, images: Any) -> tuple[Any, Any]:
            recorder = _Recording()
            _, _, activations, pooled = self._forward(
                trainable, non_trainable, images, recorder, self._explainer.uses_gradient_sums
            )
            found["pooled"] = pooled
            return activations, recorder.pooled_value if pooled else activations

        activations, perturbed = jax.eval_shape(probe, *specs)
        return _Plan(
            pooled=found["pooled"],
            perturbation=jax.ShapeDtypeStruct(perturbed.shape, perturbed.dtype),
            map_shape=(int(activations.shape[1]), int(activations.shape[2])),
        )

    def _pass(self, plan: _Plan, trainable: Any, non_trainable: Any, images: Any, class_index: Any) -> Any:
        # Python here runs only while tracing; the hooks it installs are gone before the executable ever runs.
        explainer = self._explainer
        explainer.trace_count += 1

        def forward(perturbation: Any) -> tuple[Any, tuple[Any, Any]]:
            recorder = _Perturbing(None, perturbation) if plan.pooled else _Perturbing(perturbation, None)
            scores, outputs, activations, pooled = self._forward(
                trainable, non_trainable, images, recorder, plan.pooled
            )
            if pooled != plan.pooled:
                raise RuntimeError(f"the pooling after {explainer.target_layer!r} was not met as when first traced")
            return scores, (outputs, activations)

        zeros = jnp.zeros(plan.perturbation.shape, plan.perturbation.dtype)
        scores, backward, (probabilities, activations) = jax.vjp(forward, zeros, has_aux=True)
        chosen = jnp.argmax(probabilities, axis=-1).astype(jnp.int32)
        if class_index is not None:
            chosen = jnp.where(class_index == NO_CLASS, chosen, class_index)
        # The backward pass seeded with the one-hot of the chosen classes: d(sum_b y_b[c_b])/dA, and images are
        # independent (training=False), so its rows are dy_b/dA_b.
        (gradient,) = backward(jax.nn.one_hot(chosen, scores.shape[-1], dtype=scores.dtype))
        if plan.pooled:
            explainer.gradient_source = GradientSource.POOLED
            heatmaps = explainer.heatmaps_from_sums(activations, gradient)
        else:
            explainer.gradient_source = GradientSource.FEATURE_MAPS
            heatmaps = explainer.heatmaps(activations, gradient)
        return _pack(probabilities.astype(jnp.float32), chosen, heatmaps)


class _Recording(Recorder):
    """The abstract trace's recorder: keeps the pooled value to read its shape and dtype."""

    pooled_value: Any = None

    def pooled(self, pooled: Any) -> Any:
        self.pooled_value = pooled
        return pooled


def _specs(values: list[Any]) -> list[jax.ShapeDtypeStruct]:
    return [jax.ShapeDtypeStruct(value.shape, value.dtype) for value in values]


def _pack(probabilities: Any, chosen: Any, heatmaps: Any) -> Any:
    """The layout of ``explain.engine._unpack``: each class index as the two float32 words of an int64.

    JAX runs in 32 bits here, so the int64 is assembled: the index (never negative) as its low word, zero as its
    high word, in little-endian order.
    """
    words = jnp.stack([chosen.astype(jnp.int32), jnp.zeros_like(chosen, dtype=jnp.int32)], axis=-1)
    classes = jax.lax.bitcast_convert_type(words, jnp.float32)
    return jnp.concatenate([classes.reshape(-1), probabilities.reshape(-1), heatmaps.reshape(-1)])


def compiled_forward(network: Any, shape: tuple[int, ...]) -> Callable[[np.ndarray], np.ndarray]:
    """The bare forward pass for float32 images of ``shape``: the jitted stateless call, weights read once."""
    trainable = [v.value for v in network.trainable_variables]
    non_trainable = [v.value for v in network.non_trainable_variables]

    def forward(t: Any, n: Any, x: Any) -> Any:
        return network.stateless_call(t, n, x, training=False)[0]

    function = (
        jax.jit(forward)
        .lower(_specs(trainable), _specs(non_trainable), jax.ShapeDtypeStruct(shape, jnp.float32))
        .compile()
    )

    def run(images: np.ndarray) -> np.ndarray:
        return np.asarray(function(trainable, non_trainable, images))

    return run
