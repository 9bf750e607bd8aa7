from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from qtrap_proxy.cli import main
from qtrap_proxy.config import load_config
from qtrap_proxy.errors import ConfigError
from tests.helpers import ONE_BACKEND


def _cfg(**over: object) -> dict[str, object]:
    base: dict[str, object] = {
        "backends": [
            {
                "name": "a",
                "pool": "p",
                "precision": "bf16",
                "kind": "vllm",
                "url": "http://h:1",
                "model": "m",
            },
            {
                "name": "b",
                "pool": "p",
                "precision": "int4",
                "kind": "tgi",
                "url": "http://h:2/",
                "model": "m",
            },
        ]
    }
    base.update(over)
    return base


def test_valid_config_and_defaults() -> None:
    cfg = load_config(data=_cfg())
    assert cfg.server.host == "127.0.0.1" and cfg.server.port == 8080
    assert cfg.backends[1].url == "http://h:2"  # trailing slash removed
    assert cfg.default_precision("p") == "bf16"  # first listed backend
    assert cfg.backends[0].effective_health_path == "/health"
    assert cfg.meter.kind == "null"


def test_pool_default_precision() -> None:
    cfg = load_config(data=_cfg(pools={"p": {"default_precision": "int4"}}))
    assert cfg.default_precision("p") == "int4"


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda c: c["backends"][1].update(kind="triton"), "backends[1].kind"),
        (lambda c: c["backends"][1].update(name="a"), "backends[1].name: duplicate backend name 'a'"),
        (lambda c: c["backends"][0].update(url="gpu-node:8000"), "backends[0].url: must start with http"),
        (lambda c: c["backends"][0].pop("model"), "backends[0].model: Field required"),
        (lambda c: c["backends"][0].update(pool="p@x"), "backends[0].pool: must not contain '@'"),
        (lambda c: c.update(pools={"p": {"default_precision": "fp8"}}), "pools.p.default_precision: 'fp8'"),
        (lambda c: c.update(pools={"q": {}}), "pools.q: no backend serves this pool"),
        (lambda c: c.update(backends=[]), "backends: List should have at least 1 item"),
        (lambda c: c.update(server={"port": "eighty"}), "server.port"),
        (lambda c: c.update(sever={"port": 1}), "sever: Extra inputs are not permitted"),
        (
            lambda c: c["backends"][0].update(kind="openai", token_counters=True, devices=[{}]),
            "backends[0]: token_counters: needs kind vllm or tgi",
        ),
        (
            lambda c: c["backends"][1].update(token_counters=True),
            "backends[1]: token_counters: the backend lists no devices",
        ),
    ],
)
def test_errors_name_the_key(mutate: object, needle: str) -> None:
    data = _cfg()
    mutate(data)  # type: ignore[operator]
    with pytest.raises(ConfigError) as ei:
        load_config(data=data)
    assert needle in str(ei.value)


def test_token_counters_read_the_backends_metrics_page() -> None:
    data = _cfg()
    data["backends"][1].update(token_counters=True, devices=[{"host": "n1", "index": 2}])  # type: ignore[index]
    cfg = load_config(data=data)
    assert cfg.backends[1].metrics_url == "http://h:2/metrics"
    assert not cfg.backends[0].token_counters and cfg.meter.counters_interval_s == 0.1


def test_env_overrides_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QTRAP_SERVER__PORT", "9123")
    monkeypatch.setenv("QTRAP_LEDGER__PATH", "/tmp/x.sqlite")
    cfg = load_config(data=_cfg(server={"host": "0.0.0.0", "port": 1}))
    assert cfg.server.port == 9123
    assert cfg.server.host == "0.0.0.0"  # untouched keys of the file stay
    assert cfg.ledger.path == "/tmp/x.sqlite"


def test_env_bad_value_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QTRAP_SERVER__PORT", "99999")
    with pytest.raises(ConfigError, match=r"server\.port"):
        load_config(data=_cfg())


def test_cli_bad_config_one_line_nonzero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = _cfg()
    bad["backends"][0]["kind"] = "nope"  # type: ignore[index]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(bad))
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "backends[0].kind" in err


def test_cli_missing_file_and_bad_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read config file" in capsys.readouterr().err
    (tmp_path / "b.yaml").write_text("backends: [\n")
    assert main(["check-config", "--config", str(tmp_path / "b.yaml")]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_cli_check_config_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_cfg()))
    assert main(["check-config", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "pool p (default precision bf16)" in out and "int4:b (tgi http://h:2)" in out


def test_python_dash_m_entry_point(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(_cfg()))
    r = subprocess.run(
        [sys.executable, "-m", "qtrap_proxy", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and "pool p" in r.stdout


# ---------------------------------------------------------------- auth (issue 13)


def test_auth_is_off_by_default_and_its_keys_live_beside_the_ledger() -> None:
    cfg = load_config(data=_cfg(ledger={"path": "/var/lib/qtrap/ledger.sqlite"}))
    assert not cfg.auth.enabled and not cfg.auth.protect_metrics and not cfg.auth.key_metrics
    assert cfg.auth.admin_key_env == "QTRAP_ADMIN_KEY" and cfg.auth.refresh_s == 5.0
    assert cfg.keys_path == "/var/lib/qtrap/qtrap-keys.sqlite"
    assert load_config(data=_cfg(auth={"keys_path": "/k.sqlite"})).keys_path == "/k.sqlite"


@pytest.mark.parametrize(
    ("auth", "message"),
    [
        ({"enable": True}, r"auth\.enable: Extra inputs are not permitted"),
        ({"admin_key_sha256": "abc"}, r"auth\.admin_key_sha256: must be 64 hexadecimal digits"),
        ({"admin_key_env": "1BAD-NAME"}, r"auth\.admin_key_env: must be an environment variable name"),
        ({"refresh_s": 0}, r"auth\.refresh_s"),
        ({"refresh_s": "nan"}, r"auth\.refresh_s"),
        ({"keys_path": "ledger.sqlite"}, r"auth\.keys_path: must not be the ledger's file"),
    ],
)
def test_bad_auth_settings_are_named(auth: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(data=_cfg(auth=auth, ledger={"path": "ledger.sqlite"}))


def test_auth_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QTRAP_AUTH__ENABLED", "true")
    monkeypatch.setenv("QTRAP_AUTH__PROTECT_METRICS", "true")
    cfg = load_config(data=_cfg())
    assert cfg.auth.enabled and cfg.auth.protect_metrics


def test_serve_and_check_config_refuse_auth_without_an_admin_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("QTRAP_ADMIN_KEY", raising=False)
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(_cfg(auth={"enabled": True}, ledger={"path": str(tmp_path / "ledger.sqlite")}))
    )
    for command in ("serve", "check-config"):
        assert main([command, "--config", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "no admin key; set $QTRAP_ADMIN_KEY" in err
    monkeypatch.setenv("QTRAP_ADMIN_KEY", "qa-" + "k" * 40)
    assert main(["check-config", "--config", str(path)]) == 0
    assert "auth: on (keys " in capsys.readouterr().out


def test_otel_export_is_off_by_default_and_its_endpoint_is_checked() -> None:
    cfg = load_config(data={"backends": ONE_BACKEND})
    assert cfg.otel_export.enabled is False and cfg.otel_export.endpoint.endswith("/v1/traces")
    with pytest.raises(ConfigError, match=r"otel_export\.endpoint"):
        load_config(data={"backends": ONE_BACKEND, "otel_export": {"enabled": True, "endpoint": "grpc://x"}})
