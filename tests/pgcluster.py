"""A throwaway PostgreSQL cluster for tests that reconfigure or restart a server: TLS with a
self-signed CA made here, password authentication, restarts.

PostgreSQL refuses to run as root: under root (as ``.ci/run`` runs) the cluster runs as the
``postgres`` user through ``runuser``; otherwise as the current user. It listens on a free
loopback port and a socket in its own directory, and is removed by :meth:`Cluster.remove`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

__all__ = ["PASSWORD_USER", "TLS_ONLY_USER", "Cluster", "why_unavailable"]

PASSWORD_USER = ("pw_user", "right-pw")
"""A role that must give its password (scram-sha-256)."""
TLS_ONLY_USER = "tls_only"
"""A role refused on connections without TLS."""

_HBA = f"""\
local all all trust
hostnossl all {TLS_ONLY_USER} all reject
host all {PASSWORD_USER[0]} all scram-sha-256
host all all all trust
"""


def _bindir() -> Path | None:
    pg_config = shutil.which("pg_config")
    candidates = []
    if pg_config is not None:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        candidates.append(Path(out.stdout.strip()))
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for path in candidates:
        if (path / "initdb").exists() and (path / "pg_ctl").exists():
            return path
    return None


def why_unavailable() -> str | None:
    """Why a throwaway cluster cannot be made here, or None."""
    if _bindir() is None:
        return "PostgreSQL's server programs (initdb, pg_ctl) are not installed"
    if shutil.which("openssl") is None:
        return "the openssl command is not installed (needed for the test certificates)"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser, and PostgreSQL refuses to run as root"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Cluster:
    """One throwaway cluster with TLS on, a CA and a server certificate for ``localhost``."""

    def __init__(self) -> None:
        bindir = _bindir()
        assert bindir is not None
        self.bindir = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="asyncorm-pg-"))
        self.data = self.dir / "data"
        self.port = _free_port()
        self.ca = self.dir / "ca.crt"
        self.as_root = os.geteuid() == 0
        self.started = False

    def url(
        self,
        user: str = "postgres",
        host: str = "127.0.0.1",
        query: str = "",
        database: str = "postgres",
    ) -> str:
        """A URL for ``user`` on ``database``, with ``query`` appended."""
        return f"postgresql://{user}@{host}:{self.port}/{database}{'?' + query if query else ''}"

    def _run(self, *args: str | Path) -> None:
        command = [str(arg) for arg in args]
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {done.stdout}{done.stderr}")

    def create(self) -> None:
        """initdb, the certificates, pg_hba.conf, start, and the test roles."""
        self._certificates()
        if self.as_root:
            shutil.chown(self.dir, "postgres")
            for path in self.dir.iterdir():
                shutil.chown(path, "postgres")
        self._run(self.bindir / "initdb", "-D", self.data, "-U", "postgres", "-A", "trust",
                  "-E", "UTF8", "--no-sync", "--no-instructions")  # fmt: skip
        (self.data / "pg_hba.conf").write_text(_HBA)
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                f"port = {self.port}\nlisten_addresses = 'localhost'\n"
                f"unix_socket_directories = '{self.dir}'\nfsync = off\n"
                f"shared_buffers = 16MB\nmax_connections = 120\nssl = on\n"
                f"ssl_cert_file = '{self.dir / 'server.crt'}'\n"
                f"ssl_key_file = '{self.dir / 'server.key'}'\n"
            )
        self.start()
        self.psql(
            f"CREATE ROLE {PASSWORD_USER[0]} LOGIN PASSWORD '{PASSWORD_USER[1]}'; "
            f"CREATE ROLE {TLS_ONLY_USER} LOGIN; GRANT ALL ON SCHEMA public TO PUBLIC"
        )

    def _certificates(self) -> None:
        """A CA, and a server certificate it signed for the name ``localhost`` only."""
        d = self.dir

        def openssl(*args: str | Path) -> None:
            subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)

        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                "/CN=asyncorm test CA", "-keyout", d / "ca.key", "-out", self.ca)  # fmt: skip
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
                "-keyout", d / "server.key", "-out", d / "server.csr")  # fmt: skip
        (d / "san.ext").write_text("subjectAltName = DNS:localhost\n")
        openssl("x509", "-req", "-in", d / "server.csr", "-CA", self.ca, "-CAkey",
                d / "ca.key", "-CAcreateserial", "-days", "2", "-extfile", d / "san.ext",
                "-out", d / "server.crt")  # fmt: skip
        (d / "server.key").chmod(0o600)

    def psql(self, sql: str) -> None:
        self._run(self.bindir / "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", self.dir,
                  "-p", str(self.port), "-U", "postgres", "-d", "postgres", "-c", sql)  # fmt: skip

    def start(self) -> None:
        self._run(self.bindir / "pg_ctl", "-D", self.data, "-l", self.dir / "log", "-w",
                  "-t", "60", "start")  # fmt: skip
        self.started = True

    def stop(self, mode: str = "fast") -> None:
        self._run(self.bindir / "pg_ctl", "-D", self.data, "-m", mode, "-w", "stop")
        self.started = False

    def restart(self) -> None:
        self._run(self.bindir / "pg_ctl", "-D", self.data, "-l", self.dir / "log", "-m",
                  "fast", "-w", "-t", "60", "restart")  # fmt: skip
        self.started = True

    def remove(self) -> None:
        """Stop the server (if it runs) and delete everything."""
        try:
            if self.started:
                self.stop("immediate")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
