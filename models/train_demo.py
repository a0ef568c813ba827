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
from pathlib import Path

import numpy as np

from models.synthetic import LABELS, generate

logger = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).resolve().parent / "demo"
WEIGHTS_NAME = "cxr_lens_demo_cnn.keras"
METRICS_NAME = "metrics.json"
TRAIN_SEED, VAL_SEED, HELD_OUT_SEED = 1, 2, 3


def to_input(images: np.ndarray) -> np.ndarray:
    """Display images (N, H, W) uint8 -> model input (N, H, W, 1) float32, the "unit" preprocessing."""
    return (images.astype(np.float32) / 255.0)[..., None]


def train(out_dir: Path, *, n_train: int, n_val: int, n_held_out: int, epochs: int, batch_size: int, seed: int) -> dict:
    import keras
    import tensorflow as tf

    from models.architectures import build_demo_cnn

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    started = time.perf_counter()
    train_set = generate(n_train, TRAIN_SEED + 1000 * seed)
    val_set = generate(n_val, VAL_SEED + 1000 * seed)
    held_out = generate(n_held_out, HELD_OUT_SEED)
    model = build_demo_cnn(num_classes=len(LABELS))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(
        to_input(train_set.images), train_set.labels,
        validation_data=(to_input(val_set.images), val_set.labels),
        epochs=epochs, batch_size=batch_size, shuffle=True, verbose=2,
    )
    probabilities = model.predict(to_input(held_out.images), batch_size=64, verbose=0)
    accuracy = float(np.mean(np.argmax(probabilities, axis=1) == held_out.labels))
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save(out_dir / WEIGHTS_NAME)
    metrics = {
        "labels": list(LABELS),
        "held_out_accuracy": round(accuracy, 4),
        "held_out_cases": n_held_out,
        "held_out_seed": HELD_OUT_SEED,
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEMO_DIR)
    parser.add_argument("--train", type=int, default=2500, help="training cases")
    parser.add_argument("--val", type=int, default=400, help="validation cases")
    parser.add_argument("--held-out", type=int, default=1000, help="held-out test cases (fixed seed)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    metrics = train(args.out, n_train=args.train, n_val=args.val, n_held_out=args.held_out, epochs=args.epochs,
                    batch_size=args.batch_size, seed=args.seed)
    logger.info("held-out accuracy %.4f on %d cases; weights in %s", metrics["held_out_accuracy"],
             metrics["held_out_cases"], args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
