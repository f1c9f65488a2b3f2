#!/usr/bin/env python3
"""The AWS side of molecule/ssm, on the controller's loopback: a moto server (SSM, Secrets
Manager, SNS and SQS) and a throw-away PostgreSQL cluster standing in for RDS.

    python molecule/ssm/aws_fixture.py start DIR   # start both, seed, write DIR/state.json
    python molecule/ssm/aws_fixture.py stop DIR    # stop both, remove the cluster

``start`` picks free loopback ports (moto, PostgreSQL and the web socket the scenario deploys
with), seeds ``/bioc/webstats/test/`` with every parameter the units need (SecureStrings for the
secrets) and the DB login secret, creates the alert topic (``alerts/sns_topic``) with an SQS
queue subscribed to it (where the tests read the alerts), and records ports, process ids, the
topic, the queue and the secret values in DIR/state.json (0600) for the tests. Idempotent:
``start`` first stops what a previous run left. The container reaches both servers with
``network: host``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3

SSM_PATH = "/bioc/webstats/test"
BACKUP_BUCKET = "bioc-webstats-backups"  # the backups' S3 place (host_vars: test/)
REGION = "us-east-1"
DB_NAME = "webstats"
# As on RDS: a master login (no database of the app yet: playbooks/db-bootstrap.yml creates it
# and the three logins), each login's password in its own secret.
SECRET_PREFIX = "/bioc/rdb/0/login/"
MASTER = "postgres"
LOGINS = {"owner": "webstats_owner", "etl": "webstats_runner", "web": "webstats_web"}
SECRET_ID = SECRET_PREFIX + LOGINS["etl"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            sys.exit(f"aws_fixture: timed out waiting for {what}")
        time.sleep(0.2)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def pg_bindir() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        sys.exit("aws_fixture: PostgreSQL is not installed (scripts/install-deps.sh)")
    return found[-1].parent


def aws(service: str, port: int):
    return boto3.client(
        service,
        region_name=REGION,
        endpoint_url=f"http://127.0.0.1:{port}",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def parameters(state: dict) -> dict[str, tuple[str, str]]:
    """name → (type, value) of everything seeded under SSM_PATH."""
    return {
        "db/server": ("String", "127.0.0.1"),
        "db/port": ("String", str(state["pg_port"])),
        "db/dbname": ("String", DB_NAME),
        "db/credentials": ("String", SECRET_PREFIX + LOGINS["etl"]),
        "db/web_credentials": ("String", SECRET_PREFIX + LOGINS["web"]),
        # no db/owner_credentials: as in production, the instance holds no owner's login (the
        # playbooks give it from the controller; the instance role may not read its secret)
        "flask/secret_key": ("SecureString", state["secrets"]["flask_secret_key"]),
        "flask/log_level": ("String", "INFO"),
        "etl/ip_hash_key": ("SecureString", state["secrets"]["ip_hash_key"]),
        "etl/s3_download_logs": ("String", "/srv/bioc-webstats/logs"),
        "etl/packages_source": ("String", "/srv/bioc-webstats/packages-source"),
        "etl/lookback_days": ("String", "3"),
        "alerts/sns_topic": ("String", state["topic_arn"]),
        "alerts/cloudwatch_namespace": ("String", "bioc-webstats"),
    }


def alert_topic(state: dict) -> None:
    """The SNS topic of alerts/sns_topic, and an SQS queue subscribed to it."""
    sns, sqs = aws("sns", state["moto_port"]), aws("sqs", state["moto_port"])
    state["topic_arn"] = sns.create_topic(Name="bioc-webstats-alerts")["TopicArn"]
    state["queue_url"] = sqs.create_queue(QueueName="bioc-webstats-alerts")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=state["queue_url"], AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    sns.subscribe(TopicArn=state["topic_arn"], Protocol="sqs", Endpoint=queue_arn)


def seed(state: dict) -> None:
    alert_topic(state)
    aws("s3", state["moto_port"]).create_bucket(Bucket=BACKUP_BUCKET)
    ssm = aws("ssm", state["moto_port"])
    for name, (kind, value) in parameters(state).items():
        ssm.put_parameter(Name=f"{SSM_PATH}/{name}", Type=kind, Value=value, Overwrite=True)
    sm = aws("secretsmanager", state["moto_port"])
    for login, user in [*LOGINS.items(), ("master", MASTER)]:
        sm.create_secret(
            Name=SECRET_PREFIX + user,
            SecretString=json.dumps(
                {"username": user, "password": state["secrets"][f"db_{login}_password"]}
            ),
        )


def start_moto(work: Path, port: int) -> int:
    exe = Path(sys.executable).parent / "moto_server"
    log = (work / "moto.log").open("wb")
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # outlives this script; `stop` ends it by pid
    )
    wait(lambda: port_open(port) or proc.poll() is not None, 60, "moto_server")
    if proc.poll() is not None:
        sys.exit(f"aws_fixture: moto_server exited: {(work / 'moto.log').read_text()[-500:]}")
    return proc.pid


def make_certificates(work: Path) -> None:
    """As RDS: the server's certificate for its address (127.0.0.1), signed by a CA of its
    own (work/ca.pem, what the deploy is given as the database's CA bundle)."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, cwd=work, capture_output=True)

    curve = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    days = ("-days", "30")
    openssl("req", "-x509", *curve, *days, "-keyout", "ca.key", "-out", "ca.pem",
            "-subj", "/CN=bioc-webstats test RDS CA")  # fmt: skip
    openssl("req", *curve, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (work / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", *days, "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.crt", "-extfile", "server.ext")  # fmt: skip
    (work / "ca.key").unlink()
    shutil.chown(work / "server.key", "postgres")
    (work / "server.key").chmod(0o600)


def start_postgres(work: Path, port: int, password: str) -> int:
    bindir = pg_bindir()
    data = work / "pg"
    shutil.chown(work, "postgres")
    make_certificates(work)
    run_as = ["runuser", "-u", "postgres", "--"]
    pwfile = work / "pwfile"
    pwfile.write_text(password + "\n")
    shutil.chown(pwfile, "postgres")
    pwfile.chmod(0o600)
    subprocess.run(
        [
            *run_as,
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            MASTER,
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--auth=scram-sha-256",
            f"--pwfile={pwfile}",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    pwfile.unlink()
    # As RDS with rds.force_ssl: a TCP login without TLS is refused.
    hba = data / "pg_hba.conf"
    hba.write_text(re.sub(r"(?m)^host(\s)", r"hostssl\1", hba.read_text()))
    log = (work / "pg.log").open("wb")
    proc = subprocess.Popen(
        [
            *run_as,
            str(bindir / "postgres"),
            "-D",
            str(data),
            "-p",
            str(port),
            "-k",
            str(work),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
            "-c",
            "ssl=on",
            "-c",
            f"ssl_cert_file={work / 'server.crt'}",
            "-c",
            f"ssl_key_file={work / 'server.key'}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    wait(lambda: port_open(port) or proc.poll() is not None, 60, "PostgreSQL")
    if proc.poll() is not None:
        sys.exit(f"aws_fixture: postgres exited: {(work / 'pg.log').read_text()[-500:]}")
    return proc.pid


def stop(work: Path) -> None:
    state_file = work / "state.json"
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        for key in ("moto_pid", "pg_pid"):
            pid = state.get(key)
            if not pid:
                continue
            try:
                os.killpg(pid, signal.SIGTERM)  # its own session: the process and its children
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.2)
            else:
                os.killpg(pid, signal.SIGKILL)
    if work.exists():
        shutil.rmtree(work)


def start(work: Path) -> None:
    stop(work)
    work.mkdir(parents=True)
    state = {
        "ssm_path": SSM_PATH,
        "secret_id": SECRET_ID,
        "region": REGION,
        "moto_port": free_port(),
        "pg_port": free_port(),
        "web_port": free_port(),
        "secrets": {
            "flask_secret_key": secrets.token_urlsafe(32),
            "ip_hash_key": secrets.token_urlsafe(32),
            **{f"db_{login}_password": secrets.token_urlsafe(24) for login in [*LOGINS, "master"]},
        },
    }
    state_file = work / "state.json"
    state_file.touch(mode=0o600)

    def save() -> None:
        state_file.write_text(json.dumps(state, indent=1) + "\n")

    state["moto_pid"] = start_moto(work, state["moto_port"])
    save()
    state["pg_pid"] = start_postgres(work, state["pg_port"], state["secrets"]["db_master_password"])
    save()
    seed(state)
    save()
    print(json.dumps({k: v for k, v in state.items() if k != "secrets"}))


def main() -> None:
    if len(sys.argv) != 3 or sys.argv[1] not in ("start", "stop"):
        sys.exit("usage: aws_fixture.py start|stop DIR")
    work = Path(sys.argv[2])
    start(work) if sys.argv[1] == "start" else stop(work)


if __name__ == "__main__":
    main()
