"""The settings for watching the service run: logs, Prometheus metrics and Sentry error reports. A part of
`Settings` (app/config.py), which inherits them; kept apart so each file stays readable."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings

# Addresses that listen on every interface, the public one too.
_WILDCARDS = {"", "0.0.0.0", "::", "*"}  # noqa: S104 - the values refused below


class OperationsSettings(BaseSettings):
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # Prometheus metrics at GET /metrics; off unless true (nothing is recorded then).
    metrics_enabled: bool = False
    # The bearer token a scraper must send to GET /metrics on the API's own port.
    metrics_token: SecretStr | None = None
    # A separate port serving only the metrics, on METRICS_HOST (then /metrics needs no token there).
    metrics_port: int | None = Field(None, ge=1, le=65535)
    # The private interface METRICS_PORT listens on (never every interface: that port asks for no token).
    metrics_host: str = "127.0.0.1"
    # Where gunicorn's workers keep their metrics files (emptied at start); unset: a new folder in /dev/shm.
    prometheus_multiproc_dir: Path | None = None

    # Sentry's DSN: errors are reported there; unset, nothing is sent.
    sentry_dsn: SecretStr | None = None
    # The environment the reports are filed under; unset: ENVIRONMENT.
    sentry_environment: str | None = None
    # The release the reports name (a commit or version); unset: Render's RENDER_GIT_COMMIT, else Sentry's own guess.
    sentry_release: str | None = Field(None, validation_alias=AliasChoices("SENTRY_RELEASE", "RENDER_GIT_COMMIT"))

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("metrics_token", "sentry_dsn", "sentry_environment", "sentry_release", mode="before")
    @classmethod
    def _blank_means_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("metrics_token")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters (e.g. `openssl rand -hex 32`)")
        return value

    @field_validator("sentry_dsn")
    @classmethod
    def _dsn_shape(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(("https://", "http://")):
            raise ValueError("must be the project's DSN from Sentry (https://<key>@<host>/<project>)")
        return value

    @model_validator(mode="after")
    def _metrics_listener_private(self) -> OperationsSettings:
        if self.metrics_port is not None and _is_wildcard(self.metrics_host):
            raise ValueError(
                f"METRICS_HOST={self.metrics_host or '(empty)'} would serve METRICS_PORT, which asks for no token, on "
                "every interface, the public one too: give a private interface's address, or use METRICS_TOKEN"
            )
        return self

    @property
    def metrics_on_api_port(self) -> bool:
        """GET /metrics on the API's port: with METRICS_TOKEN, or (outside production) when METRICS_PORT is not set."""
        return self.metrics_enabled and (self.metrics_token is not None or self.metrics_port is None)

    def check_operations(self, *, production: bool, api_port: int) -> None:
        """What depends on the rest of the settings (called by Settings' own check)."""
        if production and self.metrics_enabled and self.metrics_token is None and self.metrics_port is None:
            raise ValueError(
                "METRICS_ENABLED=true in production needs METRICS_TOKEN or METRICS_PORT: /metrics would be public"
            )
        if self.metrics_port == api_port:
            raise ValueError(f"METRICS_PORT must differ from PORT ({api_port}): the API listens there")


def _is_wildcard(host: str) -> bool:
    host = host.strip().strip("[]")
    if host in _WILDCARDS:
        return True
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False  # a name: whatever it resolves to
