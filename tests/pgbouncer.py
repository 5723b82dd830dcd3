"""A real pgbouncer in transaction pooling mode, in front of the test PostgreSQL server.

It listens on a free loopback port with a configuration written in a directory of its own:
``pool_mode = transaction``, trust authentication (the user must be in its ``auth_file``),
``default_pool_size`` server connections per database and user (5: fewer than the clients the
tests open, so that clients share server connections). pgbouncer refuses to run as root:
under root (as ``.ci/run`` runs) it is started with its own ``-u postgres``, so the process
the tests stop is pgbouncer itself. Removed by :meth:`Bouncer.stop`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from sqlalchemy.engine import make_url

__all__ = ["POOL_SIZE", "Bouncer", "binary"]

POOL_SIZE = 5
"""Server connections pgbouncer keeps per database and user."""


def binary() -> str | None:
    """The pgbouncer program (Debian installs it in /usr/sbin), or None."""
    found = shutil.which("pgbouncer")
    if found is None and os.path.exists("/usr/sbin/pgbouncer"):
        found = "/usr/sbin/pgbouncer"
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Bouncer:
    """One pgbouncer in front of the server of ``server_url``."""

    def __init__(self, server_url: str) -> None:
        self.server = make_url(server_url)
        self.dir = Path(tempfile.mkdtemp(prefix="asyncorm-pgbouncer-"))
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, query: str = "") -> str:
        """The server URL with pgbouncer's port instead of the server's."""
        url = self.server.set(port=self.port).render_as_string(hide_password=False)
        return f"{url}{'?' + query if query else ''}"

    def start(self) -> None:
        program = binary()
        assert program is not None
        user = self.server.username or "postgres"
        config = self.dir / "pgbouncer.ini"
        config.write_text(
            f"[databases]\n* = host={self.server.host or '127.0.0.1'} "
            f"port={self.server.port or 5432}\n"
            f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {self.port}\n"
            f"unix_socket_dir =\nauth_type = trust\nauth_file = {self.dir / 'users.txt'}\n"
            f"pool_mode = transaction\ndefault_pool_size = {POOL_SIZE}\n"
            f"max_client_conn = 1000\nadmin_users = {user}\n"
            f"logfile = {self.dir / 'pgbouncer.log'}\npidfile = {self.dir / 'pgbouncer.pid'}\n"
        )
        (self.dir / "users.txt").write_text(f'"{user}" ""\n')
        command = [program, str(config)]
        if os.geteuid() == 0:
            for path in (self.dir, *self.dir.iterdir()):
                shutil.chown(path, "postgres")
            command = [program, "-u", "postgres", str(config)]
        with open(self.dir / "stderr", "wb") as err:
            self.process = subprocess.Popen(command, stdout=err, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:  # until it accepts connections, or exits
            if self.process.poll() is not None:
                raise RuntimeError(f"pgbouncer exited: {self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"pgbouncer did not listen: {self.log()}") from None
                time.sleep(0.05)

    def restart(self) -> None:
        """Stop pgbouncer, which closes every client connection, and start it again."""
        assert self.process is not None
        self.process.terminate()
        self.process.wait(timeout=10)
        self.start()

    def log(self) -> str:
        return "".join(
            path.read_text(errors="replace")
            for path in (self.dir / "stderr", self.dir / "pgbouncer.log")
            if path.exists()
        )

    def stop(self) -> None:
        """Stop pgbouncer (if it runs) and delete its directory."""
        try:
            if self.process is not None and self.process.poll() is None:
                self.process.terminate()
                self.process.wait(timeout=10)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
