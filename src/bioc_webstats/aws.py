"""AWS: Parameter Store, Secrets Manager, SNS alerts and the CloudFront invalidation.

Clients use boto3's default credential chain (on the instance: the instance profile through
IMDSv2) and boto3's own endpoint overrides (``AWS_ENDPOINT_URL``, ``AWS_ENDPOINT_URL_SSM``, …),
so tests point them at moto's server without touching this code. Every AWS failure becomes
one :class:`~bioc_webstats.errors.WebstatsError` line naming the resource and the AWS error
code; no secret value is ever part of a message.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import socket
import uuid
from typing import TYPE_CHECKING, Any

from .config import parse_login_secret
from .errors import ConfigError, WebstatsError

if TYPE_CHECKING:
    from .config import Settings

# Short connect timeouts: a unit that cannot reach AWS should fail in seconds, not minutes;
# "standard" retries cover throttling and transient 5xx answers.
CONNECT_TIMEOUT = 3
READ_TIMEOUT = 15
MAX_ATTEMPTS = 4

STATS_PATHS = ("/packages/stats/*",)
_XML_CODE = re.compile(r"<Code>([^<]{1,100})</Code>")
_XML_MESSAGE = re.compile(r"<Message>([^<]{0,500})</Message>")


# The env file's AWS_* lines (region, endpoints, test credentials), below the process
# environment: handed to each client here, so that nothing rewrites os.environ.
_FILE_ENV: dict[str, str] = {}


def use_env_file(values: dict[str, str]) -> None:
    """Take the ``AWS_*`` settings of the env file (called by ``config.load_settings``)."""
    _FILE_ENV.clear()
    _FILE_ENV.update({k: v for k, v in values.items() if k.startswith("AWS_") and v})


def _setting(name: str) -> str | None:
    return os.environ.get(name) or _FILE_ENV.get(name)


def client(service: str, region: str | None = None) -> Any:
    """A boto3 client with the project's timeouts and retries (imported lazily); settings
    boto3 would read from the environment also come from the env file, and the instance
    metadata is read with IMDSv2 only unless configured otherwise."""
    import boto3
    import botocore.session
    from botocore.config import Config

    # botocore's DEBUG log holds response bodies (decrypted parameters, secrets): whoever
    # configures logging (CLI, gunicorn), these loggers never go below INFO.
    for name in ("botocore", "boto3", "urllib3"):
        logger = logging.getLogger(name)
        if logger.level < logging.INFO:
            logger.setLevel(logging.INFO)
    config = Config(
        connect_timeout=CONNECT_TIMEOUT,
        read_timeout=READ_TIMEOUT,
        retries={"mode": "standard", "max_attempts": MAX_ATTEMPTS},
    )
    core = botocore.session.Session()
    if not _setting("AWS_EC2_METADATA_V1_DISABLED"):
        core.set_config_variable("ec2_metadata_v1_disabled", True)
    creds: dict[str, str] = {}
    if not os.environ.get("AWS_ACCESS_KEY_ID") and _FILE_ENV.get("AWS_ACCESS_KEY_ID"):
        creds = {
            "aws_access_key_id": _FILE_ENV["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": _FILE_ENV.get("AWS_SECRET_ACCESS_KEY", ""),
        }
        if _FILE_ENV.get("AWS_SESSION_TOKEN"):
            creds["aws_session_token"] = _FILE_ENV["AWS_SESSION_TOKEN"]
    region = region or _setting("AWS_REGION") or _setting("AWS_DEFAULT_REGION")
    _check_endpoints(service)
    endpoint = None  # botocore reads the process environment's endpoints itself
    key = "AWS_ENDPOINT_URL_" + service.upper().replace("-", "_")
    if not (os.environ.get(key) or os.environ.get("AWS_ENDPOINT_URL")):
        endpoint = _FILE_ENV.get(key) or _FILE_ENV.get("AWS_ENDPOINT_URL")
    session = boto3.session.Session(botocore_session=core, region_name=region or None, **creds)
    return session.client(service, config=config, endpoint_url=endpoint)


# botocore's own name of a service in its endpoint variable, where it is not ours
_BOTOCORE_ENDPOINT_KEY = {"secretsmanager": "SECRETS_MANAGER"}


def _check_endpoints(service: str) -> None:
    """An endpoint override a client would use must be an http(s) URL with a host and a port
    that can be: botocore raises a bare ValueError for one that is not (a port out of range,
    ``http://[::1``), at the client or at its first call: the failure hook died on it, and
    its alert was neither sent nor kept. The variable is named; its value is not shown."""
    import urllib.parse

    from botocore.utils import is_valid_endpoint_url, is_valid_ipv6_endpoint_url

    ours = service.upper().replace("-", "_")
    names = {f"AWS_ENDPOINT_URL_{ours}", "AWS_ENDPOINT_URL"}
    names.add(f"AWS_ENDPOINT_URL_{_BOTOCORE_ENDPOINT_KEY.get(service, ours)}")
    for name in sorted(names):
        url = _setting(name)
        if not url:
            continue
        try:
            parts = urllib.parse.urlsplit(url)
            parts.port  # noqa: B018 (raises ValueError when out of range or not a number)
            good = parts.scheme in ("http", "https") and (parts.hostname or "").isascii()
            # and botocore's own test of a host (none, my_host, a..b, a 64-character label)
            good = good and (is_valid_endpoint_url(url) or is_valid_ipv6_endpoint_url(url))
        except ValueError:
            good = False
        if not good:
            raise ConfigError(f"{name}: not an http(s) URL with a host (and a valid port)")


def describe_error(exc: BaseException) -> str:
    """The AWS error code (and its message) of a boto3 failure, on one line."""
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = err.get("Code") or "ClientError"
        text = err.get("Message") or ""
        # An error body in another protocol than the service's (XML from a JSON API: proxies,
        # emulators) leaves botocore with the HTTP status as code; take the real one out.
        found = _XML_CODE.search(text)
        if found:
            code = found.group(1)
            msg = _XML_MESSAGE.search(text)
            text = msg.group(1) if msg else ""
    else:  # BotoCoreError: no credentials, no region, endpoint unreachable, timeouts
        code, text = type(exc).__name__, str(exc)
    text = " ".join(text.split())[:300]
    return f"{code}: {text}" if text else code


def _aws_errors() -> tuple[type[BaseException], ...]:
    from boto3.exceptions import Boto3Error  # S3's managed transfers: S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError, Boto3Error)


def normalize_path(path: str) -> str:
    """``bioc/webstats/prod/`` → ``/bioc/webstats/prod`` (how Parameter Store names it)."""
    path = "/" + path.strip().strip("/")
    if path == "/":
        raise ConfigError("WEBSTATS_SSM_PATH must name a path such as /bioc/webstats/prod")
    return path


def load_ssm_parameters(path: str, region: str | None = None) -> dict[str, str]:
    """All parameters under ``path`` by name relative to it (``db/server``).

    Recursive, SecureStrings decrypted, every page of the paginator read. An unreachable
    endpoint, missing credentials or a denied read is one ConfigError naming the path.
    """
    path = normalize_path(path)
    out: dict[str, str] = {}
    try:
        paginator = client("ssm", region).get_paginator("get_parameters_by_path")
        pages = paginator.paginate(Path=path, Recursive=True, WithDecryption=True)
        for page in pages:
            for param in page.get("Parameters", []):
                name = param["Name"]
                if name.startswith(path + "/"):
                    out[name[len(path) + 1 :]] = param["Value"]
    except _aws_errors() as exc:
        raise ConfigError(f"cannot read SSM path {path}: {describe_error(exc)}") from None
    return out


def read_db_secret(
    secret_id: str, region: str | None = None, param: str = "db/credentials"
) -> tuple[str | None, str]:
    """(username, password) from a Secrets Manager secret ``{"username":…,"password":…}``."""
    try:
        answer = client("secretsmanager", region).get_secret_value(SecretId=secret_id)
    except _aws_errors() as exc:
        raise ConfigError(
            f"cannot read database secret {secret_id} ({param}): {describe_error(exc)}"
        ) from None
    return parse_login_secret(answer.get("SecretString"), f"{secret_id} ({param})")


def _sns_subject(text: str) -> str:
    # SNS subjects: ASCII, no line breaks, under 100 characters.
    ascii_text = text.encode("ascii", "replace").decode("ascii")
    return " ".join(ascii_text.split())[:99] or "bioc-webstats alert"


def publish_alert(settings: Settings, subject: str, message: str) -> bool:
    """Publish to the ``alerts/sns_topic`` topic; False when no topic is configured."""
    topic = settings.get("alerts/sns_topic")
    if not topic:
        return False
    publish_to_topic(topic, subject, message)
    return True


def publish_to_topic(topic: str, subject: str, message: str) -> None:
    """Publish one message; a failure is a WebstatsError naming the topic and the AWS error
    code (or a ConfigError when ``topic`` is not an SNS topic ARN)."""
    from .config import topic_region

    try:
        answer = client("sns", topic_region(topic)).publish(
            TopicArn=topic, Subject=_sns_subject(subject), Message=message
        )
    except _aws_errors() as exc:
        raise WebstatsError(f"cannot publish to SNS topic {topic}: {describe_error(exc)}") from None
    if not answer.get("MessageId"):
        raise WebstatsError(f"SNS topic {topic}: publish answered without a MessageId")


def clean_unit(unit: str) -> str:
    """A unit name as printed in alerts and lines: printable characters, at most 200."""
    return "".join(ch for ch in unit if ch.isprintable())[:200] or "(no unit name)"


def failure_alert(unit: str, environ: dict[str, str] | None = None) -> tuple[str, str]:
    """Subject and body of the alert for a failed systemd unit.

    systemd (≥ 251) passes the failed unit's result to ``OnFailure=`` units as
    ``MONITOR_SERVICE_RESULT``/``MONITOR_EXIT_CODE``/``MONITOR_EXIT_STATUS``; they are added
    when present. No log content is included: it stays in the journal.
    """
    env = os.environ if environ is None else environ
    unit = clean_unit(unit)
    host = socket.gethostname()
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    subject = f"bioc-webstats: {unit} failed on {host}"
    lines = [f"{unit} failed on {host} at {when}."]
    for key in ("MONITOR_SERVICE_RESULT", "MONITOR_EXIT_CODE", "MONITOR_EXIT_STATUS"):
        if env.get(key):
            lines.append(f"{key.removeprefix('MONITOR_').lower()}: {env[key]}")
    lines.append(f"Logs: journalctl -u {unit} -n 200 ; files under /var/log/bioc-webstats/")
    return subject, "\n".join(lines) + "\n"


def caller_reference(prefix: str = "bioc-webstats") -> str:
    """Unique per call: a retried run must never be taken for the previous invalidation."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{prefix}-{socket.gethostname()}-{stamp}-{uuid.uuid4().hex[:12]}"


def invalidate_stats_cache(settings: Settings) -> str | None:
    """Invalidate ``/packages/stats/*`` on ``etl/cloudfront_distribution``.

    Returns the invalidation id, or None when no distribution is configured. The answer is
    checked (id, status, the paths asked for); any failure is a WebstatsError line.
    """
    dist = settings.get("etl/cloudfront_distribution")
    if not dist:
        return None
    batch: dict[str, Any] = {
        "Paths": {"Quantity": len(STATS_PATHS), "Items": list(STATS_PATHS)},
        "CallerReference": caller_reference(),
    }
    try:
        # CloudFront is a global service; its API lives in us-east-1.
        answer = client("cloudfront", "us-east-1").create_invalidation(
            DistributionId=dist, InvalidationBatch=batch
        )
    except _aws_errors() as exc:
        raise WebstatsError(
            f"CloudFront invalidation of distribution {dist} failed: {describe_error(exc)}"
        ) from None
    inv = answer.get("Invalidation") or {}
    got = (inv.get("InvalidationBatch") or {}).get("Paths", {}).get("Items") or []
    # AWS answers "InProgress"; some implementations spell "COMPLETED".
    if not inv.get("Id") or str(inv.get("Status")).lower() not in ("inprogress", "completed"):
        raise WebstatsError(
            f"CloudFront invalidation of distribution {dist}: unexpected answer "
            f"(id {inv.get('Id')!r}, status {inv.get('Status')!r})"
        )
    if sorted(got) != sorted(STATS_PATHS):
        raise WebstatsError(
            f"CloudFront invalidation {inv['Id']} of distribution {dist}: paths {got!r}, "
            f"expected {list(STATS_PATHS)!r}"
        )
    return str(inv["Id"])
