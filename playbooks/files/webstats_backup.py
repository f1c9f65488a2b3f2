"""Special backup: pg_dump of the bioc-webstats database, with the app's own configuration.

Run by playbooks/backup.yml with the live release's Python:
    python webstats_backup.py DEST_FILE [--s3 s3://bucket/prefix]
The database URL comes from bioc_webstats.config.load_settings() (env file, SSM through the
instance role, the DB login secret), exactly as the services see it. The password is passed to
pg_dump through PGPASSWORD, never on the command line. The dump is written 0600. With --s3 it
is also uploaded (server-side encrypted) with the instance role. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path


def fail(message: str) -> None:
    print(f"webstats-backup: {message}", file=sys.stderr)
    sys.exit(1)


def dump_postgresql(url, dest: Path) -> None:
    env = dict(os.environ)
    env.update(
        PGHOST=url.host or "",
        PGPORT=str(url.port or 5432),
        PGUSER=url.username or "",
        PGDATABASE=url.database or "",
        PGCONNECT_TIMEOUT="10",
    )
    if url.password:
        env["PGPASSWORD"] = str(url.password)
    if not shutil.which("pg_dump"):
        fail("pg_dump not found (install postgresql-client)")
    result = subprocess.run(
        ["pg_dump", "--format=custom", "--no-owner", "--no-privileges", f"--file={dest}"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        dest.unlink(missing_ok=True)
        lines = result.stderr.strip().splitlines() or ["no output"]
        fail(f"pg_dump of {url.database} on {url.host} failed: {lines[-1]}")


def dump_sqlite(url, dest: Path) -> None:
    source = sqlite3.connect(f"file:{url.database}?mode=ro", uri=True)
    try:
        with sqlite3.connect(dest) as target:
            source.backup(target)
    finally:
        source.close()


def upload(dest: Path, s3_url: str) -> str:
    from bioc_webstats.aws import client, describe_error

    if not s3_url.startswith("s3://"):
        fail(f"--s3 must be s3://bucket/prefix, got {s3_url!r}")
    bucket, _, prefix = s3_url[5:].partition("/")
    key = f"{prefix.strip('/')}/{dest.name}".lstrip("/")
    try:
        client("s3").upload_file(
            str(dest), bucket, key, ExtraArgs={"ServerSideEncryption": "AES256"}
        )
    except Exception as exc:  # noqa: BLE001 - any AWS failure is reported on one line
        fail(f"upload to s3://{bucket}/{key} failed: {describe_error(exc)}")
    return f"s3://{bucket}/{key}"


def main() -> None:
    parser = argparse.ArgumentParser(description="pg_dump of the bioc-webstats database")
    parser.add_argument("dest", type=Path)
    parser.add_argument("--s3", default="", help="s3://bucket/prefix to upload the dump to")
    args = parser.parse_args()

    from sqlalchemy.engine import make_url

    from bioc_webstats.config import load_settings
    from bioc_webstats.errors import WebstatsError

    try:
        url = make_url(load_settings().database_url)
    except WebstatsError as exc:
        fail(f"configuration: {exc}")
    os.umask(0o077)
    args.dest.parent.mkdir(parents=True, exist_ok=True)
    if url.get_backend_name() == "postgresql":
        dump_postgresql(url, args.dest)
    elif url.get_backend_name() == "sqlite":
        dump_sqlite(url, args.dest)
    else:
        fail(f"cannot back up a {url.get_backend_name()} database")
    args.dest.chmod(0o600)
    result = {"file": str(args.dest), "bytes": args.dest.stat().st_size}
    if args.s3:
        result["s3"] = upload(args.dest, args.s3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
