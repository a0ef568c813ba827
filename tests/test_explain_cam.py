"""explain.explain against references written from the equations (Selvaraju et al. 2017, eq. 1-2, and each
method's own definition), on the seed InceptionV3, the demo CNN (Keras 3 and tf_keras) and a nested model."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import explain
from explain import engine
from explain.backends import tensorflow as tf_backend
from explain.engine import MAX_BUCKET, GradientSource, explainer_for
from explain.methods import GradCAM
from models.architectures import build_demo_cnn, build_seed_inception

pytestmark = pytest.mark.tf

SEED = 1234
REL = 1e-5


def images(count: int, shape: tuple[int, int, int], seed: int = SEED) -> np.ndarray:
    return np.random.default_rng(seed).random((count, *shape), dtype=np.float32)


# --------------------------------------------------------------------------------------------------- reference
def reference_activations_and_gradients(
    k: ModuleType, model: Any, target: Any, x: np.ndarray, classes: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A and G = d logit_c / dA from a separately built logits model that shares the network's weights.

    The last Dense is cloned with a linear activation and the same weights, so the score is the class score
    before the softmax; an eager GradientTape takes the gradient.
    """
    last = model.layers[-1]
    linear = k.layers.Dense(last.units, activation=None, name="reference_logits")
    logits = linear(last.input)
    linear.set_weights(last.get_weights())
    reference = k.Model(model.input, [target.output, logits])
    with tf.GradientTape() as tape:
        activations, scores = reference(tf.constant(x), training=False)
        score = tf.reduce_sum(tf.gather(scores, tf.constant(classes, tf.int32), axis=1, batch_dims=1))
    gradients = tape.gradient(score, activations)
    return activations.numpy().astype(np.float64), gradients.numpy().astype(np.float64), scores.numpy()


def reference_cam(method: str, a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Each method from its definition, in float64 numpy; maps are ReLU(sum_k W_k A_k)."""
    if method == "gradcam":  # eq. 1
        w = g.mean(axis=(1, 2), keepdims=True)
    elif method == "gradcam-guided":  # the seed article's weights
        w = (((a > 0) & (g > 0)) * g).mean(axis=(1, 2), keepdims=True)
    elif method == "gradcam++":  # Chattopadhay et al. eq. 19 and 10
        g2, g3 = g**2, g**3
        denominator = 2 * g2 + a.sum(axis=(1, 2), keepdims=True) * g3
        alpha = np.divide(g2, denominator, out=np.zeros_like(g2), where=denominator != 0)
        w = (alpha * np.maximum(g, 0)).sum(axis=(1, 2), keepdims=True)
    elif method == "hirescam":
        w = g
    elif method == "layercam":
        w = np.maximum(g, 0)
    else:
        raise AssertionError(method)
    return np.maximum((w * a).sum(axis=-1), 0)


def assert_maps_close(ours: np.ndarray, reference: np.ndarray) -> None:
    """Relative agreement at the map's own scale (a map of random weights can be ~1e-5 in absolute terms)."""
    assert ours.dtype == np.float32
    assert ours.shape == reference.shape
    scale = np.abs(reference).max()
    assert scale > 0, "reference map is all zero: the comparison would prove nothing"
    np.testing.assert_allclose(ours, reference, rtol=REL, atol=REL * scale)


def snapshot(model: Any) -> dict[str, Any]:
    """What explain() must not change: every layer's instance attributes and the last layer's activation."""
    return {
        "attributes": [(layer.name, sorted(vars(layer))) for layer in _all_layers(model)],
        "activation": getattr(model.layers[-1], "activation", None),
    }


def _all_layers(model: Any) -> list[Any]:
    out = []
    for layer in model.layers:
        out.append(layer)
        if hasattr(layer, "layers"):
            out.extend(_all_layers(layer))
    return out


# ------------------------------------------------------------------------------------------------------ models
@pytest.fixture(scope="module")
def seed_model() -> Any:
    return build_seed_inception(seed=SEED)


@pytest.fixture(scope="module")
def seed_images() -> np.ndarray:
    return images(3, (256, 256, 3))


@dataclass
class Demo:
    model: Any  # what explain() is given: a LoadedModel when the trained demo exists, else the network
    network: Any
    trained: bool


@pytest.fixture(scope="module")
def demo() -> Demo:
    """The trained demo model when the lead has shipped it (models/demo/), else a freshly built demo CNN."""
    try:
        from models.loading import DEMO_WEIGHTS, load_demo_model
    except ImportError:
        DEMO_WEIGHTS = None
    if DEMO_WEIGHTS is not None and DEMO_WEIGHTS.is_file():
        loaded = load_demo_model()
        return Demo(loaded, loaded.network, trained=True)
    keras.utils.set_random_seed(SEED)
    network = build_demo_cnn()
    return Demo(network, network, trained=False)


@pytest.fixture(scope="module")
def demo_images(demo: Demo) -> np.ndarray:
    return images(5, tuple(demo.network.inputs[0].shape[1:]), seed=SEED + 1)


# ----------------------------------------------------------------------------------------- seed InceptionV3
def test_seed_target_is_mixed10_not_the_1x1_pooling(seed_model: Any) -> None:
    assert explainer_for(seed_model).target_layer == "mixed10"


def test_seed_gradcam_matches_reference_and_predict(seed_model: Any, seed_images: np.ndarray) -> None:
    before = seed_model.predict(seed_images, verbose=0)
    state = snapshot(seed_model)

    result = explain.explain(seed_model, seed_images)

    assert result.method == "gradcam" and result.target_layer == "mixed10"
    assert result.heatmaps.shape == (3, 6, 6)
    np.testing.assert_allclose(result.probabilities, before, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(result.class_index, before.argmax(axis=1))
    a, g, _ = reference_activations_and_gradients(
        keras, seed_model, seed_model.get_layer("mixed10"), seed_images, result.class_index
    )
    assert_maps_close(result.heatmaps, reference_cam("gradcam", a, g))
    # The loaded model is untouched: still softmax probabilities, same outputs, same attributes.
    after = seed_model.predict(seed_images, verbose=0)
    np.testing.assert_array_equal(after, before)
    np.testing.assert_allclose(after.sum(axis=1), 1.0, rtol=1e-6)
    assert snapshot(seed_model) == state


def test_seed_class_index_override(seed_model: Any, seed_images: np.ndarray) -> None:
    predicted = explain.explain(seed_model, seed_images)
    other = (predicted.class_index + 1) % 3
    result = explain.explain(seed_model, seed_images, class_index=other.tolist())
    np.testing.assert_array_equal(result.class_index, other)
    np.testing.assert_array_equal(result.probabilities, predicted.probabilities)
    mixed10 = seed_model.get_layer("mixed10")
    a, g, _ = reference_activations_and_gradients(keras, seed_model, mixed10, seed_images, other)
    # With random weights another class's map may be all zero after the ReLU (test_demo_class_index_override
    # covers non-zero maps), so the tolerance is set at the predicted map's scale.
    expected = reference_cam("gradcam", a, g)
    np.testing.assert_allclose(result.heatmaps, expected, rtol=REL, atol=REL * predicted.heatmaps.max())
    assert not np.allclose(result.heatmaps, predicted.heatmaps)
    np.testing.assert_array_equal(explain.explain(seed_model, seed_images, class_index=2).class_index, [2, 2, 2])


def test_demo_class_index_override(demo: Demo, demo_images: np.ndarray) -> None:
    network = demo.network
    predicted = explain.explain(demo.model, demo_images)
    num_classes = network.outputs[0].shape[-1]
    other = (predicted.class_index + 1) % num_classes
    result = explain.explain(demo.model, demo_images, class_index=other.tolist())
    np.testing.assert_array_equal(result.class_index, other)
    np.testing.assert_array_equal(result.probabilities, predicted.probabilities)
    a, g, _ = reference_activations_and_gradients(
        keras, network, network.get_layer(result.target_layer), demo_images, other
    )
    assert_maps_close(result.heatmaps, reference_cam("gradcam", a, g))
    assert not np.allclose(result.heatmaps, predicted.heatmaps)


def test_nested_inception_inside_sequential_matches_flat_model(seed_model: Any, seed_images: np.ndarray) -> None:
    """An InceptionV3 used as ONE layer of a Sequential (where tf-keras-vis fails) gives the flat model's maps."""
    backbone = keras.applications.InceptionV3(weights=None, include_top=False, input_shape=(256, 256, 3))
    nested = keras.Sequential(
        [
            keras.Input((256, 256, 3)),
            backbone,
            keras.layers.AveragePooling2D(pool_size=(4, 4)),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    nested.set_weights(seed_model.get_weights())
    state = snapshot(nested)

    result = explain.explain(nested, seed_images)

    assert result.target_layer == f"{backbone.name}/mixed10"
    flat = explain.explain(seed_model, seed_images)
    np.testing.assert_allclose(result.probabilities, flat.probabilities, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(result.class_index, flat.class_index)
    a, g, _ = reference_activations_and_gradients(
        keras, seed_model, seed_model.get_layer("mixed10"), seed_images, result.class_index
    )
    assert_maps_close(result.heatmaps, reference_cam("gradcam", a, g))
    # A plain layer name is found inside the nested model too.
    assert explain.explain(nested, seed_images[:1], target_layer="mixed10").target_layer == result.target_layer
    assert snapshot(nested) == state
    np.testing.assert_allclose(nested.predict(seed_images, verbose=0).sum(axis=1), 1.0, rtol=1e-6)


# ------------------------------------------------------------------------------------------------ demo CNN
@pytest.mark.parametrize("method", sorted(explain.METHODS))
def test_demo_every_method_matches_its_definition(demo: Demo, demo_images: np.ndarray, method: str) -> None:
    network = demo.network
    result = explain.explain(demo.model, demo_images, method=method)
    assert result.method == method
    target = explainer_for(network, method, result.target_layer)
    assert target.target_layer == result.target_layer
    a, g, _ = reference_activations_and_gradients(
        keras, network, network.get_layer(result.target_layer), demo_images, result.class_index
    )
    assert_maps_close(result.heatmaps, reference_cam(method, a, g))
    np.testing.assert_allclose(result.probabilities, network.predict(demo_images, verbose=0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["gradcam", "gradcam-guided", "gradcam++"])
def test_demo_single_image_matches_its_definition(demo: Demo, demo_images: np.ndarray, method: str) -> None:
    """Batch 1 contracts per-channel weights with a plain matmul instead of einsum: same maps."""
    network = demo.network
    single = demo_images[1:2]
    result = explain.explain(demo.model, single, method=method)
    a, g, _ = reference_activations_and_gradients(
        keras, network, network.get_layer(result.target_layer), single, result.class_index
    )
    assert_maps_close(result.heatmaps, reference_cam(method, a, g))
    num_classes = network.outputs[0].shape[-1]
    other_class = int(result.class_index[0] + 1) % num_classes
    other = explain.explain(demo.model, single, method=method, class_index=other_class)
    np.testing.assert_array_equal(other.class_index, [other_class])
    a, g, _ = reference_activations_and_gradients(
        keras, network, network.get_layer(result.target_layer), single, other.class_index
    )
    np.testing.assert_allclose(other.heatmaps, reference_cam(method, a, g), rtol=REL, atol=REL * result.heatmaps.max())


def test_methods_registry_names() -> None:
    assert set(explain.METHODS) == {"gradcam", "gradcam-guided", "gradcam++", "hirescam", "layercam"}


def test_demo_target_discovery_and_loaded_model_default(demo: Demo, demo_images: np.ndarray) -> None:
    network = demo.network
    assert explainer_for(network).target_layer == "last_conv"

    @dataclass(frozen=True)
    class FakeLoaded:  # duck-typed LoadedModel: the configured target is the default
        network: Any
        target_layer: str

    maps = [layer for layer in network.layers[1:] if len(layer.output.shape) == 4]
    earlier = maps[-2]  # the feature map before the automatic target
    assert maps[-1].name == "last_conv"
    result = explain.explain(FakeLoaded(network, earlier.name), demo_images[:2])
    assert result.target_layer == earlier.name
    assert result.heatmaps.shape[1:] == tuple(earlier.output.shape[1:3])
    assert explain.explain(FakeLoaded(network, "auto"), demo_images[:2]).target_layer == "last_conv"
    with pytest.raises(ValueError, match="no layer named"):
        explain.explain(network, demo_images[:1], target_layer="no_such_layer")
    with pytest.raises(ValueError, match="gmp|Grad-CAM needs"):
        explain.explain(network, demo_images[:1], target_layer=network.layers[-2].name)


def test_batch_equals_single_calls_and_padding_does_not_leak(demo: Demo, demo_images: np.ndarray) -> None:
    three = explain.explain(demo.model, demo_images[:3])  # bucket 4: one padded row
    singles = [explain.explain(demo.model, demo_images[i : i + 1]) for i in range(3)]
    assert_maps_close(three.heatmaps, np.concatenate([s.heatmaps for s in singles]))
    np.testing.assert_array_equal(three.class_index, [s.class_index[0] for s in singles])
    # The same bucket filled with a real fourth image: the first three are unaffected.
    four = explain.explain(demo.model, demo_images[:4])
    np.testing.assert_array_equal(four.heatmaps[:3], three.heatmaps)
    np.testing.assert_array_equal(four.probabilities[:3], three.probabilities)


def test_retraces_only_per_bucket(demo_images: np.ndarray) -> None:
    keras.utils.set_random_seed(SEED)
    network = build_demo_cnn()
    explainer = explainer_for(network, "gradcam")
    assert explainer is explainer_for(network, "gradcam", explainer.target_layer)  # one cache entry per target
    for size in (1, 2, 3, 4, 1, 3, 2, 4, 3):
        assert explain.explain(network, demo_images[:1].repeat(size, axis=0)).heatmaps.shape[0] == size
    assert explainer.trace_count == 3  # buckets 1, 2 and 4
    big = np.concatenate([demo_images] * 8)[: MAX_BUCKET + 3]  # chunks: one full bucket, then bucket 4
    result = explain.explain(network, big)
    assert result.heatmaps.shape[0] == MAX_BUCKET + 3
    assert explainer.trace_count == 4
    assert_maps_close(result.heatmaps[-3:], explain.explain(network, big[-3:]).heatmaps)
    assert explainer_for(network, "layercam").trace_count == 0  # a different method is a different pass


def test_explanation_is_frozen_and_read_only(demo: Demo, demo_images: np.ndarray) -> None:
    result = explain.explain(demo.model, demo_images[:2])
    with pytest.raises(ValueError):
        result.heatmaps[0, 0, 0] = 1.0
    with pytest.raises(AttributeError):
        result.method = "other"  # type: ignore[misc]
    assert result.probabilities.dtype == np.float32
    assert result.probabilities.shape == (2, demo.network.outputs[0].shape[-1])


@pytest.mark.parametrize("size", [1, 3, MAX_BUCKET + 3])  # exact bucket, padded, two chunks
def test_every_array_is_read_only_and_typed(demo: Demo, demo_images: np.ndarray, size: int) -> None:
    x = np.concatenate([demo_images] * 8)[:size]
    for result in (explain.explain(demo.model, x), explain.explain(demo.model, x, class_index=0)):
        for array in (result.probabilities, result.class_index, result.heatmaps):
            assert not array.flags.writeable
        assert result.probabilities.dtype == np.float32 and result.probabilities.shape == (size, 2)
        assert result.class_index.dtype == np.int64 and result.class_index.shape == (size,)
        assert result.heatmaps.dtype == np.float32 and result.heatmaps.shape == (size, 32, 32)


def test_the_predicted_class_pass_takes_only_the_images(demo_images: np.ndarray) -> None:
    """The node's pass has one input; naming classes traces a second pass per bucket, on first use only."""
    keras.utils.set_random_seed(SEED)
    network = build_demo_cnn()
    x = demo_images[:2]
    predicted = explain.explain(network, x)
    explainer = explainer_for(network, "gradcam")
    (compiled,) = explainer._concrete.values()
    assert [spec.dtype for spec in tf.nest.flatten(compiled.function.structured_input_signature)] == [tf.float32]
    other = 1 - predicted.class_index
    named = explain.explain(network, x, class_index=other.tolist())
    np.testing.assert_array_equal(named.class_index, other)
    assert explainer.trace_count == 2
    # -1 in the explainer's own class input means "the predicted class", per image.
    mixed = explainer(x, np.array([-1, other[1]], dtype=np.int64))
    np.testing.assert_array_equal(mixed.class_index, [predicted.class_index[0], other[1]])
    assert_maps_close(mixed.heatmaps[:1], predicted.heatmaps[:1])
    assert_maps_close(mixed.heatmaps[1:], named.heatmaps[1:])
    explain.explain(network, x)
    explain.explain(network, x, class_index=0)
    assert explainer.trace_count == 2


@pytest.mark.parametrize("keep", [3, 2])
def test_packed_results_unpack_when_the_map_size_is_known_only_at_run_time(keep: int) -> None:
    rng = np.random.default_rng(SEED)
    probabilities = rng.random((3, 4), dtype=np.float32)
    classes = np.array([2, 0, 3], dtype=np.int64)
    heatmaps = rng.random((3, 5, 7), dtype=np.float32)
    shapes: list[Any] = []

    @tf.function(
        input_signature=[
            tf.TensorSpec((3, 4), tf.float32),
            tf.TensorSpec((3,), tf.int64),
            tf.TensorSpec((3, None, None), tf.float32),
        ]
    )
    def pack(p: tf.Tensor, c: tf.Tensor, h: tf.Tensor) -> tf.Tensor:
        packed, map_shape = tf_backend._pack(p, c, h)
        shapes.append(map_shape)
        return packed

    flat = pack(probabilities, classes, heatmaps).numpy()
    assert flat.shape == (3 * 2 + 3 * 4 + 3 * 5 * 7 + 2,)
    assert shapes == [None]
    p, c, h = engine._unpack(flat, 3, 4, None, keep)
    np.testing.assert_array_equal(p, probabilities[:keep])
    np.testing.assert_array_equal(c, classes[:keep])
    np.testing.assert_array_equal(h, heatmaps[:keep])
    static, map_shape = tf_backend._pack(tf.constant(probabilities), tf.constant(classes), tf.constant(heatmaps))
    assert map_shape == (5, 7)
    np.testing.assert_array_equal(engine._unpack(static.numpy(), 3, 4, map_shape, keep)[2], heatmaps[:keep])


def test_direct_calls_reject_an_empty_batch_and_take_any_integer_classes(demo_images: np.ndarray) -> None:
    keras.utils.set_random_seed(SEED)
    network = build_demo_cnn()
    explainer = explainer_for(network)
    with pytest.raises(ValueError, match="no images"):
        explainer(demo_images[:0])
    expected = explainer(demo_images[:3], np.array([1, -1, 0], dtype=np.int64))
    for dtype in (np.int32, np.uint8, np.int16):
        classes = np.array([1, 0, 0], dtype=dtype) if dtype is np.uint8 else np.array([1, -1, 0], dtype=dtype)
        result = explainer(demo_images[:3], classes)
        np.testing.assert_array_equal(result.class_index[[0, 2]], [1, 0])
        assert_maps_close(result.heatmaps[[0, 2]], expected.heatmaps[[0, 2]])


def test_invalid_arguments_fail_early(demo: Demo, demo_images: np.ndarray) -> None:
    with pytest.raises(ValueError, match="unknown method"):
        explain.explain(demo.model, demo_images[:1], method="saliency")
    with pytest.raises(ValueError, match="out of range"):
        explain.explain(demo.model, demo_images[:1], class_index=7)
    with pytest.raises(ValueError, match="int or 2 ints"):
        explain.explain(demo.model, demo_images[:2], class_index=[0])
    with pytest.raises(ValueError, match="model expects"):
        explain.explain(demo.model, demo_images[:, :128, :128])
    with pytest.raises(TypeError, match="floating"):
        explain.explain(demo.model, (demo_images[:1] * 255).astype(np.uint8))


# ----------------------------------------------------------------------------------- other heads, tf_keras
@pytest.mark.parametrize("head", ["dense_softmax", "activation_layer", "softmax_layer"])
def test_pre_softmax_score_for_every_head_form(head: str) -> None:
    keras.utils.set_random_seed(SEED)
    inputs = keras.Input((24, 24, 1))
    features = keras.layers.Conv2D(8, 3, activation="relu", name="features")(inputs)
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    if head == "dense_softmax":
        outputs = keras.layers.Dense(3, activation="softmax")(pooled)
        logits_layer_output = None
    else:
        logits_layer_output = keras.layers.Dense(3, name="logits")(pooled)
        final = keras.layers.Activation("softmax") if head == "activation_layer" else keras.layers.Softmax()
        outputs = final(logits_layer_output)
    model = keras.Model(inputs, outputs)
    x = images(2, (24, 24, 1))
    state = snapshot(model)

    result = explain.explain(model, x)

    if logits_layer_output is None:
        a, g, _ = reference_activations_and_gradients(keras, model, model.get_layer("features"), x, result.class_index)
    else:
        reference = keras.Model(inputs, [features, logits_layer_output])
        with tf.GradientTape() as tape:
            act, logits = reference(tf.constant(x), training=False)
            score = tf.reduce_sum(tf.gather(logits, result.class_index, axis=1, batch_dims=1))
        a, g = act.numpy().astype(np.float64), tape.gradient(score, act).numpy().astype(np.float64)
    assert_maps_close(result.heatmaps, reference_cam("gradcam", a, g))
    assert snapshot(model) == state
    np.testing.assert_allclose(model.predict(x, verbose=0).sum(axis=1), 1.0, rtol=1e-6)


def test_tf_keras_demo_cnn() -> None:
    tf_keras.utils.set_random_seed(SEED)
    network = build_demo_cnn(backend=tf_keras)
    x = images(3, (256, 256, 1), seed=SEED + 2)
    before = network.predict(x, verbose=0)
    state = snapshot(network)

    result = explain.explain(network, x)

    assert result.target_layer == "last_conv"
    assert explainer_for(network).gradient_source is GradientSource.POOLED
    np.testing.assert_allclose(result.probabilities, before, rtol=1e-5, atol=1e-6)
    a, g, _ = reference_activations_and_gradients(
        tf_keras, network, network.get_layer("last_conv"), x, result.class_index
    )
    assert_maps_close(result.heatmaps, reference_cam("gradcam", a, g))
    assert snapshot(network) == state
    np.testing.assert_array_equal(network.predict(x, verbose=0), before)


def test_configure_device_on_cpu_changes_nothing() -> None:
    setup = explain.configure_device(mixed_precision=True)
    if setup.gpus == 0:
        assert not setup.mixed_precision
        assert keras.mixed_precision.global_policy().name == "float32"


def test_mixed_precision_model_gives_float32_maps_close_to_float32(demo_images: np.ndarray) -> None:
    """CAM maths runs in float32 even when the network computes in float16 (as under a GPU's mixed policy)."""
    keras.utils.set_random_seed(SEED)
    reference_network = build_demo_cnn()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        network = build_demo_cnn()
    finally:
        keras.mixed_precision.set_global_policy("float32")
    network.set_weights(reference_network.get_weights())
    x = images(2, (256, 256, 1), seed=SEED + 3)
    full = explain.explain(reference_network, x)
    mixed = explain.explain(network, x, class_index=full.class_index.tolist())
    assert mixed.heatmaps.dtype == np.float32 and mixed.probabilities.dtype == np.float32
    scale = full.heatmaps.max()
    assert scale > 0
    np.testing.assert_allclose(mixed.heatmaps, full.heatmaps, atol=0.05 * scale)
    # The node's pass (the predicted class, no class input) in float16 too, where it picks the same classes.
    predicted = explain.explain(network, x)
    assert predicted.class_index.dtype == np.int64 and predicted.heatmaps.dtype == np.float32
    same = predicted.class_index == full.class_index
    np.testing.assert_allclose(predicted.heatmaps[same], full.heatmaps[same], atol=0.05 * scale)


# ------------------------------------------------------------------------------- pooled-gradient shortcut
class FullGradientGradCAM(GradCAM):
    """Grad-CAM that always takes G = dy/dA element-wise (the path every other method takes)."""

    uses_gradient_sums = False


def ops_shaped_like(graphs: list[Any], shape: tuple[int, ...]) -> Counter[str]:
    """Op types (with counts) in ``graphs`` that produce a tensor of exactly ``shape``."""
    return Counter(
        op.type for graph in graphs for op in graph.get_operations() if any(tuple(t.shape) == shape for t in op.outputs)
    )


def traced_graphs(explainer: Any) -> list[Any]:
    return [compiled.function.graph for compiled in explainer._concrete.values()]


def test_demo_gradcam_takes_the_pooled_gradient_and_skips_the_pooling_backward(
    demo: Demo, demo_images: np.ndarray
) -> None:
    network = demo.network
    x = demo_images[:2]
    result = explain.explain(demo.model, x)
    explainer = explainer_for(network, "gradcam", result.target_layer)
    assert explainer.gradient_source is GradientSource.POOLED
    # Ops on tensors shaped like A (2, 32, 32, 64): the pass has none beyond the bare forward's (no Equal,
    # RealDiv, Mul of the max pooling's gradient); the guided method, which needs G element-wise, has them.
    shape = (2, *network.get_layer(result.target_layer).output.shape[1:])
    forward = tf.function(lambda images: network(images, training=False), autograph=False)
    forward_ops = ops_shaped_like([forward.get_concrete_function(tf.TensorSpec(x.shape, tf.float32)).graph], shape)
    assert ops_shaped_like(traced_graphs(explainer), shape) <= forward_ops
    explain.explain(demo.model, x, method="gradcam-guided")
    guided = explainer_for(network, "gradcam-guided", result.target_layer)
    assert not ops_shaped_like(traced_graphs(guided), shape) <= forward_ops


@pytest.mark.parametrize("method", sorted(set(explain.METHODS) - {"gradcam"}))
def test_methods_needing_elementwise_gradients_keep_the_full_path(
    demo: Demo, demo_images: np.ndarray, method: str
) -> None:
    result = explain.explain(demo.model, demo_images[:1], method=method)
    assert explainer_for(demo.network, method, result.target_layer).gradient_source is GradientSource.FEATURE_MAPS


def test_seed_inception_keeps_the_full_path(seed_model: Any, seed_images: np.ndarray) -> None:
    """mixed10 feeds a 4x4 AveragePooling2D and a Flatten, not a global pooling."""
    explain.explain(seed_model, seed_images[:1])
    assert explainer_for(seed_model).gradient_source is GradientSource.FEATURE_MAPS


def test_demo_shortcut_equals_full_path(demo: Demo, demo_images: np.ndarray) -> None:
    network = demo.network
    shortcut = explain.explain(demo.model, demo_images)
    full_explainer = FullGradientGradCAM(network, shortcut.target_layer)
    full = full_explainer(demo_images)
    assert full_explainer.gradient_source is GradientSource.FEATURE_MAPS
    assert explainer_for(network, "gradcam", shortcut.target_layer).gradient_source is GradientSource.POOLED
    np.testing.assert_array_equal(shortcut.class_index, full.class_index)
    np.testing.assert_array_equal(shortcut.probabilities, full.probabilities)
    assert_maps_close(shortcut.heatmaps, full.heatmaps.astype(np.float64))


def pooled_model(k: ModuleType, pooling: str) -> Any:
    """conv -> [nearest 2x upsampling] -> global pooling -> softmax. The max variant's target is the upsampled
    map, where every value, hence every channel's maximum, appears in four cells: exact ties by construction."""
    k.utils.set_random_seed(SEED)
    inputs = k.Input((12, 12, 2))
    features = k.layers.Conv2D(6, 3, activation="relu", name="conv")(inputs)
    if pooling == "max":
        features = k.layers.UpSampling2D(2, name="features")(features)
        pooled = k.layers.GlobalMaxPooling2D(name="pool")(features)
    else:
        features = k.layers.Activation("linear", name="features")(features)
        pooled = k.layers.GlobalAveragePooling2D(name="pool")(features)
    outputs = k.layers.Dense(3, activation="softmax", name="predictions")(pooled)
    return k.Model(inputs, outputs)


def piecewise_constant_images(count: int) -> np.ndarray:
    """Random images whose left half is one constant: equal conv outputs there (more ties, zeros after ReLU)."""
    x = images(count, (12, 12, 2), seed=SEED + 4)
    x[:, :, :6, :] = 0.75
    return x


@pytest.mark.parametrize("backend", [keras, tf_keras], ids=["keras3", "tf_keras"])
@pytest.mark.parametrize("pooling", ["average", "max"])
def test_global_pooling_shortcut_matches_reference(backend: ModuleType, pooling: str) -> None:
    model = pooled_model(backend, pooling)
    x = piecewise_constant_images(4)
    state = snapshot(model)

    result = explain.explain(model, x)

    assert result.target_layer == "features"
    assert explainer_for(model).gradient_source is GradientSource.POOLED
    a, g, _ = reference_activations_and_gradients(backend, model, model.get_layer("features"), x, result.class_index)
    if pooling == "max":  # the reference gradient is split over tied maxima: the case the shortcut must sum up
        maxima = a.max(axis=(1, 2), keepdims=True)
        ties = (a == maxima).sum(axis=(1, 2))
        assert (ties >= 4).all() and (g != 0).sum(axis=(1, 2)).max() >= 4
    assert_maps_close(result.heatmaps, reference_cam("gradcam", a, g))
    for method in ("gradcam-guided", "hirescam"):  # the full path on the same model, for contrast
        other = explain.explain(model, x, method=method)
        assert explainer_for(model, method).gradient_source is GradientSource.FEATURE_MAPS
        assert_maps_close(other.heatmaps, reference_cam(method, a, g))
    assert snapshot(model) == state
    np.testing.assert_allclose(model.predict(x, verbose=0).sum(axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("backend", [keras, tf_keras], ids=["keras3", "tf_keras"])
def test_feature_maps_read_beside_the_pooling_keep_the_full_path(backend: ModuleType) -> None:
    """A second consumer of A (here a max pooling next to the average one) makes the pooled gradient partial."""
    backend.utils.set_random_seed(SEED)
    inputs = backend.Input((12, 12, 2))
    features = backend.layers.Conv2D(6, 3, activation="relu", name="features")(inputs)
    both = backend.layers.Concatenate()(
        [backend.layers.GlobalAveragePooling2D()(features), backend.layers.GlobalMaxPooling2D()(features)]
    )
    model = backend.Model(inputs, backend.layers.Dense(3, activation="softmax")(both))
    x = piecewise_constant_images(2)

    result = explain.explain(model, x)

    assert explainer_for(model).gradient_source is GradientSource.FEATURE_MAPS
    a, g, _ = reference_activations_and_gradients(backend, model, model.get_layer("features"), x, result.class_index)
    assert_maps_close(result.heatmaps, reference_cam("gradcam", a, g))


@pytest.mark.parametrize("backend", [keras, tf_keras], ids=["keras3", "tf_keras"])
def test_shortcut_through_a_nested_backbone(backend: ModuleType) -> None:
    """The target is the output of a nested backbone, pooled by the enclosing Sequential: still the shortcut."""
    backend.utils.set_random_seed(SEED)
    inputs = backend.Input((12, 12, 2))
    backbone = backend.Model(inputs, backend.layers.Conv2D(6, 3, activation="relu", name="features")(inputs))
    nested = backend.Sequential(
        [
            backend.Input((12, 12, 2)),
            backbone,
            backend.layers.GlobalAveragePooling2D(),
            backend.layers.Dense(3, activation="softmax"),
        ]
    )
    x = piecewise_constant_images(3)
    state = snapshot(nested)

    result = explain.explain(nested, x)

    assert result.target_layer == f"{backbone.name}/features"
    assert explainer_for(nested).gradient_source is GradientSource.POOLED
    full = FullGradientGradCAM(nested)(x)
    np.testing.assert_array_equal(result.class_index, full.class_index)
    assert_maps_close(result.heatmaps, full.heatmaps.astype(np.float64))
    assert snapshot(nested) == state


def test_warm_up_traces_every_bucket_up_to_the_batch_size_and_calls_then_trace_nothing(
    demo_images: np.ndarray,
) -> None:
    keras.utils.set_random_seed(SEED)
    network = build_demo_cnn()
    assert explain.warm_up(network, 16) == (1, 2, 4, 8, 16)
    explainer = explainer_for(network, "gradcam")
    assert explainer.trace_count == 5
    for size in (1, 3, 5, 16, 7, 2):
        explain.explain(network, np.concatenate([demo_images] * 4)[:size])
    assert explainer.trace_count == 5
    assert explain.warm_up(network, 3, method="layercam") == (1, 2, 4)
    assert explainer_for(network, "layercam").trace_count == 3
    asked: list[bool] = []

    def stop_after_one_bucket() -> bool:
        asked.append(bool(asked))
        return asked[-1]

    assert explain.warm_up(network, 16, method="hirescam", should_stop=stop_after_one_bucket) == (1,)
    assert explainer_for(network, "hirescam").trace_count == 1
