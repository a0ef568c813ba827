"""Where to look inside a network: target-layer discovery, the pre-softmax head, and trace-time capture.

Grad-CAM (Selvaraju et al. 2017, eq. 1) needs two tensors from one forward pass: the feature maps ``A`` of a
convolutional layer and the class score ``y^c`` *before* the softmax. Both are taken from the model's own
forward pass without rebuilding or editing it: while a ``tf.function`` is being traced, :func:`capture`
briefly wraps the target layer's ``call`` (to record ``A``) and the final softmax (to record its input, the
logits), then restores both. The traced graph keeps the tensors; the model object is left exactly as found.
This works the same for Keras 3 and tf_keras models and for a backbone nested as one layer of a larger model.

When ``A`` feeds nothing but a global average or max pooling, :func:`find_global_pooling` names that layer and
:func:`capture` also records the pooled vector ``p``: then ``sum_ij dy/dA_ijk = dy/dp_k`` exactly (average:
each cell gets ``g_k / Z``; max: TensorFlow splits ``g_k`` evenly over tied maxima), so Grad-CAM's weights
can be read from ``dy/dp`` without the pooling's backward pass.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Any

import tensorflow as tf

logger = logging.getLogger(__name__)

PATH_SEPARATOR = "/"
AUTO = "auto"

# Final activations whose input is the class score y^c of eq. 1 (monotone squashing of a logit).
_SQUASHING_ACTIVATIONS = frozenset({"softmax", "sigmoid"})
_LINEAR_ACTIVATIONS = frozenset({"linear", "identity"})

# Keras' own global poolings (Keras 3 and tf_keras share the class names), by the reduction they apply.
_GLOBAL_POOLINGS = {"GlobalAveragePooling2D": "average", "GlobalMaxPooling2D": "max"}
_KERAS_PACKAGES = frozenset({"keras", "tf_keras"})

# Hooks are installed on shared layer objects, so only one trace may hold them at a time.
_HOOK_LOCK = threading.RLock()
_ACTIVE = threading.local()


def is_model(layer: Any) -> bool:
    """True for a (Keras 3 or tf_keras) model used as a layer: it has sub-layers of its own."""
    return isinstance(getattr(layer, "layers", None), list) and hasattr(layer, "outputs")


def iter_layers(model: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yield ``(path, layer)`` for every layer in model order, descending into nested models.

    A nested layer's path joins the enclosing model names with ``/`` (``"inception_v3/mixed10"``).
    """
    for layer in model.layers:
        path = f"{prefix}{layer.name}"
        if is_model(layer):
            yield from iter_layers(layer, prefix=path + PATH_SEPARATOR)
        yield path, layer


def output_shape(layer: Any) -> tuple[int | None, ...] | None:
    """The layer's (single) symbolic output shape, or None when it has none (unbuilt, shared, multi-output)."""
    try:
        output = layer.output
    except (AttributeError, ValueError, RuntimeError):
        return None
    shape = getattr(output, "shape", None)
    if shape is None:
        return None
    if isinstance(shape, tf.TensorShape):
        return tuple(shape.as_list()) if shape.rank is not None else None
    return tuple(shape)


def is_spatial_map(shape: tuple[int | None, ...] | None) -> bool:
    """A 4-D (B, h, w, k) output whose spatial size is above 1x1 (unknown sizes count as spatial)."""
    if shape is None or len(shape) != 4:
        return False
    height, width = shape[1], shape[2]
    if height is None or width is None:
        return True
    return height * width > 1


@dataclass(frozen=True)
class TargetLayer:
    """The layer whose output is ``A`` in eq. 1, and its path from the outer model."""

    path: str
    layer: Any


def find_target_layer(model: Any, name: str | None = None) -> TargetLayer:
    """Resolve the Grad-CAM target layer.

    ``name`` None or ``"auto"``: the last layer (searching nested models too) whose output is 4-D with a
    spatial size above 1x1 — for the seed InceptionV3 that is ``mixed10``, not the 1x1 AveragePooling2D after
    it. Otherwise ``name`` is a path (``"inception_v3/mixed10"``) or a plain layer name that must be unique.
    """
    layers = list(iter_layers(model))
    if name is None or name == AUTO:
        for path, layer in reversed(layers):
            if type(layer).__name__ == "InputLayer" or is_model(layer):
                continue
            if is_spatial_map(output_shape(layer)):
                return TargetLayer(path, layer)
        raise ValueError(
            f"model {model.name!r} has no layer with a 4-D output larger than 1x1: name a target layer"
        )
    by_path = [(p, la) for p, la in layers if p == name]
    if not by_path:
        by_path = [(p, la) for p, la in layers if la.name == name]
    if not by_path:
        raise ValueError(f"model {model.name!r} has no layer named {name!r}")
    if len(by_path) > 1:
        paths = ", ".join(p for p, _ in by_path)
        raise ValueError(f"layer name {name!r} is ambiguous in model {model.name!r} ({paths}): give the path")
    path, layer = by_path[0]
    if type(layer).__name__ == "InputLayer":
        raise ValueError(f"target layer {path!r} is the model input, not a feature map")
    shape = output_shape(layer)
    if shape is not None and len(shape) != 4:
        raise ValueError(f"target layer {path!r} has output shape {shape}; Grad-CAM needs (B, h, w, k)")
    return TargetLayer(path, layer)


@dataclass(frozen=True)
class GlobalPooling:
    """The global pooling that is the only consumer of the target's feature maps (``p_k = pool_ij A_ijk``)."""

    layer: Any
    reduction: str  # "average" or "max"


def _history_node(tensor: Any) -> Any:
    """The functional-graph node that produced a symbolic Keras tensor (Keras 3 or tf_keras)."""
    history = tensor._keras_history
    layer = history.operation if hasattr(history, "operation") else history.layer
    return None if layer is None else layer._inbound_nodes[history.node_index]


def _node_layer(node: Any) -> Any:
    return node.operation if hasattr(node, "operation") else node.layer


def _node_inputs(node: Any) -> list[Any]:
    inputs = node.keras_inputs if hasattr(node, "keras_inputs") else node.input_tensors
    return list(inputs)


def _graph_nodes(model: Any) -> list[Any]:
    """Every node of ``model``'s functional graph, walking back from its outputs (not other models' calls)."""
    pending = [node for node in (_history_node(output) for output in model.outputs) if node is not None]
    seen: dict[int, Any] = {}
    while pending:
        node = pending.pop()
        if id(node) not in seen:
            seen[id(node)] = node
            pending.extend(node.parent_nodes)
    return list(seen.values())


def _as_global_pooling(layer: Any) -> GlobalPooling | None:
    """``layer`` as an exact pooling over all of h and w, or None (subclasses and patched calls do not count)."""
    layer_type = type(layer)
    reduction = _GLOBAL_POOLINGS.get(layer_type.__name__)
    if reduction is None or layer_type.__module__.split(".")[0] not in _KERAS_PACKAGES:
        return None
    if "call" in vars(layer) or getattr(layer, "data_format", None) != "channels_last":
        return None
    if getattr(layer, "keepdims", None) is not False:
        return None
    return GlobalPooling(layer, reduction)


def _sole_consumer(container: Any, layer: Any) -> tuple[Any, bool] | None:
    """In ``container``'s graph: ``(the one node consuming layer's single output, False)``, or
    ``(None, True)`` when that output is the container's own output and nothing inside consumes it;
    None when the layer is called more than once, has several outputs or several consumers."""
    nodes = _graph_nodes(container)
    own = [node for node in nodes if _node_layer(node) is layer]
    if len(own) != 1:
        return None
    outputs = tf.nest.flatten(own[0].outputs)
    if len(outputs) != 1:
        return None
    output = outputs[0]
    consumers = [node for node in nodes if any(tensor is output for tensor in _node_inputs(node))]
    is_container_output = any(tensor is output for tensor in container.outputs)
    if is_container_output:
        return (None, True) if not consumers else None
    return (consumers[0], False) if len(consumers) == 1 else None


def find_global_pooling(model: Any, target: TargetLayer) -> GlobalPooling | None:
    """The global pooling fed by the target layer and by nothing else, or None (then use the full gradient).

    The functional graph is read, never changed. A target whose output is the output of the nested model holding
    it is followed out to that model's single call in the enclosing one. Anything unexpected (a layer called
    twice, a second consumer, a Sequential without a graph, a subclassed pooling) answers None.
    """
    names = target.path.split(PATH_SEPARATOR)
    by_path = dict(iter_layers(model))
    containers = [model] + [by_path.get(PATH_SEPARATOR.join(names[: i + 1])) for i in range(len(names) - 1)]
    if any(container is None or not is_model(container) for container in containers):
        return None
    layer = target.layer
    try:
        for container in reversed(containers):
            found = _sole_consumer(container, layer)
            if found is None:
                return None
            consumer, is_container_output = found
            if not is_container_output:
                if len(_node_inputs(consumer)) != 1:
                    return None
                return _as_global_pooling(_node_layer(consumer))
            layer = container
    except (AttributeError, IndexError, TypeError, ValueError) as error:
        logger.debug("no pooling shortcut for %r: cannot read the functional graph (%s)", target.path, error)
    return None


def _output_layer(model: Any) -> Any:
    outputs = model.outputs
    if outputs is None or len(outputs) != 1:
        raise ValueError(f"model {model.name!r} must have exactly one output to be explained")
    history = getattr(outputs[0], "_keras_history", None)
    return history[0] if history is not None else model.layers[-1]


class HeadKind(Enum):
    """How the class score y^c (before the softmax) is read from the network's last layer."""

    ACTIVATION = "activation"  # a layer with a softmax/sigmoid `.activation` (Dense, Activation)
    SOFTMAX_LAYER = "softmax_layer"  # a Softmax layer: its input is the logits
    OUTPUT = "output"  # the output already is the score (linear head)


@dataclass(frozen=True)
class Head:
    """The network's final layer and where its logits come from."""

    kind: HeadKind
    layer: Any


def find_head(model: Any) -> Head:
    """Find the final layer (descending into a nested output model) and how to read the pre-softmax score."""
    layer = _output_layer(model)
    while is_model(layer):
        layer = _output_layer(layer)
    if type(layer).__name__ == "Softmax":
        return Head(HeadKind.SOFTMAX_LAYER, layer)
    activation = getattr(layer, "activation", None)
    activation_name = getattr(activation, "__name__", None)
    if activation_name in _SQUASHING_ACTIVATIONS:
        return Head(HeadKind.ACTIVATION, layer)
    if activation is not None and activation_name not in _LINEAR_ACTIVATIONS:
        logger.warning(
            "final layer %r ends in activation %r: explaining its output as the class score",
            layer.name,
            activation_name,
        )
    return Head(HeadKind.OUTPUT, layer)


@dataclass
class Captured:
    """Tensors recorded while tracing: the target feature maps ``A`` and the logits (None for OUTPUT heads).

    ``pooled`` is the global pooling's output ``p``, set only when that pooling was, in the traced graph, the
    only consumer of ``A`` (so every path from ``A`` to the score passes through ``p``).
    """

    activations: tf.Tensor | None = None
    logits: tf.Tensor | None = None
    pooled: tf.Tensor | None = None
    pooling_ops: frozenset[str] | None = None


def _consumers(tensor: tf.Tensor) -> frozenset[str] | None:
    """Names of the graph ops reading ``tensor`` so far; None outside a graph (eager tensors have no consumers)."""
    if tf.executing_eagerly() or not hasattr(tensor, "consumers"):
        return None
    return frozenset(op.name for op in tensor.consumers())


def _recording_logits(fn: Any, captured: Captured) -> Any:
    """Wrap the softmax (an activation function or a Softmax layer's ``call``) to record its input, the logits."""

    @tf.autograph.experimental.do_not_convert
    def recording(x: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(_ACTIVE, "captured", None) is captured:
            captured.logits = x
        return fn(x, *args, **kwargs)

    return recording


@contextmanager
def capture(
    target: TargetLayer,
    head: Head,
    tape: tf.GradientTape,
    pooling: GlobalPooling | None = None,
    pooled_tape: tf.GradientTape | None = None,
) -> Iterator[Captured]:
    """Record ``A`` (watched on ``tape``) and the logits during one call of the network, then restore it.

    With ``pooling``, also record its output ``p`` (watched on ``pooled_tape``, where ``A`` is not watched, so
    a gradient there holds no pooling backward ops) if the pooling is called with ``A`` itself and, by the end
    of the call, no other op has read ``A``; otherwise ``captured.pooled`` stays None.

    Meant for trace time only: the hooks are plain Python, so they run once while ``tf.function`` traces and
    the recorded symbolic tensors stay in the graph. Other threads calling the same layers meanwhile see the
    original behaviour (the hooks record only for the thread that installed them).
    """
    if (pooling is None) != (pooled_tape is None):
        raise ValueError("capture needs both a pooling layer and its tape, or neither")
    captured = Captured()
    restore: list[tuple[Any, str, bool, Any]] = []

    def patch(obj: Any, attribute: str, value: Any) -> None:
        had_own = attribute in vars(obj)
        restore.append((obj, attribute, had_own, vars(obj).get(attribute)))
        setattr(obj, attribute, value)

    target_call = target.layer.call

    @tf.autograph.experimental.do_not_convert
    def recording_call(*args: Any, **kwargs: Any) -> Any:
        outputs = target_call(*args, **kwargs)
        if getattr(_ACTIVE, "captured", None) is captured:
            tape.watch(outputs)
            captured.activations = outputs
        return outputs

    def recording_pooling(pooling_call: Any) -> Any:
        @tf.autograph.experimental.do_not_convert
        def recording(inputs: Any, *args: Any, **kwargs: Any) -> Any:
            activations = captured.activations
            first_reader = (
                getattr(_ACTIVE, "captured", None) is captured
                and activations is not None
                and inputs is activations
                and not args
                and not kwargs
                and _consumers(activations) == frozenset()
            )
            outputs = pooling_call(inputs, *args, **kwargs)
            if first_reader and pooled_tape is not None:
                pooled_tape.watch(outputs)
                captured.pooled = outputs
                captured.pooling_ops = _consumers(activations)
            return outputs

        return recording

    with _HOOK_LOCK:
        _ACTIVE.captured = captured
        try:
            patch(target.layer, "call", recording_call)
            if pooling is not None:
                patch(pooling.layer, "call", recording_pooling(pooling.layer.call))
            if head.kind is HeadKind.ACTIVATION:
                patch(head.layer, "activation", _recording_logits(head.layer.activation, captured))
            elif head.kind is HeadKind.SOFTMAX_LAYER:
                # Read ``call`` after patching the target, so that the two hooks chain if they are one layer.
                patch(head.layer, "call", _recording_logits(head.layer.call, captured))
            yield captured
            if captured.pooled is not None and _consumers(captured.activations) != captured.pooling_ops:
                logger.debug("feature maps of %r are read outside the global pooling: no shortcut", target.path)
                captured.pooled = None
        finally:
            for obj, attribute, had_own, previous in reversed(restore):
                if had_own:
                    setattr(obj, attribute, previous)
                else:
                    delattr(obj, attribute)
            _ACTIVE.captured = None
