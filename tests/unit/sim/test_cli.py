from __future__ import annotations

from pathlib import Path

import pytest

from qtrap_sim.cli import main


def test_bad_option_value_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--port", "70000"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qtrap-sim: --port") and "\n" not in err


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("backends: [{api: grpc}]", "backends.0.api"),
        ("backends: []", "backends"),
        ("backends: [{port: 9001}, {port: 9001}]", "two backends share a port"),
        ("backends: [", "not valid YAML"),
    ],
)
def test_bad_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, needle: str) -> None:
    path = tmp_path / "sim.yaml"
    path.write_text(text)
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err
