"""Settings: one object, read from the environment and an optional `.env`, validated at start-up."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import NoDecode, SettingsConfigDict
from sqlalchemy.engine import URL, make_url

from app.config_operations import OperationsSettings

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CORS_ORIGINS = ("http://localhost:5173", "http://localhost:5174")
# Supabase's transaction pooler listens here; it cannot keep prepared statements across requests.
SUPABASE_TRANSACTION_POOLER_PORT = 6543
# libpq's `sslmode` spelled as asyncpg's `ssl` argument.
_SSLMODES = {"disable", "allow", "prefer", "require", "verify-ca", "verify-full"}


class CatalogueItem(BaseModel):
    """One Stripe price we sell: what the user sees and the credits it grants (per paid invoice, for a plan)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]
    credits: int = Field(gt=0, le=1_000_000, strict=True)


@dataclass(frozen=True, slots=True)
class Catalogue:
    """What this server sells: one-time credit packs, and monthly plans (credits per paid invoice)."""

    packs: Mapping[str, CatalogueItem]
    plans: Mapping[str, CatalogueItem]


@dataclass(frozen=True, slots=True)
class SignupGrants:
    """The credits a new profile starts with: a permanent account's, and an anonymous sign-in's."""

    signup: int
    anonymous: int


def _price_id(value: str) -> str:
    if not value.startswith("price_"):
        hint = " (that is a product id: use the price's id, price_...)" if value.startswith("prod_") else ""
        raise ValueError(f"{value!r} is not a Stripe price id (price_...){hint}")
    return value


# CREDIT_PACKS / SUBSCRIPTION_PLANS: Stripe price id -> what it sells. A mistake names the price and the field.
PriceList = dict[Annotated[str, AfterValidator(_price_id)], CatalogueItem]


class Settings(OperationsSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    environment: Literal["development", "test", "production"] = "development"
    # Where the server listens; unset: 127.0.0.1 in development (this machine only), 0.0.0.0 in production.
    host: str | None = None
    port: int = Field(8000, ge=1, le=65535)

    # Database: DATABASE_URL, or its parts. Neither: the embedded PostgreSQL (not in production).
    database_url: SecretStr | None = None
    db_user: str | None = None
    db_password: SecretStr | None = None
    db_host: str | None = None
    db_port: int = Field(5432, ge=1, le=65535)
    db_name: str | None = None
    # Per process (gunicorn worker), the connection budget is DB_POOL_SIZE + DB_SESSION_POOL_SIZE: asyncpg's
    # pool for the hot paths, and SQLAlchemy's pool for the ORM sessions. 15 by default, so 2 instances of
    # 2 workers stay within a small Supabase project's 60 direct connections.
    db_pool_size: int = Field(10, ge=1)
    db_session_pool_size: int = Field(5, ge=1)
    db_pool_timeout: float = Field(10.0, gt=0)
    # A pooled connection unused this long is closed (seconds; 0 keeps idle connections open).
    db_pool_idle_lifetime: float = Field(300.0, ge=0)
    db_connect_timeout: float = Field(5.0, gt=0)
    db_statement_timeout_ms: int = Field(15_000, ge=0)
    # The longest a hot-path statement waits for a row lock (another request changing the same balance) before
    # the request is answered 429, retryable, with nothing written (0 turns the limit off).
    db_lock_timeout_ms: int = Field(2_000, ge=0)
    # Balance-changing requests one user may have running at once, per process; more get 429.
    user_concurrent_writes: int = Field(3, ge=1)
    # None: on when the port is Supabase's transaction pooler port.
    db_pooler_mode: bool | None = None
    # The original README's bare DBNAME; read only to point at DB_NAME.
    legacy_dbname: str | None = Field(None, validation_alias="DBNAME")

    # Supabase
    supabase_url: str | None = None
    supabase_jwt_secret: SecretStr | None = None
    supabase_service_role_key: SecretStr | None = None
    supabase_jwks: str | None = None
    jwt_leeway_seconds: int = Field(30, ge=0, le=300)

    # Web
    frontend_url: str | None = None
    cors_origins: Annotated[list[str] | None, NoDecode] = None

    signup_credits: int = Field(1000, ge=0, le=1_000_000)
    # What a Supabase anonymous sign-in starts with; the full signup grant follows, once, with a permanent account.
    anonymous_signup_credits: int = Field(0, ge=0, le=1_000_000)

    # Operations (logs, metrics and error reports: OperationsSettings)
    # Larger request bodies get 413 before they are read whole (Stripe's webhook has its own limit, 256 KiB).
    max_body_bytes: int = Field(1024 * 1024, ge=1024)
    # Seconds a client has to send a request's whole body (408 after it): a slow one holds a connection no longer.
    body_timeout: float = Field(10.0, gt=0, le=300)
    # /docs, /redoc and /openapi.json; unset: served outside production only (see docs_served).
    docs_enabled: bool | None = None

    # Stripe. Without a secret key, checkout and the portal answer 503; without a webhook secret, /webhook does.
    stripe_secret_key: SecretStr | None = None
    stripe_publishable_key: str | None = None
    stripe_webhook_secret: SecretStr | None = None
    # Another API address (stripe-mock, a local fake); unset: Stripe itself.
    stripe_api_base: str | None = None
    stripe_timeout: float = Field(10.0, gt=0, le=120)
    stripe_max_network_retries: int = Field(2, ge=0, le=5)
    # Price id -> {"name", "credits"}: one-time credit packs, and monthly plans (credits per paid invoice).
    credit_packs: Annotated[PriceList, NoDecode] = Field(default_factory=dict)
    subscription_plans: Annotated[PriceList, NoDecode] = Field(default_factory=dict)
    # Embedded PostgreSQL data and the generated development secret live here (git-ignored).
    data_dir: Path = PROJECT_ROOT / ".picads"

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("cors_origins")
    @classmethod
    def _no_wildcard(cls, value: list[str] | None) -> list[str] | None:
        if value and "*" in value:
            raise ValueError("'*' is not allowed: list the front end's origins (credentials are sent)")
        return value

    @field_validator("supabase_url", "frontend_url", "stripe_api_base")
    @classmethod
    def _strip_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else None

    @field_validator("credit_packs", "subscription_plans", mode="before")
    @classmethod
    def _catalogue_json(cls, value: Any) -> Any:
        if value is None or value == "":
            return {}
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError:
                raise ValueError(
                    'must be a JSON object, e.g. {"price_123": {"name": "Starter pack", "credits": 500}}'
                ) from None
        return value

    @field_validator("stripe_secret_key", "stripe_webhook_secret", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        # `STRIPE_WEBHOOK_SECRET=` in a .env means "not configured", not an empty secret.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("stripe_secret_key")
    @classmethod
    def _secret_key_kind(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and value.get_secret_value().startswith("pk_"):
            raise ValueError("this is a publishable key (pk_...): use the secret key (sk_... or rk_...)")
        return value

    @field_validator("stripe_webhook_secret")
    @classmethod
    def _webhook_secret_kind(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith("whsec_"):
            raise ValueError(
                "must be a webhook signing secret (whsec_...), from `stripe listen` or the endpoint in the dashboard"
            )
        return value

    @field_validator("supabase_jwks")
    @classmethod
    def _jwks_is_json(cls, value: str | None) -> str | None:
        if value:
            try:
                keys = json.loads(value).get("keys")
            except (ValueError, AttributeError):
                keys = None
            if not isinstance(keys, list):
                raise ValueError('must be a JWKS document: {"keys": [...]}')
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.legacy_dbname and not self.db_name and not self.database_url:
            raise ValueError(
                "DBNAME is set but DB_NAME is not: this backend reads DATABASE_URL or "
                "DB_USER/DB_PASSWORD/DB_HOST/DB_PORT/DB_NAME (rename DBNAME to DB_NAME)"
            )
        parts = {"DB_HOST": self.db_host, "DB_USER": self.db_user, "DB_NAME": self.db_name}
        if not self.database_url and any(parts.values()) and not all(parts.values()):
            missing = ", ".join(name for name, value in parts.items() if not value)
            raise ValueError(f"incomplete database settings: {missing} missing (or set DATABASE_URL)")
        if self.database_url:
            self.database_url_object  # noqa: B018 - parse now, so a bad URL fails at start-up
        both = sorted(set(self.credit_packs) & set(self.subscription_plans))
        if both:
            raise ValueError(
                f"{', '.join(both)} is in both CREDIT_PACKS and SUBSCRIPTION_PLANS: a price is one or the other"
            )
        if self.is_production:
            if not self.database_configured:
                raise ValueError(
                    "ENVIRONMENT=production needs a database: set DATABASE_URL or DB_HOST/DB_USER/DB_NAME "
                    "(the embedded PostgreSQL is for development only)"
                )
            if not self.token_verifier_configured:
                raise ValueError(
                    "ENVIRONMENT=production needs a token verifier: set SUPABASE_JWT_SECRET, "
                    "SUPABASE_URL (JWKS) or SUPABASE_JWKS"
                )
            if self.stripe_secret_key and not self.frontend_url:
                raise ValueError(
                    "STRIPE_SECRET_KEY is set but FRONTEND_URL is not: Checkout needs it to send users back"
                )
        self.check_operations(production=self.is_production, api_port=self.port)
        return self

    @property
    def is_production(self) -> bool:
        return self.environment == "production"

    @property
    def signup_grants(self) -> SignupGrants:
        return SignupGrants(self.signup_credits, self.anonymous_signup_credits)

    @property
    def bind_host(self) -> str:
        if self.host:
            return self.host
        return "0.0.0.0" if self.is_production else "127.0.0.1"  # noqa: S104 - production runs behind a proxy

    @property
    def docs_served(self) -> bool:
        """The interactive docs are for the people building against the API; production's only client is our
        front end, so there they are off unless DOCS_ENABLED=true (they are also its only HTML pages)."""
        return self.docs_enabled if self.docs_enabled is not None else not self.is_production

    @property
    def catalogue(self) -> Catalogue:
        return Catalogue(self.credit_packs, self.subscription_plans)

    @property
    def connection_budget(self) -> int:
        """Database connections one process may open at most: both pools together."""
        return self.db_pool_size + self.db_session_pool_size

    @property
    def database_configured(self) -> bool:
        return bool(self.database_url or self.db_host)

    @property
    def token_verifier_configured(self) -> bool:
        return bool(self.supabase_jwt_secret or self.supabase_url or self.supabase_jwks)

    @property
    def allowed_origins(self) -> list[str]:
        origins = list(self.cors_origins) if self.cors_origins is not None else list(DEFAULT_CORS_ORIGINS)
        if self.frontend_url and self.frontend_url not in origins:
            origins.append(self.frontend_url)
        return origins

    @property
    def billing_return_base(self) -> str:
        """Where Checkout and the portal send users back to: the front end (the Vite dev server by default)."""
        return self.frontend_url or DEFAULT_CORS_ORIGINS[0]

    @property
    def jwt_issuer(self) -> str | None:
        return f"{self.supabase_url}/auth/v1" if self.supabase_url else None

    @property
    def jwks_url(self) -> str | None:
        return f"{self.supabase_url}/auth/v1/.well-known/jwks.json" if self.supabase_url else None

    @cached_property
    def database_url_object(self) -> URL:
        """The configured database as a SQLAlchemy asyncpg URL (no embedded default here)."""
        if self.database_url:
            raw = self.database_url.get_secret_value().strip()
            try:
                url = make_url(raw)
            except Exception:
                raise ValueError(
                    "DATABASE_URL is not a valid URL (expected postgresql://user:password@host:5432/dbname)"
                ) from None
            if url.get_backend_name() not in {"postgres", "postgresql"}:
                raise ValueError("DATABASE_URL must be a PostgreSQL URL (postgresql://...)")
            if url.host and "@" in url.host:
                # The URL split at the password's own @: its tail would be taken for the host.
                raise ValueError(
                    "DATABASE_URL: the password contains an unencoded '@': percent-encode it (@ as %40), "
                    "or set DB_PASSWORD instead"
                )
            if url.port is not None and not 1 <= url.port <= 65535:
                raise ValueError(f"DATABASE_URL's port must be 1 to 65535, not {url.port}")
            return url.set(drivername="postgresql+asyncpg")
        if not self.db_host:
            raise ValueError("no database configured")
        password = self.db_password.get_secret_value() if self.db_password else None
        return URL.create(
            "postgresql+asyncpg",
            username=self.db_user,
            password=password,
            host=self.db_host,
            port=self.db_port,
            database=self.db_name,
        )

    def pooler_mode_for(self, url: URL) -> bool:
        if self.db_pooler_mode is not None:
            return self.db_pooler_mode
        return url.port == SUPABASE_TRANSACTION_POOLER_PORT


def split_sslmode(url: URL) -> tuple[URL, dict[str, Any]]:
    """Move libpq's `sslmode` (which asyncpg does not take as a keyword) into asyncpg's `ssl` argument."""
    query = dict(url.query)
    mode = query.pop("sslmode", None)
    if mode is None:
        return url, {}
    if isinstance(mode, tuple):
        mode = mode[-1]
    if mode not in _SSLMODES:
        raise ValueError(f"sslmode={mode} is not one of {', '.join(sorted(_SSLMODES))}")
    return url.set(query=query), {"ssl": mode}


@dataclass(frozen=True, slots=True)
class DatabaseAddress:
    """Where a URL points, for logs and messages: never the password."""

    user: str
    # The host, or the socket folder of a local server (`?host=/dir`).
    host: str
    port: int
    database: str

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"{quote(self.user)}@{self.target}/{self.database}"


def describe(url: URL) -> DatabaseAddress:
    host = url.host or url.query.get("host") or "localhost"
    return DatabaseAddress(url.username or "", str(host), url.port or 5432, url.database or "")


def load_settings(**overrides: Any) -> Settings:
    """Settings or a one-line explanation and a non-zero exit: a misconfigured deploy should say why."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(_explain(error) for error in exc.errors())
        raise SystemExit(f"Configuration error: {problems}") from None


def _explain(error: Any) -> str:
    setting, *within = [str(part) for part in error.get("loc", ()) if part and part != "[key]"] or [""]
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    where = ": ".join([setting.upper(), *within]) if setting else ""
    return f"{where}: {message}" if where else message
