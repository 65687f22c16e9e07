"""A throwaway PostgreSQL server for tests, and a ``db_url`` fixture over SQLite and it.

``postgres_server`` (session scope) runs ``initdb`` into a fresh temporary directory and
starts the server with ``pg_ctl`` on a free loopback port (TCP only, trust auth, fsync
off: the data is thrown away). PostgreSQL refuses to run as root, so under root every
server command runs as the ``postgres`` system user (``runuser``, else ``setpriv``) in a
directory that user owns. The binaries are found at run time: ``pg_config --bindir``,
then Debian's versioned directories, then PATH.

A machine without the PostgreSQL server makes these tests FAIL, naming the package to
install: CI installs it, and a suite that skips would pass without ever testing it.

Test modules use the fixtures with ``pytest_plugins = ("tests.postgres",)``.
"""

from __future__ import annotations

import itertools
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.mqtt_broker import free_port

INSTALL_HINT = "install the Debian package `postgresql` (.ci/run does)"
SERVER_PROGRAMS = ("initdb", "pg_ctl", "postgres")
SYSTEM_USER = "postgres"
START_TIMEOUT_S = 30
_DEBIAN_BINDIRS = Path("/usr/lib/postgresql")


def find_bindir(debian_root: Path = _DEBIAN_BINDIRS, path: str | None = None) -> Path:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``.

    Args:
        debian_root: where Debian installs each major version (``<root>/15/bin``).
        path: the program search path (default: $PATH).

    Raises:
        FileNotFoundError: no PostgreSQL server installation (the message says what to
            install).
    """
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config", path=path)
    if pg_config is not None:
        found = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False
        ).stdout.strip()
        if found:
            candidates.append(Path(found))
    if debian_root.is_dir():
        versions = [p / "bin" for p in debian_root.iterdir() if p.name.isdigit()]
        candidates += sorted(versions, key=lambda p: int(p.parent.name), reverse=True)
    initdb = shutil.which("initdb", path=path)
    if initdb is not None:
        candidates.append(Path(initdb).parent)
    for bindir in candidates:
        if all(os.access(bindir / name, os.X_OK) for name in SERVER_PROGRAMS):
            return bindir
    looked = ", ".join(str(c) for c in candidates) or "nowhere (no pg_config, no initdb)"
    raise FileNotFoundError(
        f"PostgreSQL server programs {', '.join(SERVER_PROGRAMS)} not found (looked in "
        f"{looked}): {INSTALL_HINT}"
    )


def _as_server_user() -> list[str]:
    """The command prefix that runs a program as the postgres user when we are root."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(SYSTEM_USER)
    except KeyError as e:
        raise FileNotFoundError(
            f"running as root, and PostgreSQL refuses root: no {SYSTEM_USER!r} system user "
            f"to run it as; {INSTALL_HINT}"
        ) from e
    runuser = shutil.which("runuser")
    if runuser is not None:
        return [runuser, "-u", SYSTEM_USER, "--"]
    setpriv = shutil.which("setpriv")
    if setpriv is not None:
        return [setpriv, f"--reuid={SYSTEM_USER}", f"--regid={SYSTEM_USER}", "--init-groups"]
    raise FileNotFoundError("running as root, and neither runuser nor setpriv is installed")


class PostgresServer:
    """One PostgreSQL server in ``root`` on 127.0.0.1:``port``, superuser ``postgres``.

    Args:
        bindir: where ``initdb``, ``pg_ctl`` and ``postgres`` are.
        root: an empty directory the server may own (data and log go inside).
    """

    def __init__(self, bindir: Path, root: Path, port: int) -> None:
        self.bindir = bindir
        self.root = root
        self.port = port
        self.data = root / "data"
        self.log = root / "server.log"
        self._prefix = _as_server_user()
        self._names = itertools.count(1)

    def start(self) -> None:
        """initdb and start; returns once the server accepts connections.

        Raises:
            RuntimeError: initdb or the server failed (the message has its output).
        """
        if self._prefix:
            user = pwd.getpwnam(SYSTEM_USER)
            os.chown(self.root, user.pw_uid, user.pw_gid)
        self._run(
            "initdb",
            ["-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-locale"],
            ["-E", "UTF8", "--no-sync"],
        )
        with (self.data / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write(
                "listen_addresses = '127.0.0.1'\n"
                f"port = {self.port}\n"
                "unix_socket_directories = ''\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
            )
        self._run(
            "pg_ctl",
            ["-D", str(self.data), "-l", str(self.log), "-w", "-t", str(START_TIMEOUT_S)],
            ["start"],
        )

    def stop(self) -> None:
        """Stop the server (fast shutdown) if its data directory exists."""
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", ["-D", str(self.data), "-m", "fast", "-w"], ["stop"])

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; returns its name."""
        name = f"test_{next(self._names)}"
        with self._admin() as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        """Drop ``name``, closing what is still connected to it."""
        if not re.fullmatch(r"test_\d+", name):
            raise ValueError(f"not a test database: {name!r}")
        with self._admin() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def _admin(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(
            host="127.0.0.1", port=self.port, user="postgres", dbname="postgres", autocommit=True
        )

    def _run(self, program: str, args: list[str], tail: list[str]) -> None:
        command = [*self._prefix, str(self.bindir / program), *args, *tail]
        # cwd: the postgres user may not be allowed into the directory the tests run in.
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            check=False,
            timeout=START_TIMEOUT_S * 2,
            cwd=self.root,
        )
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(
                f"{' '.join(command)} exited with {done.returncode}:\n{done.stdout}"
                f"{done.stderr}{log}"
            )


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the whole session; fails (never skips) without one."""
    try:
        bindir = find_bindir()
        _as_server_user()
    except FileNotFoundError as e:
        pytest.fail(str(e), pytrace=False)
    root = Path(tempfile.mkdtemp(prefix="edgefleet-pg-"))
    server = PostgresServer(bindir, root, free_port())
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """The URL of a fresh, empty database on the session's server, dropped afterwards."""
    name = postgres_server.create_database()
    yield postgres_server.url(name)
    postgres_server.drop_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database: a SQLite file, then a PostgreSQL database (one test each)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fleet.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url
