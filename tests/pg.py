"""A real PostgreSQL server for the fleet ledger's tests, started by the suite as an unprivileged process.

Debian's ``postgresql`` package (scripts/setup.sh --test installs it) provides the binaries under
/usr/lib/postgresql/<version>/bin. initdb and postgres refuse to run as root: as root (CI) they run as
the package's ``postgres`` user (``runuser``) in a temporary folder given to it. Password authentication
(scram-sha-256) over TCP on loopback, so that the tests pass a password as the proxy does. No binaries:
the tests fail, naming the package, rather than skip.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from glob import glob
from pathlib import Path

import psycopg
import pytest

from tests.helpers import free_port

USER = "qtrap"
PASSWORD = "s3cret-Pg-pw"  # a test server's; tests check that it never shows in errors or logs
_counter = itertools.count()


def _bindir() -> Path:
    found = sorted(glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    which = shutil.which("postgres")
    if which:
        return Path(which).parent
    pytest.fail(
        "PostgreSQL server binaries (initdb, postgres) not found: the fleet ledger's tests need Debian's "
        "postgresql package (scripts/setup.sh --test installs it)"
    )


class PgServer:
    """One PostgreSQL server in a temporary folder; :meth:`stop` and :meth:`start` restart it on its port."""

    def __init__(self) -> None:
        self.bindir = _bindir()
        self.root = Path(tempfile.mkdtemp(prefix="qtrap-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.log = self.root / "postgres.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._as: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")  # created by Debian's postgresql package
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
            self._uid = (user.pw_uid, user.pw_gid)
        pwfile = self.root / "pw"
        pwfile.write_text(PASSWORD + "\n")
        self._own(pwfile)
        self.log.touch()
        self._own(self.log)
        subprocess.run(
            [
                *self._as,
                str(self.bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                USER,
                f"--pwfile={pwfile}",
                "--auth-host=scram-sha-256",
                "--auth-local=trust",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
        )
        self.start()

    def _own(self, path: Path) -> None:
        if self._as:
            os.chown(path, *self._uid)

    def url(self, db: str = "postgres", password: bool = True) -> str:
        auth = f"{USER}:{PASSWORD}" if password else USER
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        assert self.proc is None
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    *self._as,
                    str(self.bindir / "postgres"),
                    "-D",
                    str(self.data),
                    "-k",
                    str(self.root),
                    "-p",
                    str(self.port),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "fsync=off",  # a test server: the OS keeps what it wrote across a restart of postgres
                    "-c",
                    "max_connections=200",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(self.url(), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"postgres did not start: {self.log.read_text()[-2000:]}") from None
                time.sleep(0.05)

    def stop(self, immediate: bool = False) -> None:
        """Stop the server: a fast shutdown, or an immediate one (as a crash: recovery on the next start)."""
        if self.proc is None:
            return
        pid = int((self.data / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGQUIT if immediate else signal.SIGINT)
        self.proc.wait(30)
        self.proc = None

    def create_db(self) -> str:
        name = f"t{os.getpid()}_{next(_counter)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return name

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def pg_server() -> Iterator[PgServer]:
    server = PgServer()
    try:
        yield server
    finally:
        server.close()
