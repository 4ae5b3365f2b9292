"""A throwaway PostgreSQL cluster that the chaos test owns, so that it can restart it.

``initdb`` refuses to run as root, so every server command runs as the ``postgres``
user (through ``runuser`` when the test runs as root).  The cluster lives in a
temporary directory of its own (not pytest's ``tmp_path``: its parents are private
to root, and the server must reach its data directory), which ``destroy`` removes.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

SERVER_USER = "postgres"
BIN_ENV = "FAILOVER_TEST_POSTGRES_BIN"

# Only processes are killed here, never the machine: the WAL still reaches the OS before
# a commit returns (synchronous_commit stays on), so an immediate stop loses no
# acknowledged commit, and skipping fsync only spares the shared disk.
SETTINGS = """
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{sockets}'
max_connections = 200
shared_buffers = 32MB
fsync = off
full_page_writes = off
synchronous_commit = on
log_min_messages = warning
log_min_error_statement = panic
"""


def find_bindir() -> Path | None:
    """``$FAILOVER_TEST_POSTGRES_BIN``, else the newest /usr/lib/postgresql/*/bin."""
    configured = os.environ.get(BIN_ENV)
    candidates = [configured] if configured else sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
        if Path(p).parent.name.isdigit() else 0, reverse=True)
    for candidate in candidates:
        if candidate and (Path(candidate) / "initdb").is_file():
            return Path(candidate)
    return None


def unavailable_reason() -> str | None:
    """Why this machine cannot run a cluster of its own, or ``None`` if it can."""
    if find_bindir() is None:
        return f"no PostgreSQL initdb (looked in ${BIN_ENV} and /usr/lib/postgresql/*/bin)"
    try:
        pwd.getpwnam(SERVER_USER)
    except KeyError:
        return f"no {SERVER_USER!r} user to run the server as"
    if os.geteuid() != 0 and pwd.getpwuid(os.geteuid()).pw_name != SERVER_USER:
        return f"must run as root or as {SERVER_USER!r} to start a cluster"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "runuser is missing (needed to run the server as postgres)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """One PostgreSQL cluster in a temporary directory, on its own port."""

    def __init__(self, bindir: Path | None = None, port: int | None = None) -> None:
        found = bindir or find_bindir()
        if found is None:
            raise RuntimeError(unavailable_reason() or "no PostgreSQL binaries")
        self.bindir = found
        self.port = port or free_port()
        self.root = Path(tempfile.mkdtemp(prefix="failover-chaos-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sock"
        self.log = self.root / "postgres.log"
        self.running = False
        self.restarts = 0

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        command = [str(self.bindir / argv[0]), *argv[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", SERVER_USER, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              cwd=self.root, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:1])} failed ({done.returncode}):"
                               f" {done.stdout}{done.stderr}{self._log_tail()}")
        return done

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n--- postgres.log ---\n" + self.log.read_text()[-2000:]
        return ""

    def init(self) -> None:
        """``initdb`` as postgres, with trust authentication on localhost only."""
        user = pwd.getpwnam(SERVER_USER)
        self.sockets.mkdir()
        if os.geteuid() == 0:
            for path in (self.root, self.sockets):
                os.chown(path, user.pw_uid, user.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust",
                  "-E", "UTF8", "--no-sync", "--no-instructions")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(SETTINGS.format(port=self.port, sockets=self.sockets))

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-t", "60", "-w",
                  "start")
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """``fast``: sessions are ended, a clean shutdown; ``immediate``: the server
        quits at once and recovers from its WAL on the next start, as after a crash."""
        self.running = False
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-t", "60", "-w", "stop")

    def restart(self, mode: str = "fast", down_s: float = 0.0) -> None:
        import time

        self.stop(mode)
        if down_s > 0:
            time.sleep(down_s)
        self.start()
        self.restarts += 1

    def destroy(self) -> None:
        """Stop the server whatever its state, and remove every file of the cluster."""
        try:
            if (self.data / "postmaster.pid").exists():
                with contextlib.suppress(Exception):
                    self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop",
                              timeout=60)
        finally:
            self.running = False
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()
