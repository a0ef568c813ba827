"""Train the shortcut TEST model, the wolf detector that looks at the snow: ``python -m models.train_shortcut``.

The demo CNN's architecture trained on :func:`models.synthetic.generate_shortcut`, where the label is carried
only by a burned-in token outside the lungs and focal opacities appear at random in both classes. It exists to
prove that the explanation-trust alarm fires on a model that is right for the wrong reason; it is never the
default model and its id says it is a test model. Seeded and deterministic on CPU; under three minutes on two
cores. Writes the weights and ``metrics.json`` (held-out accuracy on the token, and agreement with the opacity
it ignores) into ``--out`` (default: the package's ``models/shortcut``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from models.synthetic import SyntheticSet, generate_shortcut
from models.train_demo import fit_and_save, train_cli

logger = logging.getLogger(__name__)

SHORTCUT_DIR = Path(__file__).resolve().parent / "shortcut"
WEIGHTS_NAME = "cxr_lens_shortcut_test_cnn.keras"
MODEL_ID = "cxr-lens-shortcut-test-cnn"
# Seeds of their own, apart from the demo's (1, 2, 3); the held-out set is fixed whatever --seed says.
TRAIN_SEED, VAL_SEED, HELD_OUT_SEED = 101, 102, 103
HEAD = {
    "model_id": MODEL_ID,
    "purpose": "TEST MODEL: label carried only by a burned-in token outside the lungs; not for any other use",
}


def _opacity_agreement(predicted: np.ndarray, held_out: SyntheticSet) -> dict[str, Any]:
    # Agreement of "focal_opacity" predictions with the opacity actually drawn: about 0.5 for a model that
    # ignores the lungs.
    return {"held_out_opacity_agreement": round(float(np.mean(predicted == (held_out.radii > 0))), 4)}


def train(
    out_dir: Path, *, n_train: int, n_val: int, n_held_out: int, epochs: int, batch_size: int, seed: int
) -> dict[str, Any]:
    return fit_and_save(out_dir, WEIGHTS_NAME, generate_shortcut, (TRAIN_SEED, VAL_SEED, HELD_OUT_SEED),
                        n_train=n_train, n_val=n_val, n_held_out=n_held_out, epochs=epochs, batch_size=batch_size,
                        seed=seed, head=HEAD, held_out_extras=_opacity_agreement)


def main(argv: list[str] | None = None) -> int:
    args, metrics = train_cli(argv, train, description=__doc__.splitlines()[0], out=SHORTCUT_DIR, n_train=1200,
                              n_val=200, n_held_out=400, epochs=4)
    logger.info("TEST model %s: held-out accuracy %.4f on %d cases (opacity agreement %.4f); weights in %s",
                MODEL_ID, metrics["held_out_accuracy"], metrics["held_out_cases"],
                metrics["held_out_opacity_agreement"], args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
