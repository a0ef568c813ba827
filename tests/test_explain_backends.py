"""explain on every Keras backend: the JAX pass equals the TensorFlow pass, the node runs on JAX, and mixed
precision stays close to float32 on both.

Keras fixes its backend per process (when it is first imported), so each backend runs in a subprocess of its own:
this module run as ``python -m tests.test_explain_backends WORKER BACKEND DIRECTORY [ARGS...]``. The test process
only compares what the workers wrote. A JAX worker blocks every import of TensorFlow, as on a machine that has
none (the lent GPU machines).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SEED = 1234
REL = 1e-5  # the bound: JAX maps and probabilities equal TensorFlow's to 1e-5 relative
PROBABILITY_FLOOR = 1e-7  # absolute, for probabilities near zero (no output reports below 1e-5)
# Mixed precision against float32 on the trained demo CNN, at each map's own scale and in absolute probability.
# Measured on this CPU (both backends alike): float16, what configure_device chooses, 0.3% and 8e-5; bfloat16
# 1.6-2.1% and 4-7e-4.
MIXED_TOLERANCE = {"mixed_float16": (0.01, 3e-4), "mixed_bfloat16": (0.05, 3e-3)}

pytestmark = [pytest.mark.tf, pytest.mark.slow]


# ------------------------------------------------------------------------------------------------ the workers
class _NoTensorFlow:
    """A meta path finder that makes TensorFlow and tf_keras absent, as on a machine without them."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name.split(".")[0] in ("tensorflow", "tf_keras"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: this worker runs without TensorFlow)")
        return None


def _images(count: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((count, *shape), dtype=np.float32)


def _phantoms(count: int) -> np.ndarray:
    """Generated chest phantoms (half with a focal opacity) as the demo CNN's input, the "unit" preprocessing."""
    from models.synthetic import generate

    return (generate(count, seed=SEED).images.astype(np.float32) / 255.0)[..., None]


def _layer_attributes(model: Any) -> list[tuple[str, list[str]]]:
    found = []
    pending = list(model.layers)
    while pending:
        layer = pending.pop(0)
        found.append((layer.name, sorted(vars(layer))))
        pending.extend(getattr(layer, "layers", []))
    return found


def _convolutions(hlo_text: str) -> int:
    return hlo_text.count(" convolution(")


def _build_models(directory: Path) -> None:
    """The seed InceptionV3 (random weights) and the demo CNN nested in a Sequential, saved as .keras files."""
    import keras

    from models.architectures import build_seed_inception
    from models.loading import load_demo_model

    build_seed_inception(seed=SEED).save(directory / "seed.keras")
    demo = load_demo_model().network
    nested = keras.Sequential([keras.Input(demo.inputs[0].shape[1:]), demo], name="nested_demo")
    nested.save(directory / "nested_demo.keras")


def explain_worker(backend: str, directory: Path) -> None:
    """Explain the seed InceptionV3, the demo CNN and a nested model with every method; write what came out."""
    import keras

    import explain
    from explain.engine import explainer_for
    from models.loading import load_demo_model

    assert keras.config.backend() == backend
    if backend == "tensorflow":
        _build_models(directory)
    seed = keras.saving.load_model(directory / "seed.keras", compile=False)
    demo = load_demo_model()
    nested = keras.saving.load_model(directory / "nested_demo.keras", compile=False)
    seed_images = _images(3, (256, 256, 3), SEED)
    demo_images = _images(5, (256, 256, 1), SEED + 1)
    before = {name: _layer_attributes(model) for name, model in (("seed", seed), ("nested", nested))}
    arrays: dict[str, np.ndarray] = {}
    facts: dict[str, Any] = {}

    def record(case: str, model: Any, images: np.ndarray, **options: Any) -> Any:
        result = explain.explain(model, images, **options)
        explainer = explainer_for(getattr(model, "network", model), options.get("method", "gradcam"),
                                  result.target_layer)
        arrays[f"{case}/probabilities"] = result.probabilities
        arrays[f"{case}/class_index"] = result.class_index
        arrays[f"{case}/heatmaps"] = result.heatmaps
        facts[case] = {
            "target_layer": result.target_layer,
            "gradient_source": explainer.gradient_source.value if explainer.gradient_source else None,
            "dtypes": [str(a.dtype) for a in (result.probabilities, result.class_index, result.heatmaps)],
            "read_only": not any(a.flags.writeable for a in (result.probabilities, result.heatmaps)),
        }
        return result

    predicted = record("seed/gradcam", seed, seed_images)
    # LayerCAM for a class not predicted: A >= 0 (mixed10 concatenates ReLU outputs), so its map is not all zero
    # for random weights, where Grad-CAM's for another class can be.
    record("seed/layercam-named", seed, seed_images, method="layercam",
           class_index=((predicted.class_index + 1) % 3).tolist())
    record("seed/gradcam++", seed, seed_images, method="gradcam++")
    for method in sorted(explain.METHODS):
        record(f"demo/{method}", demo, demo_images, method=method)
    record("demo/gradcam-named", demo, demo_images, class_index=[1, 0, 1, 0, 1])
    record("demo/single-gradcam", demo, demo_images[1:2])
    record("demo/single-gradcam++", demo, demo_images[1:2], method="gradcam++")
    record("nested/gradcam", nested, demo_images)
    record("nested/hirescam", nested, demo_images, method="hirescam")
    facts["trace_counts"] = {
        "seed/gradcam": explainer_for(seed).trace_count,  # bucket 4
        "seed/layercam": explainer_for(seed, "layercam").trace_count,  # bucket 4, named classes
        "demo/gradcam": explainer_for(demo.network).trace_count,  # buckets 8 (both passes) and 1
        "demo/layercam": explainer_for(demo.network, "layercam").trace_count,
    }
    for size in (2, 3, 4, 7, 1):  # buckets 2 and 4 are new; 8 and 1 are compiled already
        explain.explain(demo, demo_images.repeat(2, axis=0)[:size])
    facts["trace_counts"]["demo/gradcam after more batch sizes"] = explainer_for(demo.network).trace_count
    after = {name: _layer_attributes(model) for name, model in (("seed", seed), ("nested", nested))}
    facts["unchanged"] = before == after
    facts["follows_new_weights"] = _follows_new_weights(demo.network, demo_images)
    if backend == "jax":
        facts["convolutions"] = _jax_convolutions(seed, demo.network, seed_images, demo_images)
    facts["tensorflow_imported"] = "tensorflow" in sys.modules
    np.savez(directory / f"{backend}.npz", **arrays)
    (directory / f"{backend}.json").write_text(json.dumps(facts, indent=1))


def _follows_new_weights(network: Any, images: np.ndarray) -> bool:
    """After the last layer's kernel is negated, the compiled pass gives the model's new outputs."""
    import explain

    dense = network.layers[-1]
    kernel = dense.kernel.numpy()
    before = explain.explain(network, images).probabilities
    dense.kernel.assign(-kernel)
    try:
        after = explain.explain(network, images).probabilities
        expected = np.asarray(network(images, training=False))
    finally:
        dense.kernel.assign(kernel)
    return bool(np.allclose(after, expected, rtol=1e-5, atol=1e-6) and not np.allclose(after, before, atol=1e-3))


def _jax_convolutions(seed: Any, demo: Any, seed_images: np.ndarray, demo_images: np.ndarray) -> dict[str, Any]:
    """Convolutions in each compiled pass and in the bare forward pass of the same shape (XLA's own HLO)."""
    import jax

    from explain.engine import _bucket, explainer_for

    counts: dict[str, Any] = {}
    for name, network, images, method in (
        ("seed/gradcam", seed, seed_images, "gradcam"),
        ("demo/gradcam", demo, demo_images, "gradcam"),
        ("demo/layercam", demo, demo_images, "layercam"),
    ):
        shape = (_bucket(len(images)), *images.shape[1:])
        trainable = [v.value for v in network.trainable_variables]
        non_trainable = [v.value for v in network.non_trainable_variables]
        forward = jax.jit(lambda t, n, x, network=network: network.stateless_call(t, n, x, training=False)[0])
        compiled = forward.lower(trainable, non_trainable, jax.ShapeDtypeStruct(shape, np.float32)).compile()
        explainer = explainer_for(network, method)
        counts[name] = {
            "forward": _convolutions(compiled.as_text()),
            "pass": _convolutions(explainer._concrete[(shape, False)].function.as_text()),
        }
    return counts


def mixed_worker(backend: str, directory: Path, policy: str) -> None:
    """The trained demo CNN in float32 and under ``policy`` (loaded as the node loads it): the maps' error."""
    import keras

    import explain
    from models.loading import load_demo_model

    images = _phantoms(16)
    full = explain.explain(load_demo_model(), images)
    keras.mixed_precision.set_global_policy(policy)
    model = load_demo_model()
    computes = sorted({layer.compute_dtype for layer in model.network.layers})
    same_classes = explain.explain(model, images, class_index=full.class_index.tolist())
    predicted = explain.explain(model, images)
    scale = full.heatmaps.reshape(len(images), -1).max(axis=1)
    per_image = np.abs(same_classes.heatmaps - full.heatmaps).reshape(len(images), -1).max(axis=1) / scale
    facts = {
        "policy": policy,
        "compute_dtypes": computes,
        "dtypes": [str(a.dtype) for a in (same_classes.probabilities, same_classes.heatmaps)],
        "map_error": float(per_image.max()),
        "map_error_median": float(np.median(per_image)),
        "probability_error": float(np.abs(same_classes.probabilities - full.probabilities).max()),
        "same_predictions": int((predicted.class_index == full.class_index).sum()),
        "images": len(images),
        "positive_maps": int((scale > 0).sum()),
    }
    (directory / f"mixed-{backend}-{policy}.json").write_text(json.dumps(facts, indent=1))


def cli_worker(arguments: Sequence[str]) -> int:
    """``cxr-lens`` itself, in this process, with the process set up as the CLI does it."""
    from dicom_node.cli import main

    code = main(list(arguments))
    if "tensorflow" in sys.modules:
        raise SystemExit("TensorFlow was imported")
    return code


def _main(argv: list[str]) -> int:
    worker, backend, directory, *rest = argv
    if backend == "jax":
        sys.meta_path.insert(0, _NoTensorFlow())
    if worker == "explain":
        explain_worker(backend, Path(directory))
    elif worker == "mixed":
        mixed_worker(backend, Path(directory), rest[0])
    elif worker == "cli":
        return cli_worker(rest)
    else:
        raise SystemExit(f"unknown worker {worker!r}")
    return 0


def run_worker(
    worker: str, backend: str, directory: Path, *arguments: str, keras_backend: str | None = None, timeout: int = 900
) -> subprocess.CompletedProcess[str]:
    """Run a worker in a fresh interpreter; ``keras_backend`` is its KERAS_BACKEND (None: unset)."""
    env = {key: value for key, value in os.environ.items() if key != "KERAS_BACKEND"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    if keras_backend is not None:
        env["KERAS_BACKEND"] = keras_backend
    command = [sys.executable, "-m", "tests.test_explain_backends", worker, backend, str(directory), *arguments]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _checked(process: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert process.returncode == 0, process.stderr[-4000:]
    return process


# ------------------------------------------------------------------------------------------- exact across backends
@pytest.fixture(scope="module")
def explained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict[str, np.ndarray], dict[str, Any]]]:
    """The same models and images explained on TensorFlow (which builds and saves the models), then on JAX."""
    directory = tmp_path_factory.mktemp("backends")
    results = {}
    for backend in ("tensorflow", "jax"):
        _checked(run_worker("explain", backend, directory, keras_backend=backend))
        with np.load(directory / f"{backend}.npz") as arrays:
            results[backend] = (dict(arrays), json.loads((directory / f"{backend}.json").read_text()))
    return results


def _cases(explained: dict[str, tuple[dict[str, np.ndarray], dict[str, Any]]]) -> list[str]:
    return sorted({key.rsplit("/", 1)[0] for key in explained["tensorflow"][0]})


def test_jax_maps_and_probabilities_equal_tensorflows(
    explained: dict[str, tuple[dict[str, np.ndarray], dict[str, Any]]],
) -> None:
    tf_arrays, tf_facts = explained["tensorflow"]
    jax_arrays, jax_facts = explained["jax"]
    cases = _cases(explained)
    assert len(cases) == 13 and set(jax_arrays) == set(tf_arrays)
    for case in cases:
        expected, actual = (
            {part: arrays[f"{case}/{part}"] for part in ("probabilities", "class_index", "heatmaps")}
            for arrays in (tf_arrays, jax_arrays)
        )
        np.testing.assert_array_equal(actual["class_index"], expected["class_index"], err_msg=case)
        np.testing.assert_allclose(actual["probabilities"], expected["probabilities"], rtol=REL,
                                   atol=PROBABILITY_FLOOR, err_msg=case)
        scale = np.abs(expected["heatmaps"]).max()
        assert scale > 0, f"{case}: the map is all zero, the comparison would prove nothing"
        np.testing.assert_allclose(actual["heatmaps"], expected["heatmaps"], rtol=REL, atol=REL * scale, err_msg=case)
        assert jax_facts[case] == tf_facts[case], case  # target layer, gradient source, dtypes, read-only
    assert tf_facts["nested/gradcam"]["target_layer"] == "cxr_lens_demo_cnn/last_conv"
    assert tf_facts["seed/gradcam"]["target_layer"] == "mixed10"
    # The pooled-gradient shortcut on both backends (through the nested model too); the full path elsewhere.
    sources = {case: tf_facts[case]["gradient_source"] for case in cases}
    assert {case for case, source in sources.items() if source == "pooled"} == {
        "demo/gradcam", "demo/gradcam-named", "demo/single-gradcam", "nested/gradcam"}


def test_one_compiled_pass_per_bucket_and_entry_point_on_both_backends(
    explained: dict[str, tuple[dict[str, np.ndarray], dict[str, Any]]],
) -> None:
    for backend in ("tensorflow", "jax"):
        _, facts = explained[backend]
        assert facts["trace_counts"] == {
            "seed/gradcam": 1,
            "seed/layercam": 1,
            "demo/gradcam": 3,
            "demo/layercam": 1,
            "demo/gradcam after more batch sizes": 5,
        }, backend
        assert facts["unchanged"], f"{backend}: explain changed the model's layers"
        assert facts["follows_new_weights"], f"{backend}: the compiled pass kept the weights it was compiled with"


def test_the_jax_pass_runs_the_network_once_and_no_backbone_backward(
    explained: dict[str, tuple[dict[str, np.ndarray], dict[str, Any]]],
) -> None:
    """In XLA's compiled pass, exactly the bare forward pass's convolutions: no second forward pass, and no
    backward convolutions (the gradient goes from the score back to A only, through the head)."""
    _, facts = explained["jax"]
    counts = facts["convolutions"]
    assert counts["seed/gradcam"]["forward"] == 94  # InceptionV3's convolutions
    assert counts["demo/gradcam"]["forward"] == 4
    for case, count in counts.items():
        assert count["pass"] == count["forward"], case
    assert not facts["tensorflow_imported"]


# ----------------------------------------------------------------------------------------------- mixed precision
@pytest.mark.parametrize("policy", sorted(MIXED_TOLERANCE))
@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_mixed_precision_maps_stay_close_to_float32(backend: str, policy: str, tmp_path: Path) -> None:
    _checked(run_worker("mixed", backend, tmp_path, policy, keras_backend=backend))
    facts = json.loads((tmp_path / f"mixed-{backend}-{policy}.json").read_text())
    half = policy.removeprefix("mixed_")
    # The loaded .keras model computes under the policy (its output layer stays float32), and the CAM maths
    # returns float32.
    assert facts["compute_dtypes"] == sorted({half, "float32"}), facts
    assert facts["dtypes"] == ["float32", "float32"]
    assert facts["positive_maps"] == facts["images"]
    map_tolerance, probability_tolerance = MIXED_TOLERANCE[policy]
    assert facts["map_error"] <= map_tolerance, facts
    assert facts["probability_error"] <= probability_tolerance, facts
    assert facts["same_predictions"] >= facts["images"] - 1, facts


# -------------------------------------------------------------------------------------------------- the node
def _obx_probabilities(hl7_text: str) -> dict[str, float]:
    values = {}
    for line in hl7_text.splitlines():
        fields = line.split("|")
        if fields[0] == "OBX" and fields[3].startswith("AIPROB."):
            values[fields[3].split("^")[0]] = float(fields[5])
    return values


def test_the_demo_round_trip_on_jax_matches_tensorflow(tmp_path: Path) -> None:
    """``model.backend = "jax"`` alone (KERAS_BACKEND unset) runs the whole node on JAX, without TensorFlow."""
    import pydicom

    from dicom_node.cli import main
    from tests.support.peers import sample

    out = tmp_path / "jax"
    process = run_worker("cli", "jax", tmp_path, "demo", "--out", str(out), "--set", "model.backend='jax'")
    assert process.returncode == 0, process.stderr[-4000:]
    assert "same study as the radiograph" in process.stdout and "DEMO MODEL" in process.stdout
    assert "device: jax" in process.stderr
    sc = pydicom.dcmread(out / "overlay.dcm")
    assert sc.StudyInstanceUID == pydicom.dcmread(sample("RG1_UNCR.dcm"), stop_before_pixels=True).StudyInstanceUID
    assert (out / "overlay.png").stat().st_size > 10_000
    on_jax = _obx_probabilities((out / "result.hl7").read_text())
    assert set(on_jax) == {"AIPROB.no_finding", "AIPROB.focal_opacity"}
    assert main(["demo", "--out", str(tmp_path / "tensorflow")]) == 0  # this process: TensorFlow
    on_tensorflow = _obx_probabilities((tmp_path / "tensorflow" / "result.hl7").read_text())
    assert on_jax == pytest.approx(on_tensorflow, abs=1e-5)


def _legacy_models(directory: Path) -> tuple[Path, Path]:
    """A tf_keras .h5 file and a tf_keras SavedModel directory (tiny models; the format is what matters)."""
    import tf_keras

    model = tf_keras.Sequential([tf_keras.Input((4,)), tf_keras.layers.Dense(2, activation="softmax")])
    h5 = directory / "legacy.h5"
    with pytest.warns(UserWarning, match="HDF5 file.*legacy"):  # writing the legacy format on purpose
        model.save(h5, save_format="h5")
    saved_model = directory / "legacy_saved_model"
    model.save(saved_model)
    return h5, saved_model


def test_legacy_tf_keras_models_refuse_another_backend_at_start(tmp_path: Path) -> None:
    from dicom_node.settings import ModelSettings
    from models.loading import ModelError, load_model
    from tests.support.peers import sample

    h5, saved_model = _legacy_models(tmp_path)
    for path in (h5, saved_model):
        with pytest.raises(ModelError, match="runs on TensorFlow only, but model.backend is 'jax'"):
            load_model(ModelSettings(path=str(path), backend="jax"))
    # The node: exit code 4 (a model error) before any port opens, with the reason, whether the backend comes
    # from the setting or from KERAS_BACKEND.
    for path, overrides, keras_backend in (
        (h5, ["--set", "model.backend='jax'"], None),
        (saved_model, [], "jax"),
    ):
        process = run_worker(
            "cli", "jax", tmp_path, "explain", str(sample("RG1_UNCR.dcm")), "-o", str(tmp_path / "out"),
            "--set", f"model.path='{path}'", *overrides, keras_backend=keras_backend,
        )
        assert process.returncode == 4, process.stderr[-4000:]
        assert "runs on TensorFlow only" in process.stderr and str(path) in process.stderr


def test_a_backend_other_than_the_process_keras_is_refused_by_name(tmp_path: Path) -> None:
    import keras

    from models.loading import DemoSpec, ModelError, load_model, resolve_backend

    other = "jax" if keras.config.backend() == "tensorflow" else "tensorflow"
    with pytest.raises(ModelError, match=f"model.backend '{other}': Keras in this process already runs on"):
        load_model(DemoSpec(backend=other))
    assert resolve_backend("jax") == "jax"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KERAS_BACKEND", "torch")
        with pytest.raises(ModelError, match="KERAS_BACKEND 'torch': not supported"):
            resolve_backend("auto")
        patch.delenv("KERAS_BACKEND")
        assert resolve_backend("auto") == "tensorflow"


def test_the_backend_setting_is_checked_with_the_rest() -> None:
    from dicom_node.errors import ConfigError
    from dicom_node.settings import load_settings

    assert load_settings(None).model.backend == "auto"
    assert load_settings(None, ["model.backend='jax'"]).model.backend == "jax"
    with pytest.raises(ConfigError, match="model.backend"):
        load_settings(None, ["model.backend='torch'"])


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
