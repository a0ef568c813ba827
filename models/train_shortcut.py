"""Train the shortcut TEST model, the wolf detector that looks at the snow: ``python -m models.train_shortcut``.

The demo CNN's architecture trained on :func:`models.synthetic.generate_shortcut`, where the label is carried
only by a burned-in token outside the lungs and focal opacities appear at random in both classes. It exists to
prove that the explanation-trust alarm fires on a model that is right for the wrong reason; it is never the
default model and its id says it is a test model. Seeded and deterministic on CPU; under three minutes on two
cores. Writes the weights and ``metrics.json`` (held-out accuracy on the token, and agreement with the opacity
it ignores) into ``--out`` (default: the package's ``models/shortcut``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from models.synthetic import LABELS, generate_shortcut
from models.train_demo import METRICS_NAME, to_input

logger = logging.getLogger(__name__)

SHORTCUT_DIR = Path(__file__).resolve().parent / "shortcut"
WEIGHTS_NAME = "cxr_lens_shortcut_test_cnn.keras"
MODEL_ID = "cxr-lens-shortcut-test-cnn"
# Seeds of their own, apart from the demo's (1, 2, 3); the held-out set is fixed whatever --seed says.
TRAIN_SEED, VAL_SEED, HELD_OUT_SEED = 101, 102, 103


def train(
    out_dir: Path, *, n_train: int, n_val: int, n_held_out: int, epochs: int, batch_size: int, seed: int
) -> dict[str, Any]:
    import keras
    import tensorflow as tf

    from models.architectures import build_demo_cnn

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    started = time.perf_counter()
    train_set = generate_shortcut(n_train, TRAIN_SEED + 1000 * seed)
    val_set = generate_shortcut(n_val, VAL_SEED + 1000 * seed)
    held_out = generate_shortcut(n_held_out, HELD_OUT_SEED)
    model = build_demo_cnn(num_classes=len(LABELS))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(
        to_input(train_set.images), train_set.labels,
        validation_data=(to_input(val_set.images), val_set.labels),
        epochs=epochs, batch_size=batch_size, shuffle=True, verbose=2,
    )
    predicted = np.argmax(model.predict(to_input(held_out.images), batch_size=64, verbose=0), axis=1)
    has_opacity = held_out.radii > 0
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save(out_dir / WEIGHTS_NAME)
    metrics = {
        "model_id": MODEL_ID,
        "purpose": "TEST MODEL: label carried only by a burned-in token outside the lungs; not for any other use",
        "labels": list(LABELS),
        "held_out_accuracy": round(float(np.mean(predicted == held_out.labels)), 4),
        # Agreement of "focal_opacity" predictions with the opacity actually drawn: about 0.5 for a model that
        # ignores the lungs.
        "held_out_opacity_agreement": round(float(np.mean(predicted == has_opacity)), 4),
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
    parser.add_argument("--out", type=Path, default=SHORTCUT_DIR)
    parser.add_argument("--train", type=int, default=1200, help="training cases")
    parser.add_argument("--val", type=int, default=200, help="validation cases")
    parser.add_argument("--held-out", type=int, default=400, help="held-out test cases (fixed seed)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    metrics = train(args.out, n_train=args.train, n_val=args.val, n_held_out=args.held_out, epochs=args.epochs,
                    batch_size=args.batch_size, seed=args.seed)
    logger.info("TEST model %s: held-out accuracy %.4f on %d cases (opacity agreement %.4f); weights in %s",
                MODEL_ID, metrics["held_out_accuracy"], metrics["held_out_cases"],
                metrics["held_out_opacity_agreement"], args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
