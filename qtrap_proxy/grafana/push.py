"""``qtrap-proxy grafana push``: upload the dashboards to a Grafana through its HTTP API (grafana-client).

Steps: ``GET /api/health`` (is it a Grafana?), ``GET /api/folders`` (does the token work?), create
the folder if it is missing (``POST /api/folders``), then ``POST /api/dashboards/db`` for each
dashboard with ``overwrite: true``: pushing again updates them in place (same uid). Every failure is
a :class:`PushError` whose message fits one line.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from qtrap_proxy.grafana.dashboards import dashboards


class PushError(Exception):
    """Bad URL, unreachable or not a Grafana, token refused, or a dashboard refused (one-line message)."""


def load_dashboards(directory: Path | None) -> list[dict[str, Any]]:
    """The dashboards shipped with qtrap (``directory`` None), or every ``*.json`` of ``directory``."""
    if directory is None:
        return dashboards()
    if not directory.is_dir():
        raise PushError(f"--dir {directory}: not a directory")
    out = []
    for path in sorted(directory.glob("*.json")):
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise PushError(f"{path}: not a readable JSON file ({e})") from e
        if (
            not isinstance(d, dict)
            or not d.get("uid")
            or not d.get("title")
            or not isinstance(d.get("panels"), list)
        ):
            raise PushError(f"{path}: not a Grafana dashboard (uid, title and panels required)")
        out.append(d)
    if not out:
        raise PushError(f"--dir {directory}: no *.json dashboards in it")
    return out


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PushError(f"bad Grafana URL {url!r}: expected http(s)://host[:port][/path]")
    try:
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError as e:
        raise PushError(f"bad Grafana URL {url!r}: {e}") from e
    # grafana-client appends "api" to the path: a sub-path install needs its trailing slash
    return url if url.endswith("/") else url + "/"


def _folder_uid(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-").lower()[:40]
    return slug or "qtrap"


def push(
    url: str,
    token: str,
    *,
    folder: str = "qtrap",
    directory: Path | None = None,
    timeout_s: float = 10.0,
) -> list[str]:
    """Upload the dashboards into ``folder`` (created if missing); one line per dashboard pushed."""
    try:
        from grafana_client.api import GrafanaApi
        from grafana_client.client import GrafanaClientError, GrafanaException, GrafanaUnauthorizedError
    except ImportError as e:
        raise PushError("grafana push needs grafana-client: pip install 'qtrap[grafana]'") from e
    base = _check_url(url)
    boards = load_dashboards(directory)
    api: Any = GrafanaApi.from_url(base, credential=token, timeout=timeout_s)

    def fail(what: str, e: Exception) -> PushError:
        if isinstance(e, GrafanaUnauthorizedError):
            return PushError(f"Grafana at {url} refused the token (401 Unauthorized) {what}: check --token")
        if isinstance(e, GrafanaClientError) and e.status_code == 403:
            return PushError(
                f"Grafana at {url} denied {what} (403 Forbidden): the token needs the Editor role "
                "(create folders, write dashboards)"
            )
        if isinstance(e, GrafanaException):
            return PushError(f"Grafana at {url} failed {what}: {e.message or type(e).__name__}")
        return PushError(f"Grafana at {url} failed {what}: {e}")

    try:
        try:
            health = api.client.GET("/health")
        except OSError as e:  # niquests' ConnectionError
            raise PushError(f"cannot reach Grafana at {url}: {_reason(e)}") from e
        except GrafanaException as e:
            if e.status_code == 0:  # timeout or transport error
                raise PushError(f"cannot reach Grafana at {url}: {e.message}") from e
            raise PushError(f"{url} is not a Grafana: GET /api/health answered HTTP {e.status_code}") from e
        except ValueError as e:  # not JSON
            raise PushError(f"{url} is not a Grafana: GET /api/health did not answer JSON") from e
        if not isinstance(health, dict) or "database" not in health:
            raise PushError(f"{url} is not a Grafana: GET /api/health lacks Grafana's fields")
        try:
            folders = api.folder.get_all_folders()
        except (GrafanaException, OSError, ValueError) as e:
            raise fail("listing folders", e) from e
        uid = next((f["uid"] for f in folders if isinstance(f, dict) and f.get("title") == folder), None)
        if uid is None:
            try:
                uid = api.folder.create_folder(folder, uid=_folder_uid(folder))["uid"]
            except (GrafanaException, OSError, ValueError) as e:
                raise fail(f"creating folder {folder!r}", e) from e
        lines = []
        for d in boards:
            body = {
                "dashboard": {**d, "id": None},
                "folderUid": uid,
                "overwrite": True,
                "message": "qtrap-proxy grafana push",
            }
            try:
                r = api.dashboard.update_dashboard(body)
            except (GrafanaException, OSError, ValueError) as e:
                raise fail(f"saving dashboard {d['title']!r}", e) from e
            where = r.get("url", "") if isinstance(r, dict) else ""
            lines.append(
                f"pushed {d['title']!r} (uid {d['uid']}) to folder {folder!r}: {base.rstrip('/')}{where}"
            )
        return lines
    finally:
        api.client.s.close()


def _reason(e: BaseException) -> str:
    """The innermost cause of a connection error, in a few words."""
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    text = str(e) or type(e).__name__
    return text.splitlines()[0][:200]
