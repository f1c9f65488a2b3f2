"""make bench-web: gunicorn (the shipped config, 4 workers, real PostgreSQL) vs nginx serving
the same bytes as static files, on loopback, driven by wrk. Prints req/s, p99 and ours/nginx.

Not a test: no assertion fails the run; the targets are printed next to the figures.
Everything it starts (PostgreSQL, gunicorn, nginx) lives in a temp dir and is stopped at exit.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from email.message import Message
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from conftest import free_port, pg_cluster  # noqa: E402 - the tests' helpers, shared with the bench


def wait_until(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench-web: timed out waiting for {what}")
        time.sleep(0.1)


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


# --- PostgreSQL (the tests' throw-away cluster) ------------------------------------------
def create_database(base: str) -> str:
    import sqlalchemy as sa

    eng = sa.create_engine(f"{base}/postgres", isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(sa.text('CREATE DATABASE "webstats"'))
    eng.dispose()
    return f"{base}/webstats"


# --- data ---------------------------------------------------------------------------------
def package_names(n: int, rng: random.Random) -> list[str]:
    syll = ["ge", "no", "me", "bio", "seq", "ar", "ray", "lim", "ma", "af", "fy", "cn", "tre"]
    names: set[str] = set()
    while len(names) < n:
        s = "".join(rng.choice(syll) for _ in range(rng.randint(2, 4)))
        r = rng.random()
        if r < 0.3:
            s = s.capitalize()
        elif r < 0.4:
            s = s.upper()
        elif r < 0.5:
            s += "." + rng.choice(["db", "mops", "data"])
        names.add(s + (str(rng.randint(1, 9)) if rng.random() < 0.2 else ""))
    return sorted(names)


def load_data(url: str, n_packages: int, first_year: int, last_year: int) -> int:
    """Stats rows for ``n_packages`` software packages over the years (COPY); returns rows."""
    import sqlalchemy as sa

    from bioc_webstats.store import db

    db.upgrade(url)
    rng = random.Random(42)
    names = package_names(n_packages, rng)
    pkg_buf, cat_buf = io.StringIO(), io.StringIO()
    rows = 0
    cat_tot: dict[tuple[int, int], list[int]] = {}
    for name in names:
        start = first_year  # every package over every year: the contract's half a million lines
        pkg_buf_rows = []
        for year in range(start, last_year + 1):
            year_ips = year_dl = 0
            months = 12 if year < last_year else 6
            for month in range(1, months + 1):
                ips = rng.randint(1, 3000)
                dl = ips + rng.randint(0, 5000)
                year_ips = max(year_ips, ips) + ips // 3
                year_dl += dl
                pkg_buf_rows.append(f"bioc\t{name}\t{year}\t{month}\t{ips}\t{dl}\n")
                t = cat_tot.setdefault((year, month), [0, 0])
                t[0] += ips
                t[1] += dl
            pkg_buf_rows.append(f"bioc\t{name}\t{year}\t0\t{year_ips}\t{year_dl}\n")
            t = cat_tot.setdefault((year, 0), [0, 0])
            t[0] += year_ips
            t[1] += year_dl
        pkg_buf.writelines(pkg_buf_rows)
        rows += len(pkg_buf_rows)
    for (year, month), (ips, dl) in cat_tot.items():
        cat_buf.write(f"bioc\t{year}\t{month}\t{ips}\t{dl}\n")
    engine = db.get_engine(url)
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        pkg_buf.seek(0)
        cur.copy_expert(
            "COPY package_stats (category, package, year, month, ips, downloads) FROM STDIN",
            pkg_buf,
        )
        cat_buf.seek(0)
        cur.copy_expert(
            "COPY category_stats (category, year, month, ips, downloads) FROM STDIN", cat_buf
        )
        raw.commit()
    finally:
        raw.close()
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "INSERT INTO packages (package, category, first_release, last_release) "
                "VALUES (:p, 'bioc', '3.0', NULL)"
            ),
            [{"p": n} for n in names],
        )
        conn.execute(
            sa.text(
                "INSERT INTO meta (key, value) VALUES ('valid_thru', :v), ('data_version', '1')"
            ),
            {"v": f"{last_year}-06-14"},
        )
    return rows


# --- servers ------------------------------------------------------------------------------
def fixed_headers(site: Path) -> str:
    """The deployed site's add_header lines that name no variable (nosniff, Referrer-Policy,
    X-Frame-Options, the CSP): what every answer carries, so the baseline sends them too."""
    return "\n".join(
        "        " + ln.strip()
        for ln in site.read_text().splitlines()
        if ln.strip().startswith("add_header ") and "$" not in ln
    )


def start_plain_nginx(tmp: Path, root: Path, port: int, headers: str) -> subprocess.Popen:
    """The baseline: nginx alone, the same bytes as plain static files, the same headers."""
    conf = tmp / "plain-nginx.conf"
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf.write_text(
        f"""{user}worker_processes auto;
daemon off;
pid {tmp}/plain-nginx.pid;
error_log {tmp}/plain-nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    types {{ text/html html; text/plain tab txt; text/css css; }}
    default_type text/plain;
    charset utf-8;
    charset_types text/plain;  # (text/html always is)
    sendfile on;
    tcp_nopush on;
    access_log {tmp}/plain-nginx-access.log;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{
            add_header Cache-Control "public, max-age=3600";
{headers}
        }}
    }}
}}
"""
    )
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(tmp)])
    wait_until(lambda: port_open(port), 30, "nginx")
    return proc


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


# --- measuring ----------------------------------------------------------------------------
def fetch(url: str, headers: dict | None = None) -> tuple[int, Message, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, b""


def to_ms(value: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", value)
    assert m, value
    n = float(m.group(1))
    return {"us": n / 1000, "ms": n, "s": n * 1000}[m.group(2)]


def run_wrk(url: str, seconds: int, conns: int, headers: dict | None = None) -> tuple[float, float]:
    """(requests/s, p99 ms) of one wrk run."""
    cmd = ["wrk", "-t2", f"-c{conns}", f"-d{seconds}s", "--latency", "--timeout", "30s"]
    for k, v in (headers or {}).items():
        cmd += ["-H", f"{k}: {v}"]
    out = subprocess.run(
        [*cmd, url], capture_output=True, text=True, timeout=seconds + 60, check=True
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = to_ms(re.search(r"\s99%\s+(\S+)", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        print(f"  warning: {non2xx.group(1)} non-2xx/3xx answers from {url}")
    return rps, p99


def worker_rss_mb(master: int) -> list[float]:
    out = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        ppid = int(re.search(r"PPid:\s+(\d+)", text).group(1))
        if ppid == master:
            rss = re.search(r"VmRSS:\s+(\d+) kB", text)
            if rss:
                out.append(int(rss.group(1)) / 1024)
    return sorted(out)


def medians(runs: list[tuple[float, float]]) -> tuple[float, float]:
    """(median requests/s, median p99) of several wrk runs."""
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def rss_by_process(front) -> dict[str, list[float]]:
    from webserver import rss_kib

    return {
        name: sorted(rss_kib(pid) / 1024 for pid in pids) for name, pids in front.pids().items()
    }


def du_mb(path: Path) -> tuple[float, int]:
    """(MB on disk, files) under ``path``."""
    blocks = files = 0
    for p in path.rglob("*"):
        st = p.lstat()
        blocks += st.st_blocks
        files += p.is_file()
    return blocks * 512 / 2**20, files


def main() -> int:
    from webserver import run_front

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--packages", type=int, default=6000, help="software packages, 16 years each")
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument(
        "--repeat", type=int, default=3,
        help="ours/nginx runs per case, alternated; the median of each figure is reported",
    )  # fmt: skip
    args = ap.parse_args()
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            print(f"bench-web: {tool} not found (make deps installs wrk and nginx-light)")
            return 1
    tmp = Path(tempfile.mkdtemp(prefix="bench-web-"))
    tmp.chmod(0o755)  # the postgres and nginx users traverse it
    ngx = None
    with contextlib.ExitStack() as stack:
        url = create_database(stack.enter_context(pg_cluster()))
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        stack.callback(lambda: stop(ngx))
        t0 = time.monotonic()
        rows = load_data(url, args.packages, 2010, 2025)
        print(
            f"data: {args.packages} software packages, {rows} package_stats rows, 16 years "
            f"({time.monotonic() - t0:.1f}s to load)"
        )
        front = stack.enter_context(run_front(url, tmp / "front", workers=4))
        t1 = time.monotonic()
        line = front.cli("publish").strip()
        eager = time.monotonic() - t1
        mb, files = du_mb(front.publish_dir)
        print(f"publish (what an ETL run publishes): {eager:.1f}s, {files} files, {mb:.0f} MB")
        print(f"  {line}")
        t1 = time.monotonic()
        front.cli("publish", "--all", "--force")
        full = time.monotonic() - t1
        cur = front.publish_dir / "current"
        mb, files = du_mb(cur.resolve())
        print(
            f"publish --all (every package page and file too): {full:.1f}s, "
            f"{files} files, {mb:.0f} MB"
        )
        base = front.base
        names = fetch(base + "/packages/stats/bioc/bioc_packages.txt")[2]
        lines = names.decode().splitlines()
        pkg = lines[len(lines) // 2]
        paths = {
            "heavy file (bioc_pkg_stats.tab)": "/packages/stats/bioc/bioc_pkg_stats.tab",
            "package page": f"/packages/stats/bioc/{pkg}/",
            "software index page": "/packages/stats/index.html",
        }
        root = tmp / "www"
        for path in paths.values():
            rel = path.lstrip("/") + ("index.html" if path.endswith("/") else "")
            out = root / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(fetch(base + path)[2])
        for d in [root, *root.rglob("*")]:
            d.chmod(0o755 if d.is_dir() else 0o644)
        nport = free_port()
        site = front.conf.parent / "sites-enabled" / "bioc-webstats"
        ngx = start_plain_nginx(tmp, root, nport, fixed_headers(site))
        nbase = f"http://127.0.0.1:{nport}"
        for path in paths.values():
            (_, nh, nb), (_, oh, ob) = fetch(nbase + path), fetch(base + path)
            assert nb == ob, path
            for name in ("Content-Type", "Content-Security-Policy", "X-Frame-Options"):
                assert nh[name] == oh[name], (path, name, nh[name], oh[name])

        heavy = paths["heavy file (bioc_pkg_stats.tab)"]
        o_etag = fetch(base + heavy)[1]["ETag"]
        n_etag = fetch(nbase + heavy)[1]["ETag"]
        assert fetch(base + heavy, {"If-None-Match": o_etag})[0] == 304
        cases = [(label, base + p, nbase + p, None, None) for label, p in paths.items()]
        cases.append(
            ("304 revalidation (heavy file)", base + heavy, nbase + heavy,
             {"If-None-Match": o_etag}, {"If-None-Match": n_etag})
        )  # fmt: skip
        results = []
        for label, ourl, nurl, oh, nh in cases:
            runs_ours, runs_theirs = [], []
            for _ in range(args.repeat):  # alternated: a noisy moment hits both sides
                runs_ours.append(run_wrk(ourl, args.seconds, args.connections, oh))
                runs_theirs.append(run_wrk(nurl, args.seconds, args.connections, nh))
            results.append((label, medians(runs_ours), medians(runs_theirs)))
        # (outside the published prefix: the app's redirect; a published directory without
        # its slash would be nginx's own)
        gone = base + "/packages/stats"
        conn = http.client.HTTPConnection("127.0.0.1", front.port, timeout=30)
        conn.request("GET", "/packages/stats")
        answer = conn.getresponse()
        assert answer.status == 301 and answer.getheader("Location") == "/packages/stats/"
        conn.close()
        redirect = [run_wrk(gone, args.seconds, args.connections) for _ in range(args.repeat)]
        gunicorn_rps, gunicorn_p99 = medians(redirect)
        rss = rss_by_process(front)

        print()
        print(
            f"wrk: {args.connections} connections, 2 threads, {args.seconds}s per run, loopback;"
            f" {os.cpu_count()} CPUs shared by client and servers; median of {args.repeat} runs"
        )
        print("ours = the deployed pair (nginx + gunicorn, shipped configs); nginx = plain static")
        print(
            f"{'':34} {'ours req/s':>11} {'nginx req/s':>12} {'ratio':>6}   "
            f"{'ours p99':>9} {'nginx p99':>10} {'ratio':>6}"
        )
        for label, (orps, op99), (nrps, np99) in results:
            print(
                f"{label:34} {orps:11.0f} {nrps:12.0f} {orps / nrps:6.2f}   "
                f"{op99:8.1f}ms {np99:9.1f}ms {op99 / max(np99, 0.001):6.2f}"
            )
        print(
            f"{'redirect (answered by gunicorn)':34} {gunicorn_rps:11.0f} {'':>12} {'':>6}   "
            f"{gunicorn_p99:8.1f}ms"
        )
        for name, values in rss.items():
            print(f"RSS {name} (MB): {', '.join(f'{r:.0f}' for r in values)}")
        print()
        print("targets: published answers >= 0.9x plain nginx, p99 <= 1.2x plain nginx")
        for label, (orps, op99), (nrps, np99) in results:
            ok = orps >= 0.9 * nrps and op99 <= 1.2 * max(np99, 0.001)
            print(
                f"  {label}: {orps / nrps:.2f}x, p99 {op99 / max(np99, 0.001):.2f}x: "
                f"{'met' if ok else 'NOT met'}"
            )
        return 0


if __name__ == "__main__":
    sys.exit(main())
