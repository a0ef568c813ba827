"""Load any supported model format into one :class:`LoadedModel`.

Formats: a Keras 3 ``.keras`` file; a legacy ``.h5`` (HDF5) file; a TF2 SavedModel directory written by
tf.keras 2.x (such as the seed article's ``saved_model/inceptionV3``), read with the ``tf_keras`` package
because Keras 3 no longer loads SavedModels as models. ``builtin:demo`` is the demo model shipped in this
package; ``builtin:shortcut`` is the shortcut TEST model (``models/train_shortcut.py``), never a default.

Backends: a ``.keras`` model runs on the Keras backend of the process (TensorFlow or JAX, fixed when Keras is
first imported; ``model.backend`` names the one wanted). Legacy SavedModels and ``.h5`` files are tf_keras
models, TensorFlow only: asking for another backend for them fails at load with a message that says so.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal, Protocol

logger = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).resolve().parent / "demo"
DEMO_WEIGHTS = DEMO_DIR / "cxr_lens_demo_cnn.keras"
DEMO_PATH = "builtin:demo"
SHORTCUT_DIR = Path(__file__).resolve().parent / "shortcut"
SHORTCUT_PATH = "builtin:shortcut"
BUILTIN_WEIGHTS = {DEMO_PATH: DEMO_WEIGHTS, SHORTCUT_PATH: SHORTCUT_DIR / "cxr_lens_shortcut_test_cnn.keras"}
Framework = Literal["keras", "tf_keras"]
BACKENDS = ("tensorflow", "jax")


class ModelError(Exception):
    """The model cannot be loaded or does not fit its specification; the message names the key and the file."""


class ModelSpec(Protocol):
    """What :func:`load_model` needs to know (the node's ``[model]`` settings have exactly these fields)."""

    @property
    def path(self) -> str: ...
    @property
    def id(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def labels(self) -> tuple[str, ...]: ...
    @property
    def input_size(self) -> tuple[int, int]: ...
    @property
    def channels(self) -> int: ...
    @property
    def preprocess(self) -> str: ...
    @property
    def target_layer(self) -> str: ...
    @property
    def backend(self) -> str: ...
    @property
    def is_demo(self) -> bool: ...


@dataclass(frozen=True)
class BuiltinSpec:
    """A model shipped in this package: its own facts, in the fields :class:`ModelSpec` asks for."""

    path: str
    id: str
    is_demo: bool
    version: str = "1.0.0"
    labels: tuple[str, ...] = ("no_finding", "focal_opacity")
    input_size: tuple[int, int] = (256, 256)
    channels: int = 1
    preprocess: str = "unit"
    target_layer: str = "auto"
    backend: str = "auto"


# The shipped demo model (the node's ``[model]`` defaults name the same model); keyword arguments change a field.
DemoSpec = partial(BuiltinSpec, path=DEMO_PATH, id="cxr-lens-demo-cnn", is_demo=True)
# The shortcut TEST model: the demo architecture trained where only a burned-in marker carries the label.
ShortcutSpec = partial(BuiltinSpec, path=SHORTCUT_PATH, id="cxr-lens-shortcut-test-cnn", is_demo=False)


@dataclass(frozen=True)
class LoadedModel:
    """A network together with everything needed to feed it and to name it in outputs."""

    network: Any
    framework: Framework
    labels: tuple[str, ...]
    input_size: tuple[int, int]  # (height, width)
    channels: int
    preprocess: str
    model_id: str
    version: str
    is_demo: bool
    target_layer: str  # "auto" or a layer name
    backend: str = "tensorflow"  # the Keras backend that runs the network


def resolve_backend(requested: str) -> str:
    """The backend ``model.backend`` names: "auto" is ``KERAS_BACKEND`` where set, else TensorFlow."""
    backend = os.environ.get("KERAS_BACKEND", "tensorflow") if requested == "auto" else requested
    if backend not in BACKENDS:
        source = "KERAS_BACKEND" if requested == "auto" else "model.backend"
        raise ModelError(f"{source} {backend!r}: not supported; use one of {', '.join(BACKENDS)}")
    return backend


def _quiet_tensorflow() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _tensorflow_only(path: Path, kind: str, backend: str) -> None:
    if backend != "tensorflow":
        raise ModelError(
            f"model.path {path}: a {kind} is a tf_keras model and runs on TensorFlow only, but model.backend is "
            f"{backend!r} (set model.backend = \"tensorflow\", or convert the model to .keras)"
        )


def _keras_on(backend: str) -> Any:
    """Keras, checked to run on ``backend`` (fixed per process when Keras is first imported)."""
    import keras

    running = keras.config.backend()
    if running != backend:
        raise ModelError(
            f"model.backend {backend!r}: Keras in this process already runs on {running!r} (the backend is fixed "
            "when Keras is first imported: KERAS_BACKEND must be set before that)"
        )
    return keras


def _load_network(path: Path, backend: str) -> tuple[Any, Framework]:
    _quiet_tensorflow()
    if path.is_dir():
        if not (path / "saved_model.pb").is_file():
            raise ModelError(f"model.path {path}: a directory but not a SavedModel (no saved_model.pb)")
        _tensorflow_only(path, "SavedModel", backend)
        import tf_keras

        return tf_keras.models.load_model(path, compile=False), "tf_keras"
    if not path.is_file():
        raise ModelError(f"model.path {path}: not found")
    suffix = path.suffix.lower()
    if suffix == ".keras":
        keras = _keras_on(backend)
        return _under_global_policy(keras, keras.saving.load_model(path, compile=False)), "keras"
    if suffix in (".h5", ".hdf5"):
        _tensorflow_only(path, f"{suffix} file", backend)
        # Legacy HDF5 files are written by tf.keras 2.x; tf_keras reads every variant of them faithfully,
        # including custom-object-free functional models that Keras 3's legacy loader rejects.
        import tf_keras

        return tf_keras.models.load_model(path, compile=False), "tf_keras"
    raise ModelError(f"model.path {path}: unsupported format {suffix!r} (use .keras, .h5 or a SavedModel directory)")


def _under_global_policy(keras: Any, network: Any) -> Any:
    """``network`` computing under Keras' global dtype policy where that is a mixed one, but for its output layer.

    A ``.keras`` file stores each layer's policy (float32 when saved so), which would leave the process's mixed
    precision (``explain.configure_device``) unused. The variables stay float32 either way, and so does the
    output layer (the softmax and the class scores before it, as Keras advises for mixed precision).
    """
    policy = keras.mixed_precision.global_policy()
    if policy.compute_dtype == policy.variable_dtype:
        return network
    output_layer = network
    while isinstance(getattr(output_layer, "layers", None), list) and output_layer.layers:
        output_layer = output_layer.layers[-1]
    pending = [network]
    while pending:
        layer = pending.pop()
        if layer is not output_layer:
            layer.dtype_policy = policy
        pending.extend(getattr(layer, "layers", []))
    logger.info("model computes in %s (global policy %s), its output layer in float32", policy.compute_dtype,
                policy.name)
    return network


def load_model(settings: ModelSpec) -> LoadedModel:
    """Load the configured model and check that it fits the configuration (input shape, number of labels)."""
    path = DEMO_WEIGHTS if settings.is_demo else BUILTIN_WEIGHTS.get(settings.path) or Path(settings.path)
    backend = resolve_backend(settings.backend)
    try:
        network, framework = _load_network(path, backend)
    except ModelError:
        raise
    except Exception as exc:  # every loader raises its own types; name the key and the file
        raise ModelError(f"model.path {path}: cannot be loaded ({type(exc).__name__}: {exc})") from exc
    _check_shapes(network, settings)
    if settings.target_layer != "auto" and not _has_layer(network, settings.target_layer):
        raise ModelError(f"model.target_layer {settings.target_layer!r}: no such layer in {path.name}")
    logger.info("loaded model %s %s (%s on %s) from %s", settings.id, settings.version, framework, backend, path)
    return LoadedModel(
        network=network,
        framework=framework,
        labels=tuple(settings.labels),
        input_size=(int(settings.input_size[0]), int(settings.input_size[1])),
        channels=settings.channels,
        preprocess=settings.preprocess,
        model_id=settings.id,
        version=settings.version,
        is_demo=settings.is_demo,
        target_layer=settings.target_layer,
        backend=backend,
    )


def load_demo_model() -> LoadedModel:
    """The shipped demo model with its embedded default settings."""
    return load_model(DemoSpec())


def load_shortcut_model() -> LoadedModel:
    """The shortcut TEST model (looks at a burned-in marker, not the lungs), to exercise the trust alarm."""
    return load_model(ShortcutSpec())


def demo_metrics() -> dict[str, Any]:
    """The held-out metrics written by ``python -m models.train_demo`` next to the shipped weights."""
    return json.loads((DEMO_DIR / "metrics.json").read_text(encoding="utf-8"))


def _check_shapes(network: Any, settings: ModelSpec) -> None:
    in_shape = tuple(network.inputs[0].shape)
    out_shape = tuple(network.outputs[0].shape)
    expected_in = (*settings.input_size, settings.channels)
    if len(in_shape) != 4 or tuple(in_shape[1:]) != expected_in:
        raise ModelError(
            f"model.input_size/model.channels: the network takes {in_shape[1:]}, the configuration says {expected_in}"
        )
    if len(out_shape) != 2 or out_shape[1] != len(settings.labels):
        raise ModelError(
            f"model.labels: the network has {out_shape[1:]} outputs, the configuration names {len(settings.labels)}"
        )


def _has_layer(network: Any, name: str) -> bool:
    for layer in network.layers:
        if layer.name == name:
            return True
        if hasattr(layer, "layers") and _has_layer(layer, name):
            return True
    return False
