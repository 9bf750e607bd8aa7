"""``qtrap-proxy keys ...`` (the other commands are tested with what they run: test_config, test_grafana)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from qtrap_proxy.cli import main
from qtrap_proxy.keystore import KEY_ID, KeyStore, hash_secret


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_create_list_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "keys.sqlite")
    code, out, err = _run(capsys, "keys", "create", "--keys-path", path, "--name", "ci", "--pools", "a, b")
    assert code == 0 and "shown only now" in err
    first, secret = out.splitlines()
    key_id = first.split()[1]
    assert KEY_ID.fullmatch(key_id) and "name ci, pools a,b, expires never" in first
    assert KeyStore(path).by_hash()[hash_secret(secret)].id == key_id

    code, out, _ = _run(capsys, "keys", "create", "--keys-path", path, "--expires", "2d", "--json")
    made = json.loads(out)
    assert code == 0 and made["secret"].startswith("qk-") and made["pools"] == [] and made["expires_unix_s"]

    code, out, _ = _run(capsys, "keys", "list", "--keys-path", path)
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["ID", "NAME", "POOLS", "STATE", "CREATED", "EXPIRES", "REVOKED"]
    assert lines[1].split()[:4] == [key_id, "ci", "a,b", "active"] and made["id"] in lines[2]
    assert secret not in out and made["secret"] not in out

    code, out, _ = _run(capsys, "keys", "revoke", key_id, "--keys-path", path)
    assert code == 0 and out.startswith(f"{key_id} revoked at ")
    code, out, _ = _run(capsys, "keys", "revoke", key_id, "--keys-path", path)
    assert code == 0 and "already revoked" in out
    code, out, _ = _run(capsys, "keys", "list", "--keys-path", path, "--json")
    states = {k["id"]: k["state"] for k in json.loads(out)["keys"]}
    assert states == {key_id: "revoked", made["id"]: "active"}
    assert "secret" not in out and hash_secret(secret) not in out


def test_keys_from_the_proxy_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = {
        "backends": [{"name": "a", "pool": "p", "precision": "bf16", "url": "http://h:1", "model": "m"}],
        "ledger": {"path": str(tmp_path / "data" / "ledger.sqlite")},
    }
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, out, _ = _run(capsys, "keys", "create", "--config", str(path), "--pools", "p")
    assert code == 0 and str(tmp_path / "data" / "qtrap-keys.sqlite") in out  # beside the ledger
    code, _, err = _run(capsys, "keys", "create", "--config", str(path), "--pools", "p,nope")
    assert code == 2 and err.strip() == "qtrap-proxy: --pools: nope not served (pools: p)"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["create", "--name", "two words"], "key name is 1 to 64 characters"),
        (["create", "--pools", "p@int4"], "a pool is 1 to 256 printable characters"),
        (["create", "--expires", "yesterday"], "expiry must be a duration"),
        (["create", "--expires", "2001-01-01"], "is not in the future"),
        (["revoke", "key_nothex"], "a key id is 'key_' and 12 lower-case hex digits"),
        (["revoke", "key_0123456789ab"], "no key key_0123456789ab"),
        (["list", "--config", "/nonexistent.yaml"], "cannot read config file"),
    ],
)
def test_bad_input_is_one_line_and_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    path = str(tmp_path / "keys.sqlite")
    KeyStore(path).create()
    where = [] if "--config" in argv else ["--keys-path", path]
    code, out, err = _run(capsys, "keys", *argv, *where)
    assert (
        code == 2
        and out == ""
        and err.count("\n") == 1
        and message in err
        and err.startswith("qtrap-proxy: ")
    )


def test_list_or_revoke_without_a_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "keys", "list", "--keys-path", str(tmp_path / "none.sqlite"))
    assert code == 2 and "no key store at" in err
    assert not (tmp_path / "none.sqlite").exists()


def test_admin_prints_a_random_key_and_its_digest(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "keys", "admin")
    env, digest = out.splitlines()
    key = env.removeprefix("QTRAP_ADMIN_KEY=")
    assert code == 0 and key.startswith("qa-") and len(key) >= 32
    assert digest == f"admin_key_sha256: {hashlib.sha256(key.encode()).hexdigest()}"
    assert _run(capsys, "keys", "admin")[1] != out


def test_version_has_one_source_pyproject(capsys: pytest.CaptureFixture[str]) -> None:
    """`qtrap-proxy --version` and the three packages' __version__ are pyproject.toml's version, both
    installed (from the package's metadata) and from a source tree that is not installed."""
    import subprocess
    import sys
    import tomllib

    import loadgen
    import qtrap_proxy
    import qtrap_sim

    root = Path(__file__).resolve().parents[3]
    with open(root / "pyproject.toml", "rb") as f:
        want = tomllib.load(f)["project"]["version"]
    assert qtrap_proxy.__version__ == qtrap_sim.__version__ == loadgen.__version__ == want, (
        "installed metadata differs from pyproject.toml: run `bash scripts/setup.sh` again"
    )
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"qtrap-proxy {want}\n"
    # -S: no site-packages, so no installed qtrap; the source tree alone on the path
    code = "import loadgen, qtrap_proxy, qtrap_sim; print(qtrap_proxy.__version__, qtrap_sim.__version__, loadgen.__version__)"
    r = subprocess.run(
        [sys.executable, "-S", "-c", code],
        env={"PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0 and r.stdout.split() == [want] * 3, r.stdout + r.stderr


def test_loadgen_without_its_extra_says_how_to_install_it() -> None:
    """`pip install qtrap` leaves out loadgen's dependencies (the `loadgen` extra): `python -m loadgen`
    then stops with one line naming the extra, not a traceback."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[3]
    # -S: no site-packages, so neither numpy nor rich; the source tree alone on the path
    r = subprocess.run(
        [sys.executable, "-S", "-m", "loadgen", "--version"],
        env={"PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 2 and r.stdout == "", r.stdout + r.stderr
    assert r.stderr == "error: loadgen needs numpy, rich: pip install 'qtrap[loadgen]'\n"
