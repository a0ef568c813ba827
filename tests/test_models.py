"""Model loading in every supported format, the seed architecture, and the shipped demo model."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.tf

keras = pytest.importorskip("keras")
tf_keras = pytest.importorskip("tf_keras")

from dicom_node.settings import ModelSettings  # noqa: E402
from models.architectures import build_seed_inception  # noqa: E402
from models.loading import (  # noqa: E402
    DemoSpec,
    ModelError,
    demo_metrics,
    load_demo_model,
    load_model,
)

SEED_SETTINGS = dict(id="seed", version="1", labels=("covid19", "normal", "pneumonia"), channels=3)


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    return np.random.default_rng(0).random((2, 256, 256, 3), dtype=np.float32)


@pytest.fixture(scope="module")
def tf_keras_seed(tmp_path_factory: pytest.TempPathFactory, batch: np.ndarray) -> tuple[Path, Path, np.ndarray]:
    """The seed architecture written by tf.keras 2.x as a SavedModel directory and as .h5 (random weights)."""
    d = tmp_path_factory.mktemp("tfk")
    model = build_seed_inception(backend=tf_keras, seed=1)
    saved = d / "saved_model" / "inceptionV3"
    model.save(saved, save_format="tf")
    h5 = d / "seed.h5"
    with warnings.catch_warnings():  # writing the legacy format on purpose: it is what users bring
        warnings.filterwarnings("ignore", message=".*HDF5 file.*legacy", category=UserWarning)
        model.save(h5, save_format="h5")
    return saved, h5, model.predict(batch, verbose=0)


def test_keras3_file(tmp_path: Path, batch: np.ndarray) -> None:
    model = build_seed_inception(seed=2)
    path = tmp_path / "seed.keras"
    model.save(path)
    loaded = load_model(ModelSettings(path=str(path), **SEED_SETTINGS))
    assert loaded.framework == "keras" and not loaded.is_demo
    assert loaded.labels == ("covid19", "normal", "pneumonia")
    np.testing.assert_allclose(loaded.network.predict(batch, verbose=0), model.predict(batch, verbose=0), rtol=1e-5)


def test_tf_keras_saved_model_directory(tf_keras_seed: tuple[Path, Path, np.ndarray], batch: np.ndarray) -> None:
    saved, _, expected = tf_keras_seed
    loaded = load_model(ModelSettings(path=str(saved), target_layer="mixed10", **SEED_SETTINGS))
    assert loaded.framework == "tf_keras"
    np.testing.assert_allclose(loaded.network.predict(batch, verbose=0), expected, rtol=1e-5, atol=1e-7)


def test_legacy_h5(tf_keras_seed: tuple[Path, Path, np.ndarray], batch: np.ndarray) -> None:
    _, h5, expected = tf_keras_seed
    loaded = load_model(ModelSettings(path=str(h5), **SEED_SETTINGS))
    assert loaded.framework == "tf_keras"
    np.testing.assert_allclose(loaded.network.predict(batch, verbose=0), expected, rtol=1e-5, atol=1e-7)


def test_seed_architecture_matches_the_article() -> None:
    model = build_seed_inception()
    assert model.count_params() == 21_934_115  # the article's model.summary() total
    names = [layer.name for layer in model.layers]
    assert names.index("mixed10") < len(names) - 5
    assert tuple(model.get_layer("mixed10").output.shape[1:3]) == (6, 6)
    assert model.layers[-1].activation.__name__ == "softmax"


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"channels": 1}, "model.input_size/model.channels"),
        ({"input_size": (224, 224)}, "model.input_size/model.channels"),
        ({"labels": ("a", "b")}, "model.labels"),
        ({"target_layer": "no_such_layer"}, "model.target_layer"),
    ],
)
def test_mismatch_errors_name_the_key(tf_keras_seed: tuple[Path, Path, np.ndarray], overrides: dict, key: str) -> None:
    _, h5, _ = tf_keras_seed
    settings = {**SEED_SETTINGS, **overrides}
    with pytest.raises(ModelError, match=key.replace(".", "[.]")):
        load_model(ModelSettings(path=str(h5), **settings))


def test_missing_and_unsupported_files(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="model.path .*not found"):
        load_model(ModelSettings(path=str(tmp_path / "none.keras")))
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"\0")
    with pytest.raises(ModelError, match="unsupported format"):
        load_model(ModelSettings(path=str(onnx)))
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="cannot be loaded"):
        load_model(ModelSettings(path=str(broken)))
    (tmp_path / "dir").mkdir()
    with pytest.raises(ModelError, match="not a SavedModel"):
        load_model(ModelSettings(path=str(tmp_path / "dir")))


def test_node_model_defaults_name_the_demo_model_models_describes() -> None:
    # models/ does not import dicom_node (no cycle), so the node's [model] defaults and the demo's own facts
    # live in two places: they must agree.
    node, demo = ModelSettings(), DemoSpec()
    for field in ("path", "id", "version", "labels", "input_size", "channels", "preprocess", "target_layer",
                  "is_demo"):
        assert getattr(node, field) == getattr(demo, field), field


def test_the_node_reports_a_model_that_cannot_load_as_its_own_model_error(tmp_path: Path) -> None:
    from dicom_node.errors import ModelError as NodeModelError
    from dicom_node.process.processor import load_processor
    from dicom_node.settings import Settings

    settings = Settings(model=ModelSettings(path=str(tmp_path / "none.keras")))
    with pytest.raises(NodeModelError, match="model.path .*not found"):
        load_processor(settings)


def test_demo_model_loads_and_is_labelled_demo() -> None:
    loaded = load_demo_model()
    assert loaded.is_demo and loaded.labels == ("no_finding", "focal_opacity")
    assert tuple(loaded.network.inputs[0].shape[1:]) == (256, 256, 1)


@pytest.mark.slow
def test_demo_model_reproduces_its_reported_held_out_accuracy() -> None:
    from models.synthetic import generate
    from models.train_demo import to_input

    metrics = demo_metrics()
    assert metrics["held_out_accuracy"] >= 0.95
    held_out = generate(metrics["held_out_cases"], metrics["held_out_seed"])
    probs = load_demo_model().network.predict(to_input(held_out.images), batch_size=64, verbose=0)
    accuracy = float(np.mean(np.argmax(probs, axis=1) == held_out.labels))
    assert accuracy == pytest.approx(metrics["held_out_accuracy"], abs=0.005)


def test_training_code_tiny_run(tmp_path: Path) -> None:
    from models.train_demo import METRICS_NAME, WEIGHTS_NAME, main

    assert main(["--out", str(tmp_path), "--train", "16", "--val", "8", "--held-out", "8", "--epochs", "1"]) == 0
    metrics = json.loads((tmp_path / METRICS_NAME).read_text())
    assert metrics["train_cases"] == 16 and 0.0 <= metrics["held_out_accuracy"] <= 1.0
    loaded = load_model(ModelSettings(path=str(tmp_path / WEIGHTS_NAME)))
    assert loaded.network.predict(np.zeros((1, 256, 256, 1), np.float32), verbose=0).shape == (1, 2)
