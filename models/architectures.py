"""Network architectures: the seed article's InceptionV3 classifier and the shipped demo CNN.

Builders take the Keras module to build with, so the same architecture can be written by Keras 3 (``keras``)
or by tf.keras 2.x (``tf_keras``, which writes legacy SavedModels and .h5 files like the seed's).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any


def _keras(backend: ModuleType | None) -> ModuleType:
    if backend is not None:
        return backend
    import keras

    return keras


def build_seed_inception(
    num_classes: int = 3,
    input_shape: tuple[int, int, int] = (256, 256, 3),
    *,
    backend: ModuleType | None = None,
    seed: int | None = None,
) -> Any:
    """The seed article's Covid-19/normal/pneumonia classifier, without pretrained weights.

    InceptionV3 base (``include_top=False``), AveragePooling2D(4x4) to 1x1, Flatten, Dense 64 relu, Dropout 0.5,
    Dense ``num_classes`` softmax. The last 4-D layer with a spatial size above 1x1 is ``mixed10`` (6x6 at 256²).
    """
    k = _keras(backend)
    if seed is not None:
        k.utils.set_random_seed(seed)
    base = k.applications.InceptionV3(weights=None, include_top=False, input_shape=input_shape)
    x = k.layers.AveragePooling2D(pool_size=(4, 4))(base.output)
    x = k.layers.Flatten(name="flatten")(x)
    x = k.layers.Dense(64, activation="relu")(x)
    x = k.layers.Dropout(0.5)(x)
    out = k.layers.Dense(num_classes, activation="softmax")(x)
    return k.Model(inputs=base.input, outputs=out, name="seed_inception_v3")


def build_demo_cnn(
    num_classes: int = 2,
    input_shape: tuple[int, int, int] = (256, 256, 1),
    *,
    backend: ModuleType | None = None,
) -> Any:
    """A small all-convolutional classifier for the demo: 32x32 last feature map (at 256²), global max pooling head.

    Small enough to train on two CPU cores in minutes; the 32x32 map (8 px per cell at 256²) gives the heatmap
    enough resolution to point at a focal opacity. Global max pooling, because a focal finding covers a few cells
    of the map and max pooling passes its evidence to the head undiluted by the other ~1000 cells.
    """
    k = _keras(backend)
    layers = k.layers
    inputs = k.Input(shape=input_shape, name="image")
    # Batch normalisation with momentum 0.9: at Keras' default 0.99 the moving statistics lagged the fast-changing
    # weights of a short run (100% training accuracy, chance on held-out data); without normalisation, or with
    # group normalisation, the net did not leave the loss plateau within six epochs.
    x = inputs
    for i, (filters, strides) in enumerate(((16, 2), (32, 1), (48, 1))):
        x = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False, name=f"conv{i + 1}")(x)
        x = layers.BatchNormalization(momentum=0.9, name=f"bn{i + 1}")(x)
        x = layers.Activation("relu", name=f"relu{i + 1}")(x)
        if i < 2:
            x = layers.MaxPooling2D(2, name=f"pool{i + 1}")(x)
    x = layers.Conv2D(64, 3, padding="same", activation="relu", name="last_conv")(x)
    x = layers.GlobalMaxPooling2D(name="gmp")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    return k.Model(inputs, outputs, name="cxr_lens_demo_cnn")
