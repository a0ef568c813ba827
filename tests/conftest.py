"""Shared pytest configuration for CXR Lens."""

from __future__ import annotations

from pydicom import config

# Whatever the tests write must be valid DICOM (STYLE.md 11): invalid values raise instead of warning.
config.settings.writing_validation_mode = config.RAISE
