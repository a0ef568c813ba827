"""Eligibility rules: data in config/rules.toml, one pure evaluator."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.data import get_testdata_file

from dicom_node.errors import ConfigError
from dicom_node.process.rules import DEFAULT_RULES, evaluate, load_rules

ROOT = Path(__file__).resolve().parents[1]


def _header(name: str) -> Dataset:
    return pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True)


def _ds(**attrs: object) -> Dataset:
    ds = Dataset()
    base = dict(Modality="CR", BodyPartExamined="CHEST", ViewPosition="PA", PhotometricInterpretation="MONOCHROME2",
                ImageType=["ORIGINAL", "PRIMARY"], Manufacturer="ACME")
    base.update(attrs)
    for k, v in base.items():
        if v is not None:
            setattr(ds, k, v)
    return ds


def test_config_file_equals_embedded_defaults() -> None:
    assert load_rules(ROOT / "config" / "rules.toml") == DEFAULT_RULES == load_rules(None)


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm"])
def test_rg1_chest_pa_is_eligible_although_derived_primary(name: str) -> None:
    ds = _header(name)
    assert list(ds.ImageType)[:2] == ["DERIVED", "PRIMARY"]
    assert evaluate(ds).eligible


def test_rg3_extremity_is_excluded_by_body_part() -> None:
    v = evaluate(_header("RG3_UNCR.dcm"))
    assert (v.eligible, v.rule) == (False, "body_part")


def test_ct_is_excluded_by_modality() -> None:
    v = evaluate(_header("CT_small.dcm"))
    assert (v.eligible, v.rule) == (False, "modality")
    assert "CR or DX" in v.reason


@pytest.mark.parametrize(
    ("attrs", "rule"),
    [
        ({"Modality": "MR"}, "modality"),
        ({"Modality": None}, "modality"),
        ({"ViewPosition": "LL"}, "view_position"),
        ({"PhotometricInterpretation": "RGB"}, "photometric"),
        ({"ImageType": ["DERIVED", "SECONDARY"]}, "derived_secondary"),
        ({"Manufacturer": "CXR Lens"}, "own_output"),
        ({"Manufacturer": "  cxr lens "}, "own_output"),
    ],
)
def test_exclusions(attrs: dict, rule: str) -> None:
    v = evaluate(_ds(**attrs))
    assert (v.eligible, v.rule) == (False, rule)


@pytest.mark.parametrize("attrs", [{}, {"BodyPartExamined": None}, {"ViewPosition": None}, {"ViewPosition": "AP"},
                                   {"Modality": "DX"}, {"ImageType": ["DERIVED", "PRIMARY"]}])
def test_accepted(attrs: dict) -> None:
    assert evaluate(_ds(**attrs)).eligible


def test_custom_rules_file(tmp_path: Path) -> None:
    f = tmp_path / "rules.toml"
    f.write_text('[[rule]]\nname = "pa_only"\nattribute = "ViewPosition"\nany_of = ["PA"]\nwhen_absent = "reject"\n')
    rules = load_rules(f)
    assert evaluate(_ds(ViewPosition="AP"), rules).rule == "pa_only"
    assert evaluate(_ds(ViewPosition=None), rules).rule == "pa_only"
    assert evaluate(_ds(), rules).eligible


def test_invalid_rules_file_names_the_problem(tmp_path: Path) -> None:
    f = tmp_path / "rules.toml"
    f.write_text('[[rule]]\nname = "x"\nattribute = "Modality"\n')
    with pytest.raises(ConfigError, match="exactly one of any_of, none_of"):
        load_rules(f)
    with pytest.raises(ConfigError, match="not found"):
        load_rules(tmp_path / "none.toml")
