"""Configuration: defaults equal the documented file; file < env < CLI; errors name the key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from dicom_node.cli import EXIT_CONFIG, main
from dicom_node.errors import ConfigError
from dicom_node.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTED = ROOT / "config" / "cxr-lens.toml"


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("CXR_LENS_"):
            monkeypatch.delenv(key)


def test_documented_file_equals_embedded_defaults() -> None:
    assert load_settings(DOCUMENTED) == load_settings(None) == Settings()


def test_documented_file_comments_every_key() -> None:
    # Every key line in the documented file carries a comment or follows a comment line.
    data = tomllib.loads(DOCUMENTED.read_text())
    documented = {(s, k) for s, keys in data.items() if isinstance(keys, dict) for k in keys}
    defaults = Settings().model_dump()
    expected = {(s, k) for s, keys in defaults.items() if isinstance(keys, dict) for k in keys}
    assert documented == expected


def test_precedence_file_env_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[node]\nport = 1111\nae_title = "FILE"\n[explain]\nmethod = "layercam"\n')
    s = load_settings(cfg)
    assert (s.node.port, s.node.ae_title, s.explain.method) == (1111, "FILE", "layercam")
    monkeypatch.setenv("CXR_LENS_NODE__PORT", "2222")
    s = load_settings(cfg)
    assert (s.node.port, s.node.ae_title) == (2222, "FILE")
    s = load_settings(cfg, ["node.port=3333", "model.labels=['a', 'b', 'c']"])
    assert s.node.port == 3333
    assert s.model.labels == ("a", "b", "c")
    assert s.explain.method == "layercam"


def test_destinations_list(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[destinations]]\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 4242\n'
                   '[[destinations]]\nae_title = "ARCHIVE"\nhost = "127.0.0.1"\nport = 104\n')
    s = load_settings(cfg)
    assert [d.ae_title for d in s.destinations] == ["PACS", "ARCHIVE"]


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ('[model]\npreprocess = "imagenet"\n', "model.preprocess"),
        ("[model]\ninput_size = [256]\n", "model.input_size"),
        ('[model]\nlabels = ["only"]\n', "model.labels"),
        ('[explain]\nmethod = "saliency"\n', "explain.method"),
        ("[node]\nport = 70000\n", "node.port"),
        ('[node]\nae_title = "THIS_AE_TITLE_IS_TOO_LONG"\n', "node.ae_title"),
        ("[node]\nprot = 104\n", "node.prot"),
        ("[hl7]\nport = 0\n", "hl7.port"),
        ('[[destinations]]\nae_title = "PACS"\nhost = "x"\n', "destinations.0.port"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, toml: str, key: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError, match=rf"\b{key.replace('.', '[.]')}\b"):
        load_settings(cfg)


def test_env_error_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_LENS_WORKER__BATCH_SIZE", "zero")
    with pytest.raises(ConfigError, match=r"worker\.batch_size"):
        load_settings(None)


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[node\nport = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "missing.toml")


def test_cli_config_error_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[node]\nport = -1\n")
    assert main(["config", "--config", str(cfg)]) == EXIT_CONFIG
    assert "node.port" in capsys.readouterr().err
    assert main(["config", "--set", "explain.alpha=2"]) == EXIT_CONFIG
