"""Helpers for the testinfra tests of every molecule scenario (molecule/<name>/tests/).

The tests run on the controller; ``host`` (testinfra, podman connection) runs commands inside the
systemd container; HTTP goes from the controller to the container's address, as a client would.
Expected values come from the repository (role defaults, inventory, the runbook), never from the
container itself, so a wrong deploy cannot agree with itself.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

REPO = Path(__file__).resolve().parent.parent
RUNBOOK = REPO / "docs" / "RUNBOOK.md"


def wait_for(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    """Poll ``pred`` until it returns a truthy value; fail with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = pred()
        except Exception as exc:  # the condition may raise until it becomes true
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")
        time.sleep(interval)


def repo_version() -> str:
    """The package version in the working tree (what the deploy ships)."""
    text = (REPO / "src" / "bioc_webstats" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


def inventory_vars(inventory: str = "local") -> dict[str, Any]:
    """What the playbooks deploy with: every role's defaults, ``inventory/<inventory>/group_vars``
    on top (all, then the rest), the playbooks' wiring (playbooks/vars/wiring.yml), templated
    values resolved (tests/ansible_render.py); values only a host or a lookup gives stay raw."""
    sys.path.insert(0, str(REPO / "tests"))
    import ansible_render

    merged: dict[str, Any] = {}
    gv = REPO / "inventory" / inventory / "group_vars"
    files = sorted(gv.glob("all.y*ml")) + sorted(gv.glob("all/*.y*ml"))
    files += [p for p in sorted(gv.rglob("*.y*ml")) if p not in files]
    for path in files:
        merged.update(yaml.safe_load(path.read_text()) or {})
    return ansible_render.deploy_vars(**merged)


def runbook_commands() -> list[str]:
    """Every command line of the runbook: its indented and fenced code blocks, comments cut."""
    text = RUNBOOK.read_text()
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", text, re.M | re.S)
    blocks += re.findall(r"(?:^\n)((?:^    .*\n)+)", text, re.M)
    commands: list[str] = []
    for block in blocks:
        for raw in block.splitlines():
            line = re.sub(r"\s{2,}#.*$", "", raw.strip())  # a trailing "   # comment"
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def container_name(host) -> str:
    """The podman container behind a testinfra host."""
    return host.backend.name


def container_address(name: str) -> str:
    """The address the controller reaches the container on (loopback with network: host)."""
    mode = subprocess.run(
        ["podman", "inspect", "-f", "{{.HostConfig.NetworkMode}}", name],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if mode == "host":
        return "127.0.0.1"
    out = subprocess.run(
        ["podman", "inspect", "-f", "{{json .NetworkSettings.Networks}}", name],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return next(n["IPAddress"] for n in json.loads(out).values() if n.get("IPAddress"))


class Service:
    """HTTP access to the deployed service from the controller."""

    def __init__(self, base: str) -> None:
        self.base = base.rstrip("/")
        self.session = requests.Session()

    def get(self, path: str, **kw: Any) -> requests.Response:
        """GET ``path`` (relative to the service root); short timeout, no retries."""
        kw.setdefault("timeout", 10)
        kw.setdefault("allow_redirects", False)
        return self.session.get(self.base + path, **kw)

    def healthz(self) -> dict[str, Any] | None:
        """The /healthz document when it answers 200, else None."""
        try:
            r = self.get("/healthz", timeout=5)
        except requests.RequestException:
            return None
        return r.json() if r.status_code == 200 else None


@pytest.fixture(scope="module")
def deploy_vars() -> dict[str, Any]:
    """Role defaults + the local inventory's group_vars + the wiring (what the scenarios deploy
    with)."""
    return inventory_vars("local")


@pytest.fixture(scope="module")
def service(host, deploy_vars) -> Service:
    """The deployed service as the controller reaches it: nginx, at the public port."""
    port = int(deploy_vars["webstats_nginx_port"])
    return Service(f"http://{container_address(container_name(host))}:{port}")


class Runbook:
    """The commands of docs/RUNBOOK.md, so a test runs exactly what SysOps are told to run."""

    def __init__(self) -> None:
        self.commands = runbook_commands()

    def __call__(self, cmd: str, fill: dict[str, str] | None = None) -> str:
        """``cmd`` after checking it is in the runbook verbatim; placeholders
        (``<object-key> …``) replaced by ``fill``; ``-i inventory/production`` or
        ``-i inventory/local`` (a playbook run from the workstation) pointed at the scenario's
        inventory."""
        assert cmd in self.commands, f"not in docs/RUNBOOK.md: {cmd!r}"
        for placeholder, value in (fill or {}).items():
            cmd = cmd.replace(placeholder, value)
        if cmd.startswith("ansible-playbook "):
            inventory = Path(os.environ["MOLECULE_INVENTORY_FILE"]).parent
            cmd = re.sub(r"-i inventory/(production|local)\b", f"-i {inventory}", cmd)
        return cmd


@pytest.fixture(scope="module")
def runbook() -> Runbook:
    """``runbook(cmd)``: ``cmd`` checked against docs/RUNBOOK.md, ready to run."""
    return Runbook()


def run_playbook(cmd: str, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    """Run an ``ansible-playbook`` command line on the controller from the repository root,
    with molecule's Ansible environment (its ansible.cfg, the scenario inventory)."""
    return subprocess.run(
        ["timeout", str(timeout), *shlex.split(cmd)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_NOCOLOR": "1"},
    )


def run_ok(host, cmd: str, timeout: int = 300) -> str:
    """Run ``cmd`` in the container (bounded by ``timeout``); fail on a non-zero exit."""
    res = host.run(f"timeout {timeout} sh -c {shlex.quote(cmd)}")
    assert res.rc == 0, f"{cmd!r} exited {res.rc}: {res.stdout[-2000:]}{res.stderr[-2000:]}"
    return res.stdout


def ephemeral_dir() -> Path:
    """The scenario's molecule ephemeral directory (holds generated logs and truth)."""
    return Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"])


class Load:
    """Continuous requests to the service from a few threads, each on a new connection (as
    independent clients would), until ``stop()`` or ``limit`` seconds, each thread pausing
    ``pace`` seconds between requests so the load does not starve the deploy of CPU on a
    2-core machine. Counts failures: any
    connection error, timeout or status other than 200, with the first few kept for the report.
    Bounded: one target address, ``threads`` concurrent requests, ``limit`` seconds at most.
    """

    def __init__(
        self,
        base: str,
        paths: list[str],
        threads: int = 3,
        limit: float = 900,
        pace: float = 0.2,
    ) -> None:
        self.base = base.rstrip("/")
        self.paths = paths
        self.limit = limit
        self.pace = pace  # seconds between two requests of a thread: steady, not a stress test
        self.ok = 0
        self.failed = 0
        self.errors: list[str] = []
        self.versions: list[str] = []  # /healthz versions, in order of change
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> Load:
        self.started = time.monotonic()
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop and wait for the threads (each finishes its request in flight)."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set() and time.monotonic() - self.started < self.limit:
            path = self.paths[i % len(self.paths)]
            i += 1
            try:
                r = requests.get(
                    self.base + path,
                    timeout=30,
                    allow_redirects=False,
                    headers={"Connection": "close"},
                )
                good = r.status_code == 200
                what = f"{path}: HTTP {r.status_code}"
                version = r.json().get("version") if good and path == "/healthz" else None
            except requests.RequestException as exc:
                good, what, version = False, f"{path}: {type(exc).__name__}: {exc}", None
            self._stop.wait(self.pace)
            with self._lock:
                if good:
                    self.ok += 1
                    if version and (not self.versions or self.versions[-1] != version):
                        self.versions.append(version)
                else:
                    self.failed += 1
                    if len(self.errors) < 10:
                        self.errors.append(what)
