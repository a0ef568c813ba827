"""A throw-away PostgreSQL cluster for tests: Debian's binaries, ``initdb`` + ``pg_ctl`` in a temporary directory.

The server listens on 127.0.0.1 at a free port and trusts local connections (it holds nothing but test data).
PostgreSQL refuses to run as root: as root (CI), the cluster belongs to the ``postgres`` user that Debian's
package creates, and its commands run through ``runuser``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from dicom_node.peers.node_process import free_port

SUPERUSER = "cxr_lens_test"
OS_USER_AS_ROOT = "postgres"


def find_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` with initdb (Debian), else initdb's directory on PATH."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: _version(p.parent.parent.name))
    if found:
        return found[-1].parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


def _version(name: str) -> tuple[int, ...]:
    return tuple(int(p) for p in name.split(".") if p.isdigit())


def needs_postgres() -> pytest.MarkDecorator:
    """Skip unless PostgreSQL's server binaries are installed (scripts/test.sh installs Debian's postgresql)."""
    usable = find_bindir() is not None and (os.geteuid() != 0 or _os_user() is not None)
    return pytest.mark.skipif(not usable, reason="PostgreSQL server not installed (Debian package postgresql)")


def _os_user() -> str | None:
    """Who runs the server: the current user, or ``postgres`` when we are root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(OS_USER_AS_ROOT)
    except KeyError:
        return None
    return OS_USER_AS_ROOT


@dataclass
class PostgresCluster:
    """A running throw-away cluster; :meth:`database` makes an empty database and returns its URL."""

    bindir: Path
    datadir: Path
    port: int
    os_user: str | None

    @property
    def log(self) -> Path:
        return self.datadir / "server.log"

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def _run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        command: Sequence[str] = args if self.os_user is None else ("runuser", "-u", self.os_user, "--", *args)
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False, cwd="/")

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.datadir}"
        done = self._run(str(self.bindir / "pg_ctl"), "start", "-w", "-t", "60", "-D", str(self.datadir),
                         "-l", str(self.log), "-o", options)
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {done.stderr}\n{self.log_tail()}")

    def stop(self, mode: str = "fast") -> None:
        """``fast`` disconnects clients and shuts down cleanly; ``immediate`` is a crash (recovery at start)."""
        self._run(str(self.bindir / "pg_ctl"), "stop", "-w", "-m", mode, "-D", str(self.datadir))

    def database(self) -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.datadir.parent, ignore_errors=True)


def start_postgres() -> PostgresCluster:
    """initdb a cluster in a new temporary directory and start it on a free port."""
    bindir = find_bindir()
    if bindir is None:
        raise FileNotFoundError("PostgreSQL server binaries not found (Debian package postgresql)")
    os_user = _os_user()
    # Not under pytest's tmp_path: as root that is private to root, and the server runs as another user.
    root = Path(tempfile.mkdtemp(prefix="cxr-lens-pg-"))
    datadir = root / "data"
    datadir.mkdir(mode=0o700)
    if os_user is not None:
        entry = pwd.getpwnam(os_user)
        for path in (root, datadir):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    cluster = PostgresCluster(bindir, datadir, free_port(), os_user)
    done = cluster._run(str(bindir / "initdb"), "-D", str(datadir), "-U", SUPERUSER, "--auth=trust",
                        "--encoding=UTF8", "--locale=C", "--no-sync")
    if done.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"initdb failed: {done.stderr}")
    # Throw-away: no need to survive a power cut (fsync off); commits still reach the OS, so a killed server
    # (the outage test) loses none of them.
    with (datadir / "postgresql.conf").open("a") as conf:
        conf.write("fsync = off\nfull_page_writes = off\nmax_connections = 200\n")
    try:
        cluster.start()
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return cluster


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """One cluster for a test session (import this fixture into a test module); each test takes a database."""
    cluster = start_postgres()
    yield cluster
    cluster.remove()
