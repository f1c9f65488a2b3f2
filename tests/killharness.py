"""The SIGKILL harness of the exactly-once tests (``test_ingest_kill.py``,
``test_legacy_kill.py``): run a CLI command until it blocks at a pause point, kill it, check
that what it committed is whole, run it again. Also the /proc process-tree walk
(``bench/bench_etl.py`` samples memory with it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from sqlalchemy import ColumnElement, func, select

import loggen
from bioc_webstats.store import db
from bioc_webstats.store.models import DownloadRecord, IngestedObject
from conftest import wait_for

EXE = str(Path(sys.executable).parent / "bioc-webstats")


def cli_env(db_url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WEBSTATS_", "AWS_"))}
    env.update(
        WEBSTATS_DATABASE_URL=db_url,
        WEBSTATS_STATE_DIR=str(tmp_path / "state"),
        WEBSTATS_ENV_FILE="/dev/null",
        WEBSTATS_IP_HASH_KEY="test-key",
        **extra,
    )
    return env


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([EXE, *args], env=env, capture_output=True, text=True, timeout=120)


def prepared(db_url: str, tmp_path: Path) -> dict[str, str]:
    """The CLI's environment, with the sample packages loaded."""
    env = cli_env(db_url, tmp_path)
    done = run_cli(["packages", "load", str(loggen.PACKAGES_SAMPLE)], env)
    assert done.returncode == 0, done.stderr
    return env


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc; ``pid`` itself not included)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def kill_at(
    point: str, args: list[str], env: dict[str, str], tmp_path: Path, readers_exit: bool = False
) -> None:
    """Start the command, wait until it blocks at ``point``, SIGKILL it; with
    ``readers_exit``, the processes it started must go with it."""
    marker = tmp_path / f"paused-{point.replace(':', '-')}"
    env = {**env, "WEBSTATS_TEST_PAUSE_AT": point, "WEBSTATS_TEST_PAUSE_FILE": str(marker)}
    proc = subprocess.Popen(
        [EXE, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for(lambda: marker.exists() or proc.poll() is not None, 60, what=f"pause at {point}")
        assert proc.poll() is None, f"exited before {point}: {proc.communicate()[1]}"
        assert marker.read_text() == point.split(":")[0]
        family = descendants(proc.pid) if readers_exit else set()
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        if readers_exit:
            wait_for(lambda: not any(alive(p) for p in family), 30, what="readers to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL


def assert_whole(url: str, *where: ColumnElement[bool]) -> None:
    """Whatever was committed is whole: the records of every ledger row (those ``where``
    selects) add up to its accepted downloads."""
    with db.session_factory(url)() as s:
        for obj_id, accepted in s.execute(
            select(IngestedObject.id, IngestedObject.accepted).where(*where)
        ):
            got = s.scalar(
                select(func.coalesce(func.sum(DownloadRecord.downloads), 0)).where(
                    DownloadRecord.object_id == obj_id
                )
            )
            assert got == accepted
