"""The front on the deployed host (molecule/default): nginx's configuration and unit, files sent
from the publish directory by nginx itself, what nginx may and may not read in the state
directory, headers, methods, its logs and their rotation.

Runs after test_deploy.py (the ETL has run). Expected values come from the repository (role
defaults, the wiring, the local inventory), never from the container.
"""

from __future__ import annotations

import email.utils
import re
import shlex
import time
from pathlib import Path

import pytest
import requests
from testlib import run_ok, wait_for

NGINX = "nginx.service"
SECURITY = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "strict-origin-when-cross-origin",
    "X-Frame-Options": "DENY",
}


def as_user(user: str, cmd: str) -> str:
    return f"runuser -u {user} -- sh -c {shlex.quote(cmd)}"


def has_line(host, path: str, text: str) -> bool:
    """Whether the file ``path`` holds ``text`` (a fixed string: URLs carry '?')."""
    return host.run(f"grep -qF -- {shlex.quote(text)} {shlex.quote(path)}").rc == 0


@pytest.fixture(scope="module")
def paths(deploy_vars) -> dict[str, str]:
    return {
        "state": deploy_vars["webstats_base_state_dir"],
        "publish": deploy_vars["webstats_base_publish_dir"],
        "logs": deploy_vars["webstats_base_log_dir"],
        "user": deploy_vars["webstats_base_user"],
        "web_user": deploy_vars["webstats_base_web_user"],
        "nginx": deploy_vars["webstats_nginx_user"],
        "nginx_group": deploy_vars["webstats_nginx_group"],
    }


def test_nginx_configuration_is_valid(host):
    res = host.run("nginx -t")
    assert res.rc == 0, res.stderr
    assert "syntax is ok" in res.stderr and "test is successful" in res.stderr


def test_nginx_enabled_active_and_part_of_the_target(host):
    svc = host.service(NGINX)
    assert svc.is_enabled and svc.is_running
    props = run_ok(host, f"systemctl show {NGINX} -p PartOf -p MemoryMax")
    assert "PartOf=bioc-webstats.target" in props
    assert re.search(r"MemoryMax=\d+", props) and "MemoryMax=infinity" not in props
    wants = run_ok(host, "systemctl show bioc-webstats.target -p Wants --value")
    assert NGINX in wants.split()


def test_only_our_site_is_enabled(host):
    enabled = run_ok(host, "ls -A /etc/nginx/sites-enabled").split()
    assert enabled == ["bioc-webstats"]
    site = host.file("/etc/nginx/sites-available/bioc-webstats")
    assert (site.user, site.group, site.mode) == ("root", "root", 0o644)
    assert site.contains("Managed by Ansible")
    assert not host.file("/etc/nginx/bioc-webstats-origin.conf").exists  # off by default


def test_nginx_reads_the_publish_directory_and_nothing_of_the_state(host, paths):
    state = host.file(paths["state"])
    assert (state.user, state.mode) == (paths["user"], 0o751)
    # its parent is root's: the service user cannot put a link in its place under the deploy
    parent = host.file(str(Path(paths["publish"]).parent))
    assert (parent.user, parent.mode & 0o022) == ("root", 0)
    assert not paths["publish"].startswith(paths["state"] + "/")
    site = host.file(paths["publish"])
    # 2770: the group bits are the ACL's mask; the group itself (nginx's) reads only
    assert (site.user, site.group, site.mode) == (paths["user"], paths["nginx_group"], 0o2770)
    acl = run_ok(host, f"getfacl --omit-header {paths['publish']}").split()
    for entry in ("group::r-x", "other::---", "default:group::r-x", "default:other::---"):
        assert entry in acl, (entry, acl)
    for user in (paths["user"], paths["web_user"]):
        assert f"user:{user}:rwx" in acl and f"default:user:{user}:rwx" in acl, acl
    nginx = paths["nginx"]
    assert host.run(as_user(nginx, f"test -w {paths['publish']}")).rc != 0
    # nginx cannot list the state directory, nor read anything in it outside the publish dir
    assert host.run(as_user(nginx, f"ls {paths['state']}")).rc != 0
    others = run_ok(
        host, f"find {paths['state']} -path {paths['publish']} -prune -o -type f -print"
    ).split()
    assert others, "nothing in the state directory to check"
    for path in others:
        assert host.run(as_user(nginx, f"test -r {path}")).rc != 0, f"{nginx} reads {path}"
    # nor the configuration, nor the app's logs
    for path in ("/etc/bioc-webstats/webstats.env", f"{paths['logs']}/access.log"):
        assert host.run(as_user(nginx, f"test -r {path}")).rc != 0, f"{nginx} reads {path}"
    assert host.run(as_user(nginx, f"ls {paths['publish']}")).rc == 0


@pytest.fixture
def probe(host, paths):
    """A file written into the live data version the way the app writes (as the service user,
    umask 0027 like the units), or into a version of its own when nothing is published yet.
    Yields its URL path; removed afterwards."""
    name = f"molecule-probe-{time.monotonic_ns()}.txt"
    publish = paths["publish"]
    made_current = host.run(f"test -e {publish}/current").rc != 0
    if made_current:
        run_ok(
            host,
            as_user(
                paths["user"],
                f"umask 0027 && mkdir {publish}/v-probe && ln -s v-probe {publish}/current",
            ),
        )
    target = f"{publish}/current/packages/stats/{name}"
    run_ok(
        host,
        as_user(
            paths["user"],
            f"umask 0027 && mkdir -p {publish}/current/packages/stats && "
            f"printf 'probe\\n' > {target}",
        ),
    )
    yield f"/packages/stats/{name}", target
    run_ok(host, f"rm -f {target}")
    if made_current:
        run_ok(host, f"rm -rf {publish}/current {publish}/v-probe")


def test_a_published_file_is_sent_by_nginx(host, service, paths, probe):
    url, target = probe
    f = host.file(target)
    assert f.group == paths["nginx_group"]  # the setgid directory's group
    assert f.mode & 0o007 == 0, oct(f.mode)  # the default ACL: nobody else
    assert host.run(as_user(paths["nginx"], f"test -r {target}")).rc == 0
    assert host.run(as_user(paths["nginx"], f"test -w {target}")).rc != 0
    marker = f"{url}?probe={time.monotonic_ns()}"
    r = service.get(marker)
    assert r.status_code == 200 and r.text == "probe\n"
    assert r.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert r.headers["Cache-Control"] == "public, max-age=3600"
    assert r.headers["ETag"] and r.headers["Last-Modified"]
    for name, value in SECURITY.items():
        assert r.headers[name] == value
    assert service.get(marker, headers={"If-None-Match": r.headers["ETag"]}).status_code == 304
    logs = paths["logs"]
    wait_for(
        lambda: has_line(host, f"{logs}/nginx-access.log", marker),
        30,
        "the request in nginx-access.log",
    )
    # gunicorn never saw it: a later request through gunicorn is logged, this one is not
    after = f"/healthz?after={time.monotonic_ns()}"
    assert service.get(after).status_code == 200
    wait_for(lambda: has_line(host, f"{logs}/access.log", after), 30, "access.log")
    assert not has_line(host, f"{logs}/access.log", marker)


def test_the_apps_published_files_come_from_disk(host, service, paths):
    """The ETL run (test_deploy.py) published its data version: nginx sends those files, with
    the version's validators, and gunicorn never sees the requests."""
    logs = paths["logs"]
    for url in (
        "/packages/stats/bioc/bioc_packages.txt",
        "/packages/stats/",
        "/packages/stats/main.css",
    ):
        rel = url.lstrip("/") + ("index.html" if url.endswith("/") else "")
        on_disk = host.file(f"{paths['publish']}/current/{rel}")
        assert on_disk.is_file, f"{url} not published"
        assert on_disk.group == paths["nginx_group"]
        marker = f"{url}?probe=published-{time.monotonic_ns()}"
        r = service.get(marker)
        assert r.status_code == 200 and r.content == on_disk.content, url
        assert r.headers["Cache-Control"] == "public, max-age=3600"
        published = email.utils.formatdate(on_disk.mtime.timestamp(), usegmt=True)
        assert r.headers["Last-Modified"] == published
        wait_for(lambda m=marker: has_line(host, f"{logs}/nginx-access.log", m), 30, "nginx's log")
        after = f"/healthz?after={time.monotonic_ns()}"
        assert service.get(after).status_code == 200
        wait_for(lambda a=after: has_line(host, f"{logs}/access.log", a), 30, "access.log")
        assert not has_line(host, f"{logs}/access.log", marker), f"{url} went to gunicorn"


@pytest.mark.parametrize(
    "path,status", [("/packages/stats", 301), ("/packages/stats/nosuch/", 404)]
)
def test_security_headers_on_proxied_answers(service, path, status):
    r = service.get(path)
    assert r.status_code == status
    for name, value in SECURITY.items():
        assert r.headers[name] == value, name
    assert "script-src 'self'" in r.headers["Content-Security-Policy"]


def test_other_methods_405_at_the_public_port(service):
    r = requests.post(service.base + "/healthz", timeout=10)
    assert r.status_code == 405 and r.headers["Allow"] == "GET, HEAD"


def test_nginx_logs_in_the_log_directory(host, paths):
    for name in ("nginx-access.log", "nginx-error.log"):
        f = host.file(f"{paths['logs']}/{name}")
        assert f.exists, name
        assert f.user == paths["nginx"] and f.mode == 0o640, (name, f.user, oct(f.mode))
    combined = re.compile(
        r'^\S+ - \S+ \[[^\]]+\] "[A-Z]+ \S+ HTTP/1\.[01]" \d{3} \d+ "[^"]*" "[^"]*"$'
    )
    lines = host.file(f"{paths['logs']}/nginx-access.log").content_string.splitlines()
    assert lines and all(combined.match(line) for line in lines[-20:]), lines[-3:]


def test_rotation_reopens_nginx_logs(host, service, paths):
    logs = paths["logs"]
    run_ok(host, "logrotate -f /etc/logrotate.d/bioc-webstats")
    marker = f"/healthz?probe=nginx-rotated-{time.monotonic_ns()}"
    wait_for(
        lambda: (
            service.get(marker).status_code == 200
            and has_line(host, f"{logs}/nginx-access.log", marker)
        ),
        30,
        "the request in the new nginx-access.log",
    )
    f = host.file(f"{logs}/nginx-access.log")
    assert f.user == paths["nginx"] and f.mode == 0o640
    rotated = run_ok(host, f"ls {logs}").split()
    assert any(n.startswith("nginx-access.log-") for n in rotated), rotated
