"""Train the shipped demo model on synthetic chest phantoms: ``python -m models.train_demo``.

Seeded and deterministic on CPU; about ten minutes on two cores. Writes the weights, ``metrics.json`` (held-out
accuracy and how it was obtained) into ``--out`` (default: the package's ``models/demo``). The numbers in
``models/MODEL_CARD.md`` come from that file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from models.synthetic import LABELS, SyntheticSet, generate

logger = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).resolve().parent / "demo"
WEIGHTS_NAME = "cxr_lens_demo_cnn.keras"
METRICS_NAME = "metrics.json"
TRAIN_SEED, VAL_SEED, HELD_OUT_SEED = 1, 2, 3


def to_input(images: np.ndarray) -> np.ndarray:
    """Display images (N, H, W) uint8 -> model input (N, H, W, 1) float32, the "unit" preprocessing."""
    return (images.astype(np.float32) / 255.0)[..., None]


def train(out_dir: Path, *, n_train: int, n_val: int, n_held_out: int, epochs: int, batch_size: int, seed: int) -> dict:
    return fit_and_save(out_dir, WEIGHTS_NAME, generate, (TRAIN_SEED, VAL_SEED, HELD_OUT_SEED), n_train=n_train,
                        n_val=n_val, n_held_out=n_held_out, epochs=epochs, batch_size=batch_size, seed=seed)


def fit_and_save(
    out_dir: Path,
    weights_name: str,
    make_set: Callable[[int, int], SyntheticSet],
    seeds: tuple[int, int, int],
    *,
    n_train: int,
    n_val: int,
    n_held_out: int,
    epochs: int,
    batch_size: int,
    seed: int,
    head: Mapping[str, Any] | None = None,
    held_out_extras: Callable[[np.ndarray, SyntheticSet], Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Train the demo CNN on ``make_set(n, seed)``'s cases; write its weights and :data:`METRICS_NAME`.

    ``seeds`` are those of the training, validation and held-out sets; the first two move by ``1000 * seed``,
    the held-out set stays fixed. The metrics start with ``head`` (a model's id and purpose), then the labels and
    the held-out accuracy, then ``held_out_extras(predicted classes, held-out set)``, then how they were obtained.
    """
    import keras
    import tensorflow as tf

    from models.architectures import build_demo_cnn

    train_seed, val_seed, held_out_seed = seeds
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    started = time.perf_counter()
    train_set = make_set(n_train, train_seed + 1000 * seed)
    val_set = make_set(n_val, val_seed + 1000 * seed)
    held_out = make_set(n_held_out, held_out_seed)
    model = build_demo_cnn(num_classes=len(LABELS))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(
        to_input(train_set.images), train_set.labels,
        validation_data=(to_input(val_set.images), val_set.labels),
        epochs=epochs, batch_size=batch_size, shuffle=True, verbose=2,
    )
    predicted = np.argmax(model.predict(to_input(held_out.images), batch_size=64, verbose=0), axis=1)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save(out_dir / weights_name)
    metrics = {
        **(head or {}),
        "labels": list(LABELS),
        "held_out_accuracy": round(float(np.mean(predicted == held_out.labels)), 4),
        **(held_out_extras(predicted, held_out) if held_out_extras else {}),
        "held_out_cases": n_held_out,
        "held_out_seed": held_out_seed,
        "train_cases": n_train,
        "val_cases": n_val,
        "epochs": epochs,
        "batch_size": batch_size,
        "seed": seed,
        "final_val_accuracy": round(float(history.history["val_accuracy"][-1]), 4),
        "train_seconds": round(time.perf_counter() - started, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
    }
    (out_dir / METRICS_NAME).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics


def train_cli(
    argv: list[str] | None,
    train_model: Callable[..., dict[str, Any]],
    *,
    description: str,
    out: Path,
    n_train: int,
    n_val: int,
    n_held_out: int,
    epochs: int,
) -> tuple[argparse.Namespace, dict[str, Any]]:
    """The training command: parse ``argv`` (these defaults), set up logging, run ``train_model`` (a ``train``).

    Returns the parsed options and the metrics.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--train", type=int, default=n_train, help="training cases")
    parser.add_argument("--val", type=int, default=n_val, help="validation cases")
    parser.add_argument("--held-out", type=int, default=n_held_out, help="held-out test cases (fixed seed)")
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    metrics = train_model(args.out, n_train=args.train, n_val=args.val, n_held_out=args.held_out,
                          epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
    return args, metrics


def main(argv: list[str] | None = None) -> int:
    args, metrics = train_cli(argv, train, description=__doc__.splitlines()[0], out=DEMO_DIR, n_train=2500,
                              n_val=400, n_held_out=1000, epochs=6)
    logger.info("held-out accuracy %.4f on %d cases; weights in %s", metrics["held_out_accuracy"],
                metrics["held_out_cases"], args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
