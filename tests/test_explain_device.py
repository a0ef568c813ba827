"""explain.device: GPU memory growth and mixed precision are set up when configure_device is called, never on import."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.tf


def test_importing_explain_sets_up_no_device() -> None:
    # A fresh interpreter: device set-up is process-wide, and this one may have run it already.
    script = textwrap.dedent(
        """
        import importlib, pkgutil
        import keras
        import tensorflow as tf

        calls = []

        def recorded(name, original):
            def call(*args, **kwargs):
                calls.append(name)
                return original(*args, **kwargs)
            return call

        watched = [
            (tf.config, "list_physical_devices"),
            (tf.config.experimental, "list_physical_devices"),
            (tf.config.experimental, "set_memory_growth"),
            (tf.config, "set_visible_devices"),
            (tf.config.experimental, "get_device_details"),
            (keras.mixed_precision, "set_global_policy"),
        ]
        for owner, name in watched:
            setattr(owner, name, recorded(name, getattr(owner, name)))

        import explain
        for info in pkgutil.walk_packages(explain.__path__, "explain."):
            importlib.import_module(info.name)
        for name in explain.__all__:  # the lazy public names, resolved
            getattr(explain, name)
        assert calls == [], f"importing explain touched the device: {calls}"
        assert keras.mixed_precision.global_policy().name == "float32"

        setup = explain.configure_device(mixed_precision=False)
        assert "list_physical_devices" in calls, calls  # the watch sees the set-up when it does run
        assert not setup.mixed_precision and keras.mixed_precision.global_policy().name == "float32"
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_importing_explain_on_jax_sets_up_no_device_and_loads_no_tensorflow() -> None:
    script = textwrap.dedent(
        """
        import os, sys
        os.environ["KERAS_BACKEND"] = "jax"
        os.environ.pop("XLA_PYTHON_CLIENT_PREALLOCATE", None)
        import keras
        from jax._src import xla_bridge

        import explain
        for name in explain.__all__:  # the lazy public names, resolved
            getattr(explain, name)
        assert not xla_bridge.backends_are_initialized(), "importing explain started JAX's devices"
        assert "tensorflow" not in sys.modules, "importing explain on JAX loaded TensorFlow"
        assert keras.mixed_precision.global_policy().name == "float32"

        setup = explain.configure_device(mixed_precision=True)
        assert (setup.backend, setup.gpus) == ("jax", 0) and not setup.mixed_precision  # on a CPU: nothing
        assert keras.mixed_precision.global_policy().name == "float32"
        assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"  # set before JAX started its devices
        assert "tensorflow" not in sys.modules
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
