"""Where to look inside a network: target-layer discovery, the pre-softmax head, and trace-time capture.

Grad-CAM (Selvaraju et al. 2017, eq. 1) needs two tensors from one forward pass: the feature maps ``A`` of a
convolutional layer and the class score ``y^c`` *before* the softmax. Both are taken from the model's own
forward pass without rebuilding or editing it: while a pass is being traced (a ``tf.function`` or a
``jax.jit``), :func:`capture` briefly wraps the target layer's ``call`` (to record ``A``) and the final softmax
(to record its input, the logits), then restores both. The traced computation keeps the tensors; the model object
is left exactly as found. This works the same for Keras 3 (on any backend) and tf_keras models and for a backbone
nested as one layer of a larger model. What a pass does with ``A`` as it is recorded (watch it on a gradient
tape, add a zero perturbation to differentiate by) is the backend's :class:`Recorder`.

When ``A`` feeds nothing but a global average or max pooling, :func:`find_global_pooling` names that layer and
:func:`capture` also records the pooled vector ``p``: then ``sum_ij dy/dA_ijk = dy/dp_k`` exactly (average:
each cell gets ``g_k / Z``; max: TensorFlow splits ``g_k`` evenly over tied maxima), so Grad-CAM's weights
can be read from ``dy/dp`` without the pooling's backward pass.

Nothing here imports a framework: the module serves TensorFlow and JAX passes alike.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

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
    if hasattr(shape, "as_list"):  # a tf.TensorShape (tf_keras)
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


def _flatten(structure: Any) -> list[Any]:
    """The tensors of a node's (possibly nested) outputs, in order."""
    if isinstance(structure, (list, tuple)):
        return [tensor for item in structure for tensor in _flatten(item)]
    if isinstance(structure, dict):
        return [tensor for key in sorted(structure) for tensor in _flatten(structure[key])]
    return [structure]


def _sole_consumer(container: Any, layer: Any) -> tuple[Any, bool] | None:
    """In ``container``'s graph: ``(the one node consuming layer's single output, False)``, or
    ``(None, True)`` when that output is the container's own output and nothing inside consumes it;
    None when the layer is called more than once, has several outputs or several consumers."""
    nodes = _graph_nodes(container)
    own = [node for node in nodes if _node_layer(node) is layer]
    if len(own) != 1:
        return None
    outputs = _flatten(own[0].outputs)
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

    ``pooled`` is the global pooling's output ``p``, set only when that pooling was called with ``A`` itself and,
    where the backend can tell (a TensorFlow graph), was its only reader (so every path from ``A`` to the score
    passes through ``p``).
    """

    activations: Any = None
    logits: Any = None
    pooled: Any = None
    pooling_ops: frozenset[str] | None = None

    def class_scores(self, head: Head, outputs: Any, target_path: str) -> Any:
        """The class scores ``y`` before the softmax (the outputs themselves for a linear head)."""
        if self.activations is None:
            raise RuntimeError(f"target layer {target_path!r} was not called by the network")
        logits = outputs if head.kind is HeadKind.OUTPUT else self.logits
        if logits is None:
            raise RuntimeError(f"the final layer {head.layer.name!r} did not apply its activation")
        return logits


Function = TypeVar("Function", bound=Callable[..., Any])


class Recorder:
    """What a backend's pass does with the tensors :func:`capture` records; the defaults change nothing.

    A TensorFlow pass watches ``A`` (or ``p``) on a gradient tape; a JAX pass adds a zero perturbation there, and
    differentiates with respect to it. Whatever a hook returns is what the network goes on computing with.
    """

    def feature_maps(self, activations: Any) -> Any:
        return activations

    def pooled(self, pooled: Any) -> Any:
        return pooled

    def readers(self, tensor: Any) -> frozenset[str] | None:
        """The operations that have read ``tensor`` so far; None where the backend cannot tell."""
        return None

    def hook(self, function: Function) -> Function:
        """Wrap a hook installed on a layer (TensorFlow: keep autograph from converting it)."""
        return function


def _recording_logits(fn: Any, captured: Captured, recorder: Recorder) -> Any:
    """Wrap the softmax (an activation function or a Softmax layer's ``call``) to record its input, the logits."""

    def recording(x: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(_ACTIVE, "captured", None) is captured:
            captured.logits = x
        return fn(x, *args, **kwargs)

    return recorder.hook(recording)


@contextmanager
def capture(
    target: TargetLayer,
    head: Head,
    recorder: Recorder,
    pooling: GlobalPooling | None = None,
) -> Iterator[Captured]:
    """Record ``A`` (passed through ``recorder.feature_maps``) and the logits during one call of the network.

    With ``pooling``, also record its output ``p`` (passed through ``recorder.pooled``) if the pooling is called
    with ``A`` itself and, where the recorder can tell, no other operation has read ``A`` by the end of the call;
    otherwise ``captured.pooled`` stays None.

    Meant for trace time only: the hooks are plain Python, so they run once while the pass is traced and the
    recorded symbolic tensors stay in the traced computation. Other threads calling the same layers meanwhile see
    the original behaviour (the hooks record only for the thread that installed them).
    """
    captured = Captured()
    restore: list[tuple[Any, str, bool, Any]] = []

    def patch(obj: Any, attribute: str, value: Any) -> None:
        had_own = attribute in vars(obj)
        restore.append((obj, attribute, had_own, vars(obj).get(attribute)))
        setattr(obj, attribute, value)

    target_call = target.layer.call

    def recording_call(*args: Any, **kwargs: Any) -> Any:
        outputs = target_call(*args, **kwargs)
        if getattr(_ACTIVE, "captured", None) is captured:
            outputs = recorder.feature_maps(outputs)
            captured.activations = outputs
        return outputs

    def recording_pooling(pooling_call: Any) -> Any:
        def recording(inputs: Any, *args: Any, **kwargs: Any) -> Any:
            activations = captured.activations
            first_reader = (
                getattr(_ACTIVE, "captured", None) is captured
                and activations is not None
                and inputs is activations
                and not args
                and not kwargs
                and recorder.readers(activations) in (None, frozenset())
            )
            outputs = pooling_call(inputs, *args, **kwargs)
            if first_reader:
                outputs = recorder.pooled(outputs)
                captured.pooled = outputs
                captured.pooling_ops = recorder.readers(activations)
            return outputs

        return recorder.hook(recording)

    with _HOOK_LOCK:
        _ACTIVE.captured = captured
        try:
            patch(target.layer, "call", recorder.hook(recording_call))
            if pooling is not None:
                patch(pooling.layer, "call", recording_pooling(pooling.layer.call))
            if head.kind is HeadKind.ACTIVATION:
                patch(head.layer, "activation", _recording_logits(head.layer.activation, captured, recorder))
            elif head.kind is HeadKind.SOFTMAX_LAYER:
                # Read ``call`` after patching the target, so that the two hooks chain if they are one layer.
                patch(head.layer, "call", _recording_logits(head.layer.call, captured, recorder))
            yield captured
            if (
                captured.pooled is not None
                and captured.pooling_ops is not None
                and recorder.readers(captured.activations) != captured.pooling_ops
            ):
                logger.debug("feature maps of %r are read outside the global pooling: no shortcut", target.path)
                captured.pooled = None
        finally:
            for obj, attribute, had_own, previous in reversed(restore):
                if had_own:
                    setattr(obj, attribute, previous)
                else:
                    delattr(obj, attribute)
            _ACTIVE.captured = None
