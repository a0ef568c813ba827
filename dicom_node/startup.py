"""Process-wide settings, applied once at start-up: the only place where CXR Lens changes global state.

Nothing in the package changes a global at import time or in a constructor. The CLI calls
:func:`configure_process` before any command runs; a program that embeds the node (a test, a benchmark) calls it
the same way. Device set-up for the model (GPU memory growth, mixed precision) is explicit too, where the model is
loaded (``process.processor.load_processor``), and so is the choice of Keras' backend
(:func:`configure_keras_backend`), which needs the model settings the CLI reads after :func:`configure_process`.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import warnings

import pydicom.config


def configure_process(*, verbose: bool = False, log_to_stderr: bool = True) -> None:
    """Logging, library log levels, pydicom's reading validation and warning filters for this process."""
    if log_to_stderr:
        logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # pynetdicom logs UIDs at INFO and whole data sets at DEBUG, highdicom the source's SOP Instance UID at INFO
    # when it copies the Patient and Study modules (SR, Parametric Map): quiet unless configured explicitly.
    for library in ("pynetdicom", "highdicom"):
        library_logger = logging.getLogger(library)
        if library_logger.level == logging.NOTSET:
            library_logger.setLevel(logging.WARNING)
    # pydicom's reading validation quotes the offending value (a malformed patient name or age) in its warnings:
    # values we only store and copy are not validated on reading (no PHI in logs).
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    # highdicom warns about person names in the source header (e.g. a single-component referring physician),
    # which the SC copies unchanged as the Patient and Study modules require. Set once for the process:
    # catch_warnings per call swaps the filters of the whole process and races with other threads.
    warnings.filterwarnings("ignore", message=".*person name.*", category=UserWarning)
    # OpenCV's own thread pool splits each resize, morphology or blend across the cores; the node already runs one
    # image per pool thread or stage process, so those helpers only add hand-offs and spinning: the trust regions
    # of a 512 px rendering cost 7.8 core-ms with them and 6.2 without, measured on 2 cores under load.
    import cv2

    cv2.setNumThreads(1)
    # TensorFlow's C++ start-up chatter (set before TensorFlow is first imported, by a model load).
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def configure_keras_backend(backend: str) -> None:
    """Run Keras on ``backend`` ("tensorflow" or "jax") in this process: set ``KERAS_BACKEND`` before Keras loads.

    Keras reads the variable once, when it is first imported, and keeps that backend for the life of the process.
    Where Keras is already imported, nothing changes here; loading the model then fails with a message naming both
    backends.
    """
    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = backend


def freeze_heap() -> None:
    """Exempt every object alive now from garbage collection, once the model is loaded (and again once warmed up).

    A framework holds hundreds of thousands of long-lived objects; every full pass of the cyclic collector walks
    them all while holding the GIL, stalling the threads that serve images. Frozen, they are never walked again.
    """
    gc.collect()
    gc.freeze()
