"""`qtrap-proxy grafana push` against a fake Grafana on 127.0.0.1 that implements the endpoints the push
uses (GET /api/health, GET/POST /api/folders, POST /api/dashboards/db) with Grafana's status codes and
token checks; bad URLs and tokens end with one line and exit status 2."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from qtrap_proxy.grafana.dashboards import dashboards
from tests.helpers import BIN, ROOT, free_port

EDITOR, VIEWER = "glsa_editor_token", "glsa_viewer_token"


@dataclass
class FakeGrafana:
    """State of the fake: folders by uid, dashboards by uid (with version and folder), requests seen."""

    folders: dict[str, dict[str, Any]] = field(default_factory=dict)
    dashboards: dict[str, dict[str, Any]] = field(default_factory=dict)
    seen: list[tuple[str, str, str | None]] = field(default_factory=list)


def _handler(state: FakeGrafana) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _role(self) -> str | None:
            auth = self.headers.get("Authorization", "")
            return {f"Bearer {EDITOR}": "Editor", f"Bearer {VIEWER}": "Viewer"}.get(auth)

        def _body(self) -> Any:
            return json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"null")

        def do_GET(self) -> None:
            state.seen.append(("GET", self.path, self.headers.get("Authorization")))
            if self.path == "/api/health":
                self._send(200, {"commit": "0123abc", "database": "ok", "version": "11.5.1"})
            elif self.path.startswith("/api/folders"):
                if self._role() is None:
                    self._send(401, {"message": "invalid API key", "traceID": ""})
                else:
                    self._send(
                        200,
                        [{"id": f["id"], "uid": u, "title": f["title"]} for u, f in state.folders.items()],
                    )
            else:
                self._send(404, {"message": "Not found"})

        def do_POST(self) -> None:
            state.seen.append(("POST", self.path, self.headers.get("Authorization")))
            role = self._role()
            if role is None:
                self._send(401, {"message": "invalid API key"})
                return
            if role != "Editor":
                self._send(403, {"message": "You'll need additional permissions to perform this action."})
                return
            body = self._body()
            if self.path == "/api/folders":
                uid = body.get("uid") or f"f{len(state.folders)}"
                if uid in state.folders:
                    self._send(409, {"message": "a folder with the same uid already exists"})
                    return
                state.folders[uid] = {"id": len(state.folders) + 1, "title": body["title"]}
                self._send(200, {"id": state.folders[uid]["id"], "uid": uid, "title": body["title"]})
            elif self.path == "/api/dashboards/db":
                d = body.get("dashboard") or {}
                if not d.get("title") or not isinstance(d.get("panels"), list):
                    self._send(400, {"message": "Dashboard title cannot be empty", "status": "empty-name"})
                    return
                if body.get("folderUid") not in state.folders:
                    self._send(400, {"message": "folder not found", "status": "not-found"})
                    return
                old = state.dashboards.get(d["uid"])
                if old is not None and not body.get("overwrite"):
                    self._send(412, {"message": "The dashboard has been changed by someone else"})
                    return
                version = 1 if old is None else old["version"] + 1
                state.dashboards[d["uid"]] = {
                    "dashboard": d,
                    "folderUid": body["folderUid"],
                    "version": version,
                }
                slug = re.sub(r"[^a-z0-9]+", "-", d["title"].lower()).strip("-")
                self._send(
                    200,
                    {
                        "id": 1,
                        "uid": d["uid"],
                        "url": f"/d/{d['uid']}/{slug}",
                        "status": "success",
                        "version": version,
                    },
                )
            else:
                self._send(404, {"message": "Not found"})

    return Handler


@dataclass
class Server:
    url: str
    state: FakeGrafana


def _serve(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture
def grafana() -> Iterator[Server]:
    state = FakeGrafana()
    for url in _serve(_handler(state)):
        yield Server(url, state)


class _NotGrafana(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        data = b"<html><body>hello</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "GRAFANA_TOKEN"}
    return subprocess.run(
        [str(BIN / "qtrap-proxy"), "grafana", "push", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
        check=False,
    )


def _one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == "" and r.stderr.count("\n") == 1 and r.stderr.startswith("qtrap-proxy: "), r.stderr
    return r.stderr.strip()


def test_push_creates_folder_and_dashboards_then_updates_in_place(grafana: Server) -> None:
    r = cli("--url", grafana.url, "--token", EDITOR)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 3 and all(line.startswith("pushed ") for line in lines)
    assert f"{grafana.url}/d/qtrap-trap/" in r.stdout
    assert [f["title"] for f in grafana.state.folders.values()] == ["qtrap"]
    expected = {d["uid"]: d for d in dashboards()}
    assert set(grafana.state.dashboards) == set(expected)
    for uid, stored in grafana.state.dashboards.items():
        assert stored["version"] == 1 and stored["folderUid"] in grafana.state.folders
        assert {**stored["dashboard"], "id": 0} == {**expected[uid], "id": 0}
    # the token went as a bearer token on every authenticated call, and /api/health went first
    assert grafana.state.seen[0][:2] == ("GET", "/api/health")
    assert all(auth == f"Bearer {EDITOR}" for _, path, auth in grafana.state.seen if path != "/api/health")
    # again: same folder, same dashboards, new versions
    r = cli("--url", grafana.url + "/", "--token", EDITOR)
    assert r.returncode == 0, r.stderr
    assert len(grafana.state.folders) == 1 and len(grafana.state.dashboards) == 3
    assert {s["version"] for s in grafana.state.dashboards.values()} == {2}


def test_push_committed_json_into_named_folder(grafana: Server) -> None:
    r = cli(
        "--url", grafana.url, "--token", EDITOR, "--folder", "Energy / qtrap", "--dir", "grafana/dashboards"
    )
    assert r.returncode == 0, r.stderr
    assert [f["title"] for f in grafana.state.folders.values()] == ["Energy / qtrap"]
    on_disk = {p.stem: json.loads(p.read_text()) for p in (ROOT / "grafana" / "dashboards").glob("*.json")}
    assert set(grafana.state.dashboards) == set(on_disk)


def test_token_env_variable(grafana: Server) -> None:
    env = {**os.environ, "GRAFANA_TOKEN": EDITOR}
    r = subprocess.run(
        [str(BIN / "qtrap-proxy"), "grafana", "push", "--url", grafana.url],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert r.returncode == 0, r.stderr


def test_bad_token(grafana: Server) -> None:
    err = _one_line_error(cli("--url", grafana.url, "--token", "wrong"))
    assert "refused the token (401 Unauthorized)" in err and grafana.url in err
    assert grafana.state.dashboards == {}


def test_token_without_permission(grafana: Server) -> None:
    err = _one_line_error(cli("--url", grafana.url, "--token", VIEWER))
    assert "403 Forbidden" in err and "Editor" in err and "creating folder 'qtrap'" in err
    assert grafana.state.dashboards == {}


def test_missing_token() -> None:
    err = _one_line_error(cli("--url", "http://127.0.0.1:3000"))
    assert "needs --token" in err


def test_unreachable_url() -> None:
    err = _one_line_error(
        cli("--url", f"http://127.0.0.1:{free_port()}", "--token", EDITOR, "--timeout", "3")
    )
    assert "cannot reach Grafana at http://127.0.0.1:" in err


def test_not_grafana() -> None:
    for url in _serve(_NotGrafana):
        err = _one_line_error(cli("--url", url, "--token", EDITOR))
        assert f"{url} is not a Grafana" in err
    # a server that answers JSON errors but has no /api/health
    state = FakeGrafana()
    handler = _handler(state)

    class NoHealth(handler):  # type: ignore[valid-type,misc]
        def do_GET(self) -> None:
            self._send(404, {"message": "Not found"})

    for url in _serve(NoHealth):
        err = _one_line_error(cli("--url", url, "--token", EDITOR))
        assert "is not a Grafana: GET /api/health answered HTTP 404" in err


@pytest.mark.parametrize("url", ["grafana:3000", "ftp://grafana", "http://", "http://grafana:notaport"])
def test_bad_url(url: str) -> None:
    err = _one_line_error(cli("--url", url, "--token", EDITOR))
    assert "bad Grafana URL" in err


def test_bad_dir(tmp_path: Path) -> None:
    err = _one_line_error(cli("--url", "http://127.0.0.1:1", "--token", EDITOR, "--dir", str(tmp_path)))
    assert "no *.json dashboards" in err
    (tmp_path / "x.json").write_text("{")
    assert "not a readable JSON file" in _one_line_error(
        cli("--url", "http://127.0.0.1:1", "--token", EDITOR, "--dir", str(tmp_path))
    )
