"""Benchmark: prediction + Grad-CAM in one compiled pass vs the bare forward pass vs the seed article's pattern.

    python -m bench.gradcam [--repeats N] [--quick] [--mixed-precision | --no-mixed-precision]

In one process, on the same model and inputs, it times (medians after warm-up):
  forward  a compiled ``tf.function`` forward pass (numpy in, probabilities out);
  ours     ``explain.explain`` (probabilities, class and Grad-CAM map from one compiled pass);
  seed     the seed article's ``GradCAM.compute_heatmap``: a new ``Model`` per call, an eager GradientTape,
           guided weights, cv2 resize and min-max normalisation, one image per call (its class index known
           beforehand, so the seed pays nothing for prediction: a conservative baseline).
for the seed InceptionV3 (random weights, 256x256x3) and the demo CNN (256x256x1), at batch 1 and 16.
Calls alternate between the three (rotating order), so that changing machine load hits each alike.
Targets from the issue: ours <= 1.05x forward, and the seed pattern >= 12x slower than ours per image.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cv2  # noqa: E402
import numpy as np  # noqa: E402

BATCHES = (1, 16)
FORWARD_TARGET = 1.05
SEED_TARGET = 12.0


def seed_compute_heatmap(model: Any, layer_name: str, image: np.ndarray, class_idx: int, eps: float = 1e-8) -> np.ndarray:
    """The seed article's ``GradCAM.compute_heatmap``, kept as written (bar Keras 3 spelling)."""
    import keras
    import tensorflow as tf

    grad_model = keras.Model(inputs=model.inputs, outputs=[model.get_layer(layer_name).output, model.output])
    with tf.GradientTape() as tape:
        inputs = tf.cast(image, tf.float32)
        (conv_outputs, predictions) = grad_model(inputs)
        loss = predictions[:, class_idx]
    grads = tape.gradient(loss, conv_outputs)
    cast_conv_outputs = tf.cast(conv_outputs > 0, "float32")
    cast_grads = tf.cast(grads > 0, "float32")
    guided_grads = cast_conv_outputs * cast_grads * grads
    conv_outputs = conv_outputs[0]
    guided_grads = guided_grads[0]
    weights = tf.reduce_mean(guided_grads, axis=(0, 1))
    cam = tf.reduce_sum(tf.multiply(weights, conv_outputs), axis=-1)
    (w, h) = (image.shape[2], image.shape[1])
    heatmap = cv2.resize(cam.numpy(), (w, h))
    numer = heatmap - np.min(heatmap)
    denom = (heatmap.max() - heatmap.min()) + eps
    heatmap = numer / denom
    return (heatmap * 255).astype("uint8")


def paired_medians(
    functions: dict[str, Callable[[], Any]], repeats: dict[str, int], warmup: int = 1
) -> dict[str, float]:
    """Median ms per function, timed in alternation (order rotating) so that drift in machine load hits all alike.

    ``repeats[name]`` calls of each; a function with fewer repeats drops out of the rotation once done.
    """
    for function in functions.values():
        for _ in range(warmup):
            function()
    samples: dict[str, list[float]] = {name: [] for name in functions}
    names = list(functions)
    for round_index in range(max(repeats.values())):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            if len(samples[name]) < repeats[name]:
                start = time.perf_counter()
                functions[name]()
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e3 for name, values in samples.items()}


@dataclass(frozen=True)
class Row:
    model: str
    batch: int
    forward_ms: float
    ours_ms: float
    seed_ms: float  # for the whole batch, one call per image

    @property
    def ours_over_forward(self) -> float:
        return self.ours_ms / self.forward_ms

    @property
    def seed_over_ours(self) -> float:
        return self.seed_ms / self.ours_ms


def bench_model(name: str, model: Any, shape: tuple[int, int, int], repeats: int, seed_repeats: int) -> list[Row]:
    import tensorflow as tf

    import explain

    target = explain.explainer_for(model).target_layer
    forward = tf.function(lambda x: model(x, training=False), autograph=False)
    rows = []
    for batch in BATCHES:
        images = np.random.default_rng(batch).random((batch, *shape), dtype=np.float32)
        compiled = forward.get_concrete_function(tf.TensorSpec(images.shape, tf.float32))
        classes = explain.explain(model, images).class_index

        def run_forward() -> np.ndarray:
            return compiled(tf.constant(images)).numpy()

        def run_ours() -> Any:
            return explain.explain(model, images)

        def run_seed() -> list[np.ndarray]:
            return [
                seed_compute_heatmap(model, target, images[i : i + 1], int(classes[i])) for i in range(batch)
            ]

        run_forward(), run_ours()  # first runs optimise the graphs; paired_medians warms once more
        calls = repeats
        if calls <= 0:  # auto: about 20 s of forward + ours per row, at least 30 and at most
            # 3,000 calls each (a 3 ms model at batch 1 then gets ~9 s each: its ratio is a few percent of noise)
            start = time.perf_counter()
            run_forward()
            calls = int(min(3000, max(30, 10.0 / max(time.perf_counter() - start, 1e-4))))
        medians = paired_medians(
            {"forward": run_forward, "ours": run_ours, "seed": run_seed},
            {"forward": calls, "ours": calls, "seed": seed_repeats},
        )
        rows.append(Row(name, batch, medians["forward"], medians["ours"], medians["seed"]))
        print(f"  measured {name} batch {batch}", flush=True)
    return rows


def print_table(rows: list[Row], device: str) -> None:
    print(f"\nGrad-CAM benchmark on {device} (medians, ms; seed = one call per image)")
    header = (
        f"{'model':<16}{'batch':>6}{'forward':>10}{'ours':>10}{'seed':>11}"
        f"{'ours/img':>10}{'seed/img':>10}{'ours/fwd':>10}{'seed/ours':>11}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        fwd_flag = "" if r.ours_over_forward <= FORWARD_TARGET else "!"
        seed_flag = "" if r.seed_over_ours >= SEED_TARGET else "!"
        print(
            f"{r.model:<16}{r.batch:>6}{r.forward_ms:>10.1f}{r.ours_ms:>10.1f}{r.seed_ms:>11.1f}"
            f"{r.ours_ms / r.batch:>10.2f}{r.seed_ms / r.batch:>10.1f}"
            f"{r.ours_over_forward:>9.3f}{fwd_flag:1}{r.seed_over_ours:>10.1f}{seed_flag:1}"
        )
    print(f"targets: ours/fwd <= {FORWARD_TARGET}, seed/ours >= {SEED_TARGET} per image ('!' marks a miss)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=0,
                        help="timed calls of forward and ours (default: about 20 s per row, 30 to 3,000 calls)")
    parser.add_argument("--quick", action="store_true", help="few repeats, for a smoke run")
    parser.add_argument(
        "--mixed-precision",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="float16 compute on a capable GPU (default: CXR_LENS_MIXED_PRECISION, else on when supported)",
    )
    parser.add_argument("--models", default="seed,demo", help="comma-separated subset of: seed,demo")
    args = parser.parse_args(argv)
    repeats = 6 if args.quick else args.repeats
    seed_repeats = 2 if args.quick else 5

    import tensorflow as tf

    import explain
    from models.architectures import build_demo_cnn, build_seed_inception

    setup = explain.configure_device(mixed_precision=args.mixed_precision)
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        device = f"GPU {details.get('device_name', gpus[0].name)}"
    else:
        device = f"CPU ({os.cpu_count()} cores)"
    device += ", mixed precision" if setup.mixed_precision else ", float32"
    print(f"TensorFlow {tf.__version__} on {device}", flush=True)

    builders = {
        "seed_inception": (lambda: build_seed_inception(seed=0), (256, 256, 3)),
        "demo_cnn": (lambda: build_demo_cnn(), (256, 256, 1)),
    }
    wanted = {"seed": "seed_inception", "demo": "demo_cnn"}
    rows: list[Row] = []
    for key in args.models.split(","):
        name = wanted[key.strip()]
        build, shape = builders[name]
        rows.extend(bench_model(name, build(), shape, repeats, seed_repeats))
    print_table(rows, device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
