"""A real PostgreSQL for tests: the session-scoped ``postgres`` fixture (registered in conftest).

Debian's server binaries (package ``postgresql``, installed by ``make test-deps``; the newest
``/usr/lib/postgresql/N/bin``) run a cluster made by ``initdb`` in a temporary folder: a free
loopback port, the unix socket in that folder, password (SCRAM) authentication over TCP. As
root the cluster belongs to, and the server runs as, the ``postgres`` user (PostgreSQL
refuses to run as root). Every test gets a database of its own (``postgres.database()``);
the cluster is stopped and its folder removed at the end of the session.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

from tests.conftest import free_port

SUPERUSER = "postgres"
PASSWORD = "s3cret-ledger-pw"  # a test cluster's; asserted absent from logs and output


def server_bindir() -> Path | None:
    """The newest installed PostgreSQL server's bin folder, or None."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    return found[-1].parent if found else None


@dataclass
class Postgres:
    bindir: Path
    folder: Path
    port: int
    run_as: str | None  # the user the server runs as (None: this user)
    _names: Iterator[int] = field(default_factory=itertools.count)

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def log(self) -> Path:
        return self.folder / "server.log"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}:{PASSWORD}@127.0.0.1:{self.port}/{database}"

    def _pg_ctl(self, *args: str) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1"
        subprocess.run(
            [
                str(self.bindir / "pg_ctl"),
                *args,
                "-D",
                str(self.data),
                "-l",
                str(self.log),
                "-o",
                options,
                "-w",
                "-t",
                "60",
            ],
            check=True,
            user=self.run_as,
            capture_output=True,
            timeout=90,
        )

    def start(self) -> None:
        self._pg_ctl("start")

    def stop(self) -> None:
        self._pg_ctl("stop", "-m", "fast")

    def restart(self) -> None:
        """Stop (fast: every connection is closed by the server) and start again."""
        self._pg_ctl("restart", "-m", "fast")

    def database(self) -> str:
        """A new, empty database; its URL."""
        name = f"ledger_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def start_postgres() -> Postgres:
    bindir = server_bindir()
    if bindir is None:
        pytest.skip(
            "PostgreSQL server binaries absent (/usr/lib/postgresql/*/bin/initdb): "
            "run `make test-deps` (Debian package postgresql)"
        )
    folder = Path(tempfile.mkdtemp(prefix="gateway-pg-"))
    run_as = None
    if os.geteuid() == 0:
        run_as = "postgres"
        entry = pwd.getpwnam(run_as)
        os.chown(folder, entry.pw_uid, entry.pw_gid)
    pwfile = folder / "pw"
    pwfile.write_text(PASSWORD + "\n")
    if run_as is not None:
        os.chown(pwfile, pwd.getpwnam(run_as).pw_uid, -1)
    subprocess.run(
        [
            str(bindir / "initdb"),
            "-D",
            str(folder / "data"),
            "-U",
            SUPERUSER,
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            f"--pwfile={pwfile}",
            "-E",
            "UTF8",
            "--no-locale",
        ],
        check=True,
        user=run_as,
        capture_output=True,
        timeout=120,
    )
    pwfile.unlink()
    server = Postgres(bindir, folder, free_port(), run_as)
    server.start()
    return server


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    server = start_postgres()
    try:
        yield server
    finally:
        try:
            server.stop()
        finally:
            shutil.rmtree(server.folder, ignore_errors=True)
