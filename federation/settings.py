"""Typed settings for the two services, from a TOML file plus environment variables.

Settings are passed in, never imported as globals. Precedence: command-line options, then the
TOML file, then environment variables for whatever those leave unset (``JIGSAW_NODE_PORT=8101``,
``JIGSAW_MATCHER_ENGINE=spark``). Paths in a file are relative to the file. See
``configs/node.example.toml`` and ``configs/matcher.example.toml``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from federation.errors import ConfigError
from federation.keys import secret_epoch_of

__all__ = ["MatcherSettings", "NodeSettings", "load_settings"]

_PLACEHOLDERS = {"changeme", "change-me", "secret", "password", "admin", "token", "xxx"}


class _Common(BaseSettings):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    data_dir: Path
    registry: Path
    private_key: Path
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None
    admin_token: str = Field(min_length=24)
    # When set, /metrics asks for it as a bearer token (Prometheus: `authorization`), so the
    # counts it shows need not rely on the network alone. Unset: open, like the probes.
    metrics_token: str | None = Field(None, min_length=24)
    max_request_bytes: int = 64 * 1024 * 1024
    requests_per_minute: int = 600
    log_level: str = "INFO"

    @field_validator("admin_token", "metrics_token")
    @classmethod
    def _not_placeholder(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        lowered = value.lower()
        if (
            lowered in _PLACEHOLDERS
            or len(set(value)) < 8
            or any(word in lowered for word in ("replace", "changeme", "example", " "))
        ):
            raise ValueError(
                f"{info.field_name} is a placeholder; generate one with"
                " `python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
            )
        return value

    @model_validator(mode="after")
    def _metrics_token_is_its_own(self) -> _Common:
        # A scraper that held the admin token could do anything the operator can.
        if self.metrics_token is not None and self.metrics_token == self.admin_token:
            raise ValueError("metrics_token must differ from admin_token")
        return self

    @property
    def database(self) -> Path:
        """The service's DuckDB file."""
        return self.data_dir / f"{type(self).__name__.removesuffix('Settings').lower()}.duckdb"

    @property
    def scheme(self) -> str:
        """``https`` when a TLS certificate is configured."""
        return "https" if self.tls_certfile else "http"


class NodeSettings(_Common):
    """Settings of one county's node.

    Attributes:
        node_id: This county's id in the federation registry.
        secret: File holding the federation secret (or set ``JIGSAW_FEDERATION_SECRET``).
        token_spec: Token spec TOML; every node of a federation must use the same one.
        key_epoch: Key epoch of the federation secret. A secret file named
            ``federation.<N>.key`` (as ``jigsaw keys rotate`` writes it) states its epoch, and
            a ``key_epoch`` that disagrees is refused; for any other file name, or the
            ``JIGSAW_FEDERATION_SECRET`` variable, set it (default 1). When it goes up by one,
            the node re-tokenises its records under the new epoch at start-up
            (``federation.node.rotate``).
        batch_size: Records per token batch.
        tokenise_seed: Fixed seed for Bloom-filter bit flips (demos and tests only).
        inbox_url: The inbox's address as people reach it, for e-mail links (default: the
            node's own ``/inbox``).
        inbox_session_idle_minutes: An inbox session ends after this long unused.
        inbox_session_max_hours: An inbox session ends after this long, however used.
        inbox_lockout_failures: Failed sign-ins within ``inbox_lockout_minutes`` that lock
            a name out until they age out.
        inbox_lockout_minutes: Window over which failed sign-ins count.
        inbox_secure_cookies: Mark the session cookie Secure (default: when TLS is on; set
            true behind a TLS-terminating proxy).
        smtp_host: SMTP server for e-mail notices of new alerts; none are sent if unset.
        smtp_port: Its port.
        smtp_starttls: Upgrade the SMTP connection with STARTTLS.
        smtp_username: SMTP user, if the server wants one (password in
            ``JIGSAW_NODE_SMTP_PASSWORD`` or ``smtp_password``).
        notify_from: Sender address of notices.
        notify_to: Where notices go (a team mailbox); none are sent if empty.
        notify_interval: Seconds between looks for new alerts to notify.
    """

    model_config = SettingsConfigDict(env_prefix="JIGSAW_NODE_", extra="forbid")
    node_id: str = Field(pattern=r"^[a-z0-9_-]{1,64}$")
    secret: Path | None = None
    token_spec: Path | None = None
    key_epoch: int = Field(1, ge=1)
    batch_size: int = Field(5000, ge=1, le=20_000)
    publish_interval: float = 0.2
    retry_max_seconds: float = 30.0
    tokenise_seed: int | None = None
    # --- inbox pages and e-mail notices (federation.node.inbox, federation.node.notify)
    inbox_url: str | None = None
    inbox_session_idle_minutes: float = Field(30.0, gt=0)
    inbox_session_max_hours: float = Field(10.0, gt=0)
    inbox_lockout_failures: int = Field(5, ge=1)
    inbox_lockout_minutes: float = Field(15.0, gt=0)
    inbox_secure_cookies: bool | None = None
    smtp_host: str | None = None
    smtp_port: int = Field(25, ge=1, le=65535)
    smtp_starttls: bool = False
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    notify_from: str = "jigsaw@localhost"
    notify_to: list[str] = Field(default_factory=list)
    notify_interval: float = Field(60.0, gt=0)
    # --- end inbox

    @model_validator(mode="after")
    def _epoch_of_secret_file(self) -> NodeSettings:
        stated = secret_epoch_of(self.secret) if self.secret is not None else None
        if stated is not None:
            if "key_epoch" in self.model_fields_set and self.key_epoch != stated:
                raise ValueError(
                    f"key_epoch is {self.key_epoch} but the secret file "
                    f"{self.secret.name if self.secret else ''} is for key epoch {stated}"
                )
            self.key_epoch = stated
        return self


class MatcherSettings(_Common):
    """Settings of the central matcher.

    Attributes:
        engine: Where Splink runs: embedded ``duckdb`` or ``spark``.
        spark_master: Spark master URL when ``engine = "spark"``.
        model: Trained model JSON; trained from the stored tokens when absent.
        token_spec: Token spec TOML the nodes use (the matcher checks its fingerprint only).
        threshold: Alert threshold overriding the model's calibrated one.
        train_min_records: Records needed before the matcher trains a model by itself.
        auto_link: Train and link by itself once tokens stop arriving (when it has no model);
            when false it waits for ``POST /v1/admin/relink``.
    """

    model_config = SettingsConfigDict(env_prefix="JIGSAW_MATCHER_", extra="forbid")
    engine: Literal["duckdb", "spark"] = "duckdb"
    spark_master: str = "local[2]"
    model: Path | None = None
    token_spec: Path | None = None
    threshold: float | None = Field(None, gt=0, lt=1)
    train_min_records: int = 200
    auto_link: bool = True
    score_interval: float = 0.05
    deliver_interval: float = 0.05
    retry_max_seconds: float = 30.0


S = TypeVar("S", NodeSettings, MatcherSettings)


def load_settings(kind: type[S], path: Path | None = None, **overrides: Any) -> S:
    """Load settings from a TOML file (optional), the environment, then ``overrides``.

    Raises:
        ConfigError: Listing every invalid or missing setting.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read settings {path}: {e}") from e
        base = path.resolve().parent
        for key in (
            "data_dir",
            "registry",
            "private_key",
            "secret",
            "token_spec",
            "model",
            "tls_certfile",
            "tls_keyfile",
        ):
            if key in data and data[key] is not None and not Path(data[key]).is_absolute():
                data[key] = str(base / data[key])
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return kind(**data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()
        )
        raise ConfigError(f"invalid {kind.__name__}: {problems}") from e
