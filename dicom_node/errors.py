"""The node's exception hierarchy: one root, a few specific subclasses.

Every failure that crosses a boundary maps to a named code there (C-STORE status, HL7 ACK code, exit code).
"""

from __future__ import annotations


class CxrLensError(Exception):
    """Root of every error the node raises on purpose."""


class ConfigError(CxrLensError):
    """Invalid configuration; the message names the offending key."""


class PixelError(CxrLensError):
    """The image cannot be rendered for the model."""


class MissingPixelDataError(PixelError):
    """The dataset has no Pixel Data (7FE0,0010)."""


class ColourImageError(PixelError):
    """The image is not grayscale (MONOCHROME1/2, one sample per pixel)."""


class MultiFrameError(PixelError):
    """The image has more than one frame."""


class AllZeroDecodeError(PixelError):
    """Decoding produced only zeros: a known failure mode of some codecs."""


class ImageTooLargeError(PixelError):
    """Rows x Columns exceed the configured maximum (checked before decoding)."""


class DecodeError(PixelError):
    """The pixel data could not be decoded (unsupported or corrupt)."""


class ModelError(CxrLensError):
    """The model cannot be loaded, does not fit the configuration, or gave an unusable (non-finite) output."""


class NotEligibleError(CxrLensError):
    """The instance is not one the node processes; ``rule`` names the rule that excluded it."""

    def __init__(self, rule: str, reason: str) -> None:
        super().__init__(f"{rule}: {reason}")
        self.rule = rule
        self.reason = reason


class DeliveryError(CxrLensError):
    """An output could not be delivered to a peer."""
