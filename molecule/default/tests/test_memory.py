"""Memory use of each service against its ceiling (MemoryMax=, docs/RUNBOOK.md "Memory").

The container cannot enforce MemoryMax= (no memory controller is delegated to it), so the use is
measured from /proc: the summed PSS of every process of the unit (found by its cgroup), sampled
every 50 ms while it runs, by the unit's own user (root may not read another user's smaps
here; nginx's workers count with their RSS, an upper bound). The figures go to
.cache/memory-default.json (the runbook's "measured peak" column); each must stay under its
ceiling.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from testlib import REPO, run_ok

# Runs in the container: the peak summed PSS (KiB) of a unit's processes while it is active,
# or now (once) with --now; a process belongs to the unit by its name=systemd cgroup.
SAMPLER = r"""
import sys, time, os
unit, once = sys.argv[1], "--now" in sys.argv
def in_unit(pid):
    try:
        for line in open(f"/proc/{pid}/cgroup"):
            _, controller, path = line.rstrip("\n").split(":", 2)
            if controller == "name=systemd":
                return path.endswith("/" + unit) or ("/" + unit + "/") in path
    except OSError:
        pass
    return False
def pss():
    total = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if pid != str(os.getpid()) and in_unit(pid):
            try:  # PSS where readable (the sampler's own user), else RSS (an upper bound)
                for line in open(f"/proc/{pid}/smaps_rollup"):
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
            except OSError:
                try:
                    for line in open(f"/proc/{pid}/status"):
                        if line.startswith("VmRSS:"):
                            total += int(line.split()[1])
                except OSError:
                    pass
    return total
ready = sys.argv[sys.argv.index("--ready") + 1] if "--ready" in sys.argv else None
peak, seen, deadline = 0, False, time.monotonic() + 600
while time.monotonic() < deadline:
    now = pss()
    peak = max(peak, now)
    if ready:  # sampling: the unit may start now
        open(ready, "w").close()
        ready = None
    seen = seen or now > 0
    if once or (seen and now == 0):
        break
    time.sleep(0.05)
print(peak)
"""

CEILINGS = {
    "bioc-webstats.service": "webstats_services_web_memory_max",
    "bioc-webstats-etl.service": "webstats_services_etl_memory_max",
    "nginx.service": "webstats_nginx_memory_max",
    "bioc-webstats-watchdog.service": "webstats_services_watchdog_memory_max",
    "bioc-webstats-web-config.service": "webstats_services_web_config_memory_max",
}
MEASURED: dict[str, float] = {}


def mib(value: str) -> float:
    n, unit = re.fullmatch(r"(\d+)([KMG])", value).groups()
    return int(n) * {"K": 1 / 1024, "M": 1, "G": 1024}[unit]


def sample(host, unit: str, start: str | None = None, now: bool = False) -> float:
    """Peak PSS (MiB) of ``unit``: now, or while it runs after ``start`` (a command)."""
    script = "/run/measure-memory.py"
    host.run(f"cat > {script} <<'EOF'\n{SAMPLER}\nEOF\nchmod 0644 {script}")
    user = "root" if unit == "nginx.service" else "webstats"
    py = f"runuser -u {user} -- python3 {script} {unit}"
    if start:
        out_file, ready = f"/tmp/measure-{unit}.out", f"/tmp/measure-{unit}.ready"
        # the unit starts once the sampler samples (else its peak could pass unseen)
        run_ok(host, f"rm -f {out_file} {ready}; ({py} --ready {ready} > {out_file} &); "
                     f"for i in $(seq 300); do [ -e {ready} ] && break; sleep 0.1; done; "
                     f"test -e {ready} && {start}", timeout=600)  # fmt: skip
        out = run_ok(host, f"for i in $(seq 100); do [ -s {out_file} ] && break; "
                           f"sleep 0.1; done; cat {out_file}")  # fmt: skip
    else:
        out = run_ok(host, f"{py} {'--now' if now else ''}")
    return int(out.strip()) / 1024


@pytest.mark.parametrize(
    ("unit", "how"),
    [
        ("bioc-webstats.service", "now"),
        ("nginx.service", "now"),
        ("bioc-webstats-etl.service", "systemctl start bioc-webstats-etl.service"),
        ("bioc-webstats-watchdog.service", "systemctl start bioc-webstats-watchdog.service"),
        ("bioc-webstats-web-config.service", "systemctl start bioc-webstats-web-config.service"),
    ],
)
def test_memory_use_under_the_ceiling(host, deploy_vars, unit, how):
    peak = sample(host, unit, now=True) if how == "now" else sample(host, unit, start=how)
    # (nginx's master and two workers of 2048 connections: 4.7 MiB on Debian 12)
    assert peak > 2, f"{unit}: nothing measured ({peak:.1f} MiB)"
    ceiling = mib(deploy_vars[CEILINGS[unit]])
    MEASURED[unit] = round(peak, 1)
    report = Path(REPO / ".cache" / "memory-default.json")
    report.parent.mkdir(exist_ok=True)
    report.write_text(json.dumps(MEASURED, indent=1) + "\n")
    assert peak < ceiling, f"{unit}: {peak:.0f} MiB over its ceiling of {ceiling:.0f} MiB"
