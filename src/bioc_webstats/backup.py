"""Backups and restores of the database, with the app's own configuration.

``bioc-webstats db backup FILE [--s3 s3://bucket/prefix]`` and ``bioc-webstats db restore
FILE`` run as the schema owner's login (db/owner_*). PostgreSQL: ``pg_dump --format=custom``
of the same major version as the server (a Debian/Ubuntu host may have several clients under
``/usr/lib/postgresql/<major>/bin``; an older ``pg_dump`` than the server is refused with one
line, as pg_dump itself would fail half-way), after a check that the destination has room for
a dump of the database (``dump_room``); the password reaches pg_dump through its environment
only; the dump is 0600 and, with ``--s3``, uploaded server-side encrypted. A restore replaces
the tables (``pg_restore --clean --if-exists --single-transaction``: all or nothing),
recreated by the owner so the other logins' default privileges apply again. SQLite: the file
itself.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sqlite3
import subprocess
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import URL, make_url

from .config import Settings
from .errors import WebstatsError
from .store import db


@dataclass
class BackupResult:
    file: Path
    size: int
    s3: str | None = None

    def line(self) -> str:
        where = f", uploaded to {self.s3}" if self.s3 else ""
        return f"backup: {self.file} ({self.size} bytes){where}"


def _pg_env(url: URL) -> dict[str, str]:
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
    # The connection's TLS, as every other connection of the app makes it (db/sslmode).
    for param, var in (("sslmode", "PGSSLMODE"), ("sslrootcert", "PGSSLROOTCERT")):
        value = url.query.get(param)
        if isinstance(value, str):
            env[var] = value
    return env


# Where Debian's postgresql-client-N packages put their versioned tools.
PG_LIB = Path("/usr/lib/postgresql")


def server_major(database_url: str) -> int:
    with db.get_engine(database_url).connect() as conn:
        return int(conn.execute(text("SHOW server_version_num")).scalar_one()) // 10000


def client_tool(name: str, major: int) -> str:
    """The ``pg_dump``/``pg_restore`` of ``major`` (or newer): the versioned one under
    /usr/lib/postgresql when installed, else the one on PATH if its version fits."""
    versioned = PG_LIB / str(major) / "bin" / name
    candidates = [str(versioned)] if versioned.is_file() else []
    on_path = shutil.which(name)
    if on_path:
        candidates.append(on_path)
    if not candidates:
        raise WebstatsError(
            f"{name} not found: install postgresql-client-{major} (the server is version {major})"
        )
    for tool in candidates:
        out = subprocess.run([tool, "--version"], capture_output=True, text=True, check=False)
        found = re.search(r"\b([0-9]+)(?:\.[0-9]+)?", out.stdout)
        if found and int(found.group(1)) >= major:
            return tool
    raise WebstatsError(
        f"{name} {found.group(1) if found else '?'} cannot handle a PostgreSQL {major} server: "
        f"install postgresql-client-{major}"
    )


def _make_dir(path: Path, what: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WebstatsError(f"{what}: cannot create {path}: {exc.strerror or exc}") from None


def _last_line(stderr: str) -> str:
    """The tool's own error line (``pg_restore: error: …``), not the ``detail:`` or
    ``Command was:`` line it prints after it; else the last line."""
    lines = [x for x in stderr.strip().splitlines() if x.strip()]
    errors = [x for x in lines if re.match(r"pg_(dump|restore): error: ", x)]
    return (errors or lines or ["no output"])[-1]


def backup(settings: Settings, dest: Path, s3_url: str | None = None) -> BackupResult:
    """Dump the database to ``dest`` (0600) and, with ``s3_url``, upload it. The dump is
    written beside ``dest`` and renamed over it once complete: a failed dump leaves whatever
    was at ``dest`` (an earlier backup) as it was."""
    url = make_url(settings.database_url)
    sqlite = url.get_backend_name() == "sqlite"
    if not dest.name or dest.is_dir():
        raise WebstatsError(f"backup: {dest} is a directory, not a file name")
    if dest.exists() and not dest.is_file():  # a device, a FIFO, a socket: never replaced
        raise WebstatsError(f"backup: {dest} exists and is not a regular file: choose another")
    if sqlite and Path(url.database or "").resolve() == dest.resolve():
        raise WebstatsError(f"backup: {dest} is the database itself: choose another file")
    if dest.is_file() and dest.stat().st_size and not _is_backup(dest):
        # An earlier backup is replaced (the deploy's own name each time); anything else
        # there is a typo in the path, and kept.
        raise WebstatsError(f"backup: {dest} exists and is not a backup: choose another file")
    if s3_url:
        _s3_prefix(s3_url)  # a bad URL is refused before the dump, not after it
    old_umask = os.umask(0o077)
    try:
        _make_dir(dest.parent, "backup")
        partial = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
        try:
            if sqlite:
                _backup_sqlite(url, partial, dest)
            else:
                _backup_postgresql(settings.database_url, url, partial, dest)
            partial.chmod(0o600)
            partial.replace(dest)
        except OSError as exc:
            raise WebstatsError(f"backup: cannot write {dest}: {exc.strerror or exc}") from None
        finally:
            if partial.is_file():  # what this run wrote and did not rename
                partial.unlink()
    finally:
        os.umask(old_umask)
    result = BackupResult(dest, dest.stat().st_size)
    if s3_url:
        try:
            result.s3 = _upload(dest, s3_url)
        except WebstatsError as exc:
            raise WebstatsError(f"{exc} (the local backup {dest} is kept)") from None
    return result


def _backup_postgresql(database_url: str, url: URL, partial: Path, dest: Path) -> None:
    major = server_major(database_url)
    pg_dump = client_tool("pg_dump", major)
    with db.get_engine(database_url).connect() as conn:
        size = int(conn.execute(text("SELECT pg_database_size(current_database())")).scalar_one())
    free = shutil.disk_usage(dest.parent).free
    need = dump_room(size, dest.parent)
    if free < need:
        raise WebstatsError(
            f"backup: {dest.parent} has {free // 2**20} MiB free, a dump of this "
            f"{size // 2**20} MiB database needs about {need // 2**20} MiB: free some space "
            "or dump elsewhere"
        )
    done = subprocess.run(
        [pg_dump, "--format=custom", "--no-owner", "--no-privileges", f"--file={partial}"],
        env=_pg_env(url), capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise WebstatsError(f"pg_dump of {url.database} failed: {_last_line(done.stderr)}")


# A custom-format dump compresses the rows and holds no index: about a fifth of the database
# (14 bytes a download record against 77). The room asked for is a third of the database, or
# twice the newest earlier dump if more, never more than the database itself: asking for the
# whole database failed every migrating deploy once the history and a year of logs outgrew
# the instance's free disk. A dump larger than the room still fails cleanly (its partial file
# is removed); the check keeps a dump from filling the disk the logs share.
DUMP_SHARE = 3


def dump_room(size: int, directory: Path) -> int:
    """The free bytes a dump of a ``size``-byte database needs in ``directory``."""
    newest = 0
    with contextlib.suppress(OSError):  # (a file gone meanwhile: no estimate from it)
        dumps = [p for p in directory.iterdir() if p.is_file() and _is_backup(p)]
        if dumps:
            newest = max(dumps, key=lambda p: p.stat().st_mtime).stat().st_size
    return min(size, max(size // DUMP_SHARE, 2 * newest))


def _backup_sqlite(url: URL, partial: Path, dest: Path) -> None:
    try:
        source = sqlite3.connect(f"file:{url.database}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise WebstatsError(f"backup: cannot open the database {url.database}: {exc}") from None
    try:
        try:
            target = sqlite3.connect(partial)
        except sqlite3.Error as exc:
            raise WebstatsError(f"backup: cannot write {dest}: {exc}") from None
        try:
            source.backup(target)
            # a page-by-page copy takes a damaged file as it is: a backup that cannot be
            # restored must not replace a good one of the same name
            _intact(target, f"backup: the database {url.database}", f"{dest} was not written")
        finally:
            target.close()  # complete on disk before the rename and the size
    except sqlite3.Error as exc:
        raise WebstatsError(f"backup of {url.database} to {dest} failed: {exc}") from None
    finally:
        source.close()


def _intact(conn: sqlite3.Connection, what: str, outcome: str) -> None:
    """SQLite's own check of a whole file (pages, records, indexes); a WebstatsError naming
    its first finding when the file is damaged."""
    try:
        found = [str(r[0]) for r in conn.execute("PRAGMA quick_check(1)")]
    except sqlite3.DatabaseError as exc:  # too damaged to check
        found = [str(exc)]
    if found != ["ok"]:
        raise WebstatsError(f"{what} is damaged ({', '.join(found)[:200]}): {outcome}")


def _kind(path: Path) -> str | None:
    """What the file starts as: a pg_dump archive ("postgresql"), an SQLite database
    ("sqlite"), or neither (None)."""
    try:
        with path.open("rb") as fh:
            head = fh.read(16)
    except OSError:
        return None
    if head.startswith(b"PGDMP"):
        return "postgresql"
    return "sqlite" if head == b"SQLite format 3\x00" else None


def _is_backup(path: Path) -> bool:
    """The file starts as a pg_dump archive or an SQLite database does."""
    return _kind(path) is not None


def _other_kind(source: Path, backend: str) -> None:
    """A backup of the other kind of database than this configuration's: said as such (it
    was "not a bioc-webstats backup")."""
    kind = _kind(source)
    if kind is not None and kind != backend:
        names = {"postgresql": "PostgreSQL (pg_dump)", "sqlite": "SQLite"}
        raise WebstatsError(
            f"restore: {source} is a backup of a {names[kind]} database; this configuration's "
            f"database is {names[backend]}: restore it where the backup was taken"
        )


def _s3_prefix(s3_url: str) -> tuple[str, str]:
    """(bucket, prefix) of ``s3://bucket/prefix``."""
    if not re.match(r"^s3://[a-z0-9][a-z0-9.-]+[a-z0-9](/.*)?$", s3_url):
        raise WebstatsError(f"--s3 must be s3://bucket/prefix, got {s3_url!r}")
    bucket, _, prefix = s3_url[5:].partition("/")
    return bucket, prefix


def _upload(dest: Path, s3_url: str) -> str:
    from .aws import _aws_errors, client, describe_error

    bucket, prefix = _s3_prefix(s3_url)
    key = f"{prefix.strip('/')}/{dest.name}".lstrip("/")
    try:
        client("s3").upload_file(
            str(dest), bucket, key, ExtraArgs={"ServerSideEncryption": "AES256"}
        )
    except _aws_errors() as exc:
        raise WebstatsError(
            f"upload to s3://{bucket}/{key} failed: {describe_error(exc)}"
        ) from None
    return f"s3://{bucket}/{key}"


def fetch(s3_url: str, work_dir: Path) -> Path:
    """Download a backup from ``s3://bucket/key`` into ``work_dir`` (0700, the file 0600); the
    caller removes ``work_dir``. Used by ``db restore s3://…``."""
    from .aws import _aws_errors, client, describe_error

    m = re.match(r"^s3://([a-z0-9][a-z0-9.-]+[a-z0-9])/(.+[^/])$", s3_url)
    if not m:
        raise WebstatsError(f"restore: {s3_url} must be s3://bucket/key of a backup")
    bucket, key = m.groups()
    old_umask = os.umask(0o077)
    try:
        _make_dir(work_dir, "restore")
        dest = work_dir / Path(key).name
        try:
            client("s3").download_file(bucket, key, str(dest))
        except _aws_errors() as exc:
            dest.unlink(missing_ok=True)
            raise WebstatsError(f"restore: cannot fetch {s3_url}: {describe_error(exc)}") from None
        except OSError as exc:  # a full or read-only disk: the error of s3transfer names no path
            raise WebstatsError(
                f"restore: cannot fetch {s3_url} into {work_dir}: {exc.strerror or exc}"
            ) from None
    finally:
        os.umask(old_umask)
    return dest


# What a backup of this database holds, whatever its revision: refused otherwise, before
# anything of the live database is replaced.
BACKUP_TABLES = {"alembic_version", "meta", "packages", "ingested_objects", "download_records"}


def _check_backup_tables(src: sqlite3.Connection, source: Path) -> None:
    try:
        names = {r[0] for r in src.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        revision = src.execute("SELECT version_num FROM alembic_version").fetchall()
    except sqlite3.Error as exc:
        raise WebstatsError(f"restore: {source} is not a bioc-webstats backup ({exc})") from None
    missing = sorted(BACKUP_TABLES - names)
    if missing or len(revision) != 1:
        why = f"no table {', '.join(missing)}" if missing else "no schema revision"
        raise WebstatsError(f"restore: {source} is not a bioc-webstats backup ({why})")


def restore(settings: Settings, source: Path) -> str:
    """Replace the database's contents with a backup (all or nothing)."""
    if not source.is_file():
        what = "not a regular file" if source.exists() else "no such file"
        raise WebstatsError(f"restore: {source}: {what}")
    try:  # a file this user may not read is no bad backup (pg_restore would say only that)
        with source.open("rb"):
            pass
    except OSError as exc:
        raise WebstatsError(f"restore: {source}: {exc.strerror or exc}") from None
    url = make_url(settings.database_url)
    _other_kind(source, "sqlite" if url.get_backend_name() == "sqlite" else "postgresql")
    if url.get_backend_name() == "sqlite":
        if not url.database:
            raise WebstatsError("restore: the database is in memory (sqlite://): nothing to keep")
        try:
            src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
        except sqlite3.Error as exc:
            raise WebstatsError(f"restore: cannot read {source}: {exc}") from None
        try:
            _check_backup_tables(src, source)
            _intact(src, f"restore: {source}", "nothing was changed")
            db.dispose_engine(settings.database_url)
            try:
                target = sqlite3.connect(url.database)
                try:
                    src.backup(target)
                finally:
                    target.close()
            except sqlite3.Error as exc:
                raise WebstatsError(f"restore into {url.database} failed: {exc}") from None
        finally:
            src.close()
        return f"restore: {url.database} from {source}"
    major = server_major(settings.database_url)
    pg_restore = client_tool("pg_restore", major)
    listed = subprocess.run([pg_restore, "--list", str(source)], capture_output=True, text=True)
    data = set(re.findall(r" TABLE DATA public (\w+) ", listed.stdout))
    if listed.returncode != 0 or not BACKUP_TABLES <= data:
        raise WebstatsError(f"restore: {source} is not a pg_dump archive of the database")
    db.dispose_engine(settings.database_url)  # no pooled session holds a lock on the tables
    # No migration (a deploy's) between the restore and the drop of what its schema lacks: it
    # would be dropped under the migrated revision. The migration lock, held by a session of
    # its own that touches no table, from before pg_restore to after the drop.
    with db.get_engine(settings.database_url).connect() as guard:
        guard.execute(text("SELECT pg_advisory_lock(:k)"), {"k": db.MIGRATE_LOCK})
        guard.commit()  # (a session lock: it holds no snapshot nor table lock meanwhile)
        try:
            done = subprocess.run(
                [pg_restore, "--clean", "--if-exists", "--no-owner", "--no-privileges",
                 "--single-transaction", "--exit-on-error", f"--dbname={url.database}",
                 str(source)],
                env=_pg_env(url), capture_output=True, text=True, check=False,
            )  # fmt: skip
            if done.returncode != 0:
                raise WebstatsError(
                    f"pg_restore into {url.database} failed, nothing changed: "
                    f"{_last_line(done.stderr)}"
                )
            dropped = _drop_what_the_backup_lacks(settings.database_url, listed.stdout)
        finally:
            guard.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": db.MIGRATE_LOCK})
            guard.commit()
    newer = f"; dropped what its schema has not yet: {', '.join(dropped)}" if dropped else ""
    return f"restore: {url.database} from {source}{newer}"


def _drop_what_the_backup_lacks(database_url: str, toc: str) -> list[str]:
    """The owner's tables, views and functions the backup does not hold: a backup older than
    the schema (the deploy's pre-migration dump) leaves behind what the newer migrations made
    (``--clean`` drops only what the archive names), and ``db upgrade`` then fails to make them
    again ("already exists"). Dropped in one transaction, for the upgrade to make them anew
    from the restored data."""
    kept = set(re.findall(r" (?:TABLE|VIEW|MATERIALIZED VIEW) public (\w+) ", toc))
    kept_functions = set(re.findall(r" FUNCTION public (\w+)\(", toc))
    dropped: list[str] = []
    with db.get_engine(database_url).begin() as conn:
        relations = conn.execute(
            text(
                "SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n "
                "ON n.oid = c.relnamespace WHERE n.nspname = 'public' "
                "AND c.relkind IN ('r', 'p', 'v', 'm') AND c.relowner = "
                "(SELECT oid FROM pg_roles WHERE rolname = current_user) "
                "AND NOT c.relispartition ORDER BY c.relname"
            )
        ).all()
        for name, kind in relations:
            if name not in kept:
                what = {"v": "VIEW", "m": "MATERIALIZED VIEW"}.get(kind, "TABLE")
                quoted = conn.dialect.identifier_preparer.quote_identifier(name)  # a " in it
                conn.execute(text(f"DROP {what} IF EXISTS public.{quoted} CASCADE"))
                dropped.append(name)
        functions = conn.execute(
            text(
                "SELECT p.oid::regprocedure::text, p.proname FROM pg_proc p JOIN pg_namespace n "
                "ON n.oid = p.pronamespace WHERE n.nspname = 'public' AND p.proowner = "
                "(SELECT oid FROM pg_roles WHERE rolname = current_user) ORDER BY 1"
            )
        ).all()
        for signature, name in functions:
            if name not in kept_functions:
                conn.execute(text(f"DROP FUNCTION IF EXISTS {signature} CASCADE"))
                dropped.append(f"{name}()")
    return dropped
