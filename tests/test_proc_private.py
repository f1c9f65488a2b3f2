"""A process that holds a secret cannot be read by another process of the same unix user.

The web service runs as the ETL's user: without this, a compromised web could read the
database logins and the IP hash key out of ``/proc/<pid>/mem`` or ``environ`` of the ETL,
the watchdog, the web's configuration writer or a legacy reader while they run.

Both sides run as uid 0 with no capability at all (``setpriv``), so that the kernel applies
the same checks as between two processes of the service user (the same uid, the same
capabilities), and the reader has no CAP_SYS_PTRACE to override them; a process that did not
ask is read by the same prober (the control).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from conftest import wait_for

CLI = str(Path(sys.executable).parent / "bioc-webstats")
NO_CAPS = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--ambient-caps=-all"]
SECRET = "s3cret-Login-pw"

PROBE = """
import sys
pid = sys.argv[1]
for name in ("environ", "mem"):
    try:
        with open(f"/proc/{pid}/{name}", "rb") as fh:
            fh.read(1) if name == "environ" else None
        print(name, "readable")
    except OSError as exc:
        print(name, type(exc).__name__)
"""


def _probe(pid: int) -> str:
    """What a capability-less process of the same uid can open of ``pid``."""
    out = subprocess.run(
        [*NO_CAPS, sys.executable, "-c", PROBE, str(pid)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WEBSTATS_", "AWS_"))}
    (tmp_path / "none.env").write_text("")
    env.update(
        WEBSTATS_ENV_FILE=str(tmp_path / "none.env"),
        WEBSTATS_STATE_DIR=str(tmp_path / "state"),
        **extra,
    )
    return env


def test_the_control_a_process_that_did_not_ask_is_readable(tmp_path):
    code = "import sys; sys.stdin.read()"
    assert (
        _probe_blocked([sys.executable, "-c", code], tmp_path) == "environ readable\nmem readable\n"
    )


def test_the_cli_holding_a_database_login_cannot_be_read(tmp_path):
    # A database that accepts and never answers holds the CLI inside its connect, its login
    # in memory (and, here, in its environment).
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        url = f"postgresql://webstats:{SECRET}@127.0.0.1:{port}/webstats"
        env = _env(tmp_path, WEBSTATS_DATABASE_URL=url)
        proc = subprocess.Popen(
            [*NO_CAPS, CLI, "db", "upgrade"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            server.settimeout(60)
            conn, _ = server.accept()
            with conn:
                assert _probe(proc.pid) == "environ PermissionError\nmem PermissionError\n"
        finally:
            proc.kill()
            proc.wait()


def test_a_legacy_reader_cannot_be_read_before_its_key_arrives(tmp_path):
    # The importing process starts its readers with exactly this command, then sends the key
    # through stdin: the reader waits for it there.
    reader = [sys.executable, "-m", "bioc_webstats.etl._reader_boot"]
    assert _probe_blocked(reader, tmp_path) == "environ PermissionError\nmem PermissionError\n"


def _probe_blocked(argv: list[str], tmp_path: Path) -> str:
    """The probe of ``argv`` (no capabilities) once it waits for its standard input."""
    proc = subprocess.Popen(
        [*NO_CAPS, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_env(tmp_path)
    )
    try:
        wait_for(lambda: _blocked_reading_stdin(proc.pid), timeout=60, what=argv[-1])
        return _probe(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def _blocked_reading_stdin(pid: int) -> bool:
    # /proc/<pid>/syscall: "0 0x0 …" is read(2) on fd 0 (x86-64 and arm64 number read 0 / 63)
    try:
        fields = Path(f"/proc/{pid}/syscall").read_text().split()
    except OSError:
        return False
    return len(fields) > 1 and fields[0] in ("0", "63") and fields[1] == "0x0"
