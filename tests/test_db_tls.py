"""TLS of the database connections (db/sslmode, db/sslrootcert) against a real PostgreSQL
serving a certificate of a CA made here: verify-full connects, over TLS, to the server the CA
vouches for, and refuses (one line, no traceback) a server another CA signed, for the app's
connections and for pg_dump alike; a bad setting is one line before any connection."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bioc_webstats import backup
from bioc_webstats.config import load_settings
from bioc_webstats.store import db
from conftest import new_pg_database, pg_cluster

CLI = str(Path(sys.executable).parent / "bioc-webstats")


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _server_cert(ca_key, ca_cert) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def tls_server() -> Iterator[tuple[str, Path, Path]]:
    """A cluster serving a certificate of CA "a": (its base URL, CA a's file, CA b's file)."""
    tmp = Path(tempfile.mkdtemp(prefix="webstats-tls-"))
    ca_key, ca_cert = _ca("webstats test CA a")
    _, other_cert = _ca("webstats test CA b")
    key, cert = _server_cert(ca_key, ca_cert)
    (tmp / "ca-a.pem").write_bytes(_pem(ca_cert))
    (tmp / "ca-b.pem").write_bytes(_pem(other_cert))
    (tmp / "server.crt").write_bytes(_pem(cert))
    key_file = tmp / "server.key"
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    tmp.chmod(0o755)
    if os.geteuid() == 0:  # the cluster runs as postgres, which must own its key
        shutil.chown(key_file, "postgres")
    settings = {
        "ssl": "on",
        "ssl_cert_file": str(tmp / "server.crt"),
        "ssl_key_file": str(key_file),
    }
    try:
        with pg_cluster(settings=settings) as url:
            yield url, tmp / "ca-a.pem", tmp / "ca-b.pem"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args], env=dict(os.environ), capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def tls_db(tls_server, clean_env, monkeypatch) -> str:
    url = new_pg_database(tls_server[0])
    db.upgrade(url)
    db.dispose_engine(url)
    monkeypatch.setenv("WEBSTATS_DATABASE_URL", url)
    monkeypatch.setenv("WEBSTATS_DB_SSLMODE", "verify-full")
    return url


def test_verify_full_reaches_the_server_its_ca_vouches_for_over_tls(
    tls_server, tls_db, monkeypatch, tmp_path
):
    monkeypatch.setenv("WEBSTATS_DB_SSLROOTCERT", str(tls_server[1]))
    settings = load_settings()
    with db.get_engine(settings.database_url).connect() as conn:
        used = conn.execute(sa.text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"))
        assert used.scalar_one() is True
    db.dispose_engine(settings.database_url)
    res = run("check")
    assert res.returncode == 0 and res.stdout.startswith("ok"), res.stderr
    shown = run("config", "show").stdout.splitlines()
    assert "db/sslmode = verify-full  (environment WEBSTATS_DB_SSLMODE)" in shown
    done = run("db", "backup", str(tmp_path / "tls.dump"))  # pg_dump, over the same TLS
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "tls.dump").stat().st_size > 0


def test_a_server_another_ca_signed_is_refused_in_one_line(
    tls_server, tls_db, monkeypatch, tmp_path
):
    monkeypatch.setenv("WEBSTATS_DB_SSLROOTCERT", str(tls_server[2]))
    for args in (("check",), ("status",), ("db", "backup", str(tmp_path / "x.dump"))):
        res = run(*args)
        assert res.returncode != 0, args
        assert "certificate verify failed" in res.stderr, (args, res.stderr)
        assert "Traceback" not in res.stderr and len(res.stderr.splitlines()) == 1, res.stderr
    assert not (tmp_path / "x.dump").exists()


@pytest.mark.parametrize(
    ("mode", "root", "message"),
    [
        ("verify-everything", "/etc/ssl/ca.pem", "parameter db/sslmode must be one of disable, "),
        ("verify-full", "", "parameter db/sslmode is verify-full: db/sslrootcert must name"),
        ("require", "ca.pem", "parameter db/sslrootcert must be an absolute path or 'system'"),
    ],
)
def test_a_bad_tls_setting_is_one_line(clean_env, monkeypatch, mode, root, message):
    monkeypatch.setenv("WEBSTATS_DB_SERVER", "db.example.internal")
    monkeypatch.setenv("WEBSTATS_DB_SSLMODE", mode)
    monkeypatch.setenv("WEBSTATS_DB_SSLROOTCERT", root)
    res = run("check")
    assert res.returncode == 1
    assert len(res.stderr.splitlines()) == 1, res.stderr
    assert res.stderr.startswith(f"bioc-webstats: error: {message}"), res.stderr


def test_the_login_url_carries_the_tls_parameters(clean_env, monkeypatch):
    monkeypatch.setenv("WEBSTATS_DB_SERVER", "db.example.internal")
    monkeypatch.setenv("WEBSTATS_DB_SSLMODE", "verify-full")
    monkeypatch.setenv("WEBSTATS_DB_SSLROOTCERT", "/etc/bioc-webstats/db-ca.pem")
    url = sa.engine.make_url(load_settings().database_url)
    assert url.query == {"sslmode": "verify-full", "sslrootcert": "/etc/bioc-webstats/db-ca.pem"}
    env = backup._pg_env(url)  # pg_dump and pg_restore connect the same way
    assert (env["PGSSLMODE"], env["PGSSLROOTCERT"]) == (
        "verify-full",
        "/etc/bioc-webstats/db-ca.pem",
    )
    monkeypatch.setenv("WEBSTATS_DATABASE_URL", "postgresql://u@h/d?sslmode=disable")
    assert sa.engine.make_url(load_settings().database_url).query == {"sslmode": "disable"}
