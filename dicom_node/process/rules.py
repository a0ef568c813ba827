"""Eligibility rules as data (``config/rules.toml``), evaluated by one pure function.

The embedded defaults equal ``config/rules.toml`` (a test keeps them equal), so the node works without the file.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydicom import Dataset
from pydicom.multival import MultiValue

from dicom_node.errors import ConfigError
from dicom_node.settings import format_validation_error


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    attribute: str
    any_of: tuple[str, ...] | None = None
    none_of: tuple[str, ...] | None = None
    when_absent: Literal["accept", "reject"] = "reject"
    reason: str = ""

    @model_validator(mode="after")
    def _one_test(self) -> Rule:
        if (self.any_of is None) == (self.none_of is None):
            raise ValueError(f"rule {self.name!r}: give exactly one of any_of, none_of")
        return self


class Rules(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rule: tuple[Rule, ...]


DEFAULT_RULES = Rules(
    rule=(
        Rule(name="modality", attribute="Modality", any_of=("CR", "DX"),
             reason="not a radiograph (Modality must be CR or DX)"),
        Rule(name="body_part", attribute="BodyPartExamined", any_of=("CHEST",), when_absent="accept",
             reason="not a chest examination (BodyPartExamined)"),
        Rule(name="view_position", attribute="ViewPosition", any_of=("PA", "AP"), when_absent="accept",
             reason="not a frontal view (ViewPosition must be PA or AP)"),
        Rule(name="photometric", attribute="PhotometricInterpretation", any_of=("MONOCHROME1", "MONOCHROME2"),
             reason="not a grayscale image (PhotometricInterpretation)"),
        Rule(name="derived_secondary", attribute="ImageType", none_of=("SECONDARY",), when_absent="accept",
             reason="a secondary capture (ImageType contains SECONDARY)"),
        Rule(name="own_output", attribute="Manufacturer", none_of=("CXR Lens",), when_absent="accept",
             reason="our own output (Manufacturer is CXR Lens)"),
    )
)


@dataclass(frozen=True)
class Eligibility:
    eligible: bool
    rule: str | None = None
    reason: str = ""


def load_rules(path: Path | str | None) -> Rules:
    """Rules from a TOML file, or the embedded defaults when ``path`` is None."""
    if path is None:
        return DEFAULT_RULES
    path = Path(path)
    try:
        return Rules(**tomllib.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise ConfigError(f"rules_file {path}: not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"rules_file {path}: not valid TOML ({exc})") from None
    except ValidationError as exc:
        raise ConfigError(f"rules_file {path}: {format_validation_error(exc)}") from None


def _values(ds: Dataset, keyword: str) -> list[str]:
    value = ds.get(keyword)
    if value is None or value == "":
        return []
    items = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    return [str(v).strip().upper() for v in items if str(v).strip()]


def evaluate(ds: Dataset, rules: Rules = DEFAULT_RULES) -> Eligibility:
    """Return whether ``ds`` is processed; if not, the first rule it fails. Reads the header only."""
    for rule in rules.rule:
        values = _values(ds, rule.attribute)
        if not values:
            if rule.when_absent == "reject":
                return Eligibility(False, rule.name, rule.reason or f"{rule.attribute} is missing")
            continue
        if rule.any_of is not None:
            allowed = {v.strip().upper() for v in rule.any_of}
            ok = any(v in allowed for v in values)
        else:
            banned = {v.strip().upper() for v in rule.none_of or ()}
            ok = not any(v in banned for v in values)
        if not ok:
            return Eligibility(False, rule.name, rule.reason or f"{rule.attribute} excluded")
    return Eligibility(True)
