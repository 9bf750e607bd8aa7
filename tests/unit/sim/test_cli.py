from __future__ import annotations

from pathlib import Path

import pytest

from qtrap_sim.cli import main
from qtrap_sim.server import load_sim_config


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


def test_tracing_options_reach_the_backend_config(tmp_path: Path) -> None:
    path = tmp_path / "sim.yaml"
    path.write_text(
        "backends:\n"
        "  - {port: 9001, otlp_traces_endpoint: 'http://127.0.0.1:4318/v1/traces', otlp_batch_delay_ms: 250,\n"
        "     clock_skew_s: -1.5}\n"
        "  - {port: 9002, api: tgi, clock_skew_s: 2}\n"
    )
    vllm, tgi = load_sim_config(path).backends
    assert (vllm.otlp_traces_endpoint, vllm.otlp_batch_delay_ms, vllm.clock_skew_s) == (
        "http://127.0.0.1:4318/v1/traces",
        250,
        -1.5,
    )
    assert (tgi.otlp_traces_endpoint, tgi.otlp_batch_delay_ms, tgi.clock_skew_s) == (None, 100, 2)


def test_otlp_endpoint_on_tgi_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--api", "tgi", "--otlp-traces-endpoint", "http://127.0.0.1:4318/v1/traces"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "qtrap-sim: otlp_traces_endpoint: vLLM's API only (TGI reports its timing in headers)"


def test_bad_otlp_endpoint_names_the_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--otlp-traces-endpoint", "localhost:4318"]) == 2
    assert capsys.readouterr().err.startswith("qtrap-sim: --otlp-traces-endpoint: ")
