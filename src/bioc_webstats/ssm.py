"""AWS Parameter Store and Secrets Manager, through boto3's default credential chain."""

from __future__ import annotations

from .errors import ConfigError


def load_ssm_parameters(path: str) -> dict[str, str]:
    """All parameters under ``path`` (recursive, decrypted, paginated) by relative name."""
    raise ConfigError("SSM loading is not implemented yet")  # filled in by the config work


def read_db_secret(secret_id: str) -> tuple[str | None, str]:
    """(username, password) from a Secrets Manager secret ``{"username":…,"password":…}``."""
    raise ConfigError(f"cannot read database secret {secret_id}: not implemented yet")
