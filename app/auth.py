"""Supabase access-token verification: who a bearer token says the caller is (the dependencies are in deps.py).

Tokens are verified locally: HS256 with the project's JWT secret (legacy projects), ES256/RS256 with the
project's JWKS. The algorithm must be one the configured key was made for; `alg: none` never is.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
from jose import jwt
from jose.exceptions import ExpiredSignatureError, JWTError

from app.config import Settings
from app.errors import Unauthorized

logger = logging.getLogger(__name__)

AUDIENCE = "authenticated"
SERVICE_ROLE = "service_role"
MAX_TOKEN_LENGTH = 16_384
JWKS_REFRESH_INTERVAL = 60.0
# Fetched keys are also refreshed after this long, so a key the project revoked stops being trusted.
JWKS_MAX_AGE = 600.0
# Which JWK key type each asymmetric algorithm needs: a key is only ever used for its own kind.
ASYMMETRIC_KEY_TYPES = {"RS256": "RSA", "ES256": "EC"}
# Verified tokens are remembered (bounded in count, each until its own `exp` and 5 minutes at most) so a page that
# makes several calls pays for one signature check.
VERIFIED_CACHE_SIZE = 10_000
VERIFIED_CACHE_SECONDS = 300.0
DEV_SECRET_FILE = "dev-jwt-secret"  # noqa: S105 - a file name, not a secret


@dataclass(frozen=True, slots=True)
class User:
    """A signed-in Supabase user. `email` is absent for phone and anonymous users."""

    id: UUID
    role: str = AUDIENCE
    email: str | None = None
    # Supabase's anonymous sign-in (`is_anonymous`): no signup credits until the account is made permanent.
    anonymous: bool = False
    claims: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class ServiceCaller:
    """The service role (the service-role key or a JWT with `role: service_role`): trusted, no profile."""

    role: str = SERVICE_ROLE


Principal = User | ServiceCaller


def development_jwt_secret(data_dir: Path) -> str:
    """A random HS256 secret kept in the git-ignored data folder, so dev tokens survive restarts."""
    path = data_dir / DEV_SECRET_FILE
    if path.exists():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secret)
    return secret


def uses_development_secret(settings: Settings) -> bool:
    return not settings.is_production and not settings.token_verifier_configured


def hs256_secret(settings: Settings) -> str | None:
    """The configured JWT secret; outside production with no verifier configured, the development one."""
    if settings.supabase_jwt_secret:
        return settings.supabase_jwt_secret.get_secret_value()
    if not uses_development_secret(settings):
        return None
    return development_jwt_secret(settings.data_dir)


class TokenVerifier:
    def __init__(self, settings: Settings, http: httpx.AsyncClient | None = None) -> None:
        self._hs_secret = hs256_secret(settings)
        self._service_key = (
            settings.supabase_service_role_key.get_secret_value().encode()
            if settings.supabase_service_role_key
            else None
        )
        self._issuer = settings.jwt_issuer
        self._leeway = settings.jwt_leeway_seconds
        self._jwks_url = settings.jwks_url
        self._static_keys = _keys_by_kid(json.loads(settings.supabase_jwks)) if settings.supabase_jwks else {}
        self._fetched_keys: dict[str, dict[str, Any]] = {}
        self._last_fetch = float("-inf")
        self._fetch_lock = asyncio.Lock()
        self._verified: OrderedDict[str, tuple[float, Principal]] = OrderedDict()
        self._http = http or httpx.AsyncClient(timeout=5.0)
        self.algorithms = {"HS256"} if self._hs_secret else set()
        if self._jwks_url or self._static_keys:
            self.algorithms |= set(ASYMMETRIC_KEY_TYPES)

    async def aclose(self) -> None:
        await self._http.aclose()

    def is_service_role_key(self, token: str) -> bool:
        return self._service_key is not None and hmac.compare_digest(token.encode(), self._service_key)

    async def verify(self, token: str) -> Principal:
        now = time.time()
        cached = self._verified.get(token)
        if cached is not None:
            if now < cached[0]:
                self._verified.move_to_end(token)
                return cached[1]
            del self._verified[token]
        principal, expires_at = await self._verify_uncached(token)
        self._verified[token] = (min(expires_at, now + VERIFIED_CACHE_SECONDS), principal)
        if len(self._verified) > VERIFIED_CACHE_SIZE:
            self._verified.popitem(last=False)
        return principal

    async def _verify_uncached(self, token: str) -> tuple[Principal, float]:
        if len(token) > MAX_TOKEN_LENGTH:
            raise Unauthorized("invalid token")
        try:
            header = jwt.get_unverified_header(token)
        except JWTError:
            raise Unauthorized("invalid token") from None
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in self.algorithms:
            raise Unauthorized("invalid token")
        key: str | dict[str, Any] | None
        if algorithm == "HS256":
            key = self._hs_secret
        else:
            key = await self._signing_key(header.get("kid"), algorithm)
        if key is None:
            raise Unauthorized("invalid token")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                # Audience and issuer are checked below: the service role's key has neither.
                options={"verify_aud": False, "verify_iss": False, "require_exp": True, "leeway": self._leeway},
            )
        except ExpiredSignatureError:
            raise Unauthorized("token expired") from None
        except JWTError:
            raise Unauthorized("invalid token") from None
        return self._principal(claims), float(claims["exp"])

    def _principal(self, claims: dict[str, Any]) -> Principal:
        role = claims.get("role")
        if role == SERVICE_ROLE:
            return ServiceCaller()
        audience = claims.get("aud")
        if audience != AUDIENCE and not (isinstance(audience, list) and AUDIENCE in audience):
            raise Unauthorized("invalid token")
        if self._issuer is not None and claims.get("iss") != self._issuer:
            raise Unauthorized("invalid token")
        try:
            user_id = UUID(str(claims.get("sub")))
        except ValueError:
            raise Unauthorized("invalid token") from None
        email = claims.get("email")
        return User(
            id=user_id,
            role=role if isinstance(role, str) else AUDIENCE,
            email=email if isinstance(email, str) and email else None,
            anonymous=claims.get("is_anonymous") is True,
            claims=claims,
        )

    async def _signing_key(self, kid: Any, algorithm: str) -> dict[str, Any] | None:
        if not isinstance(kid, str):
            return None
        if self._jwks_url and time.monotonic() - self._last_fetch > JWKS_MAX_AGE:
            await self._refresh_jwks()
        key = self._static_keys.get(kid) or self._fetched_keys.get(kid)
        if key is None and self._jwks_url:
            await self._refresh_jwks()
            key = self._fetched_keys.get(kid)
        if key is None or key.get("kty") != ASYMMETRIC_KEY_TYPES[algorithm]:
            return None
        if key.get("alg", algorithm) != algorithm or key.get("use", "sig") != "sig":
            return None
        return key

    async def _refresh_jwks(self) -> None:
        """Refetch the project's JWKS (keys rotate), at most once a minute whatever tokens arrive."""
        assert self._jwks_url is not None
        async with self._fetch_lock:
            if time.monotonic() - self._last_fetch < JWKS_REFRESH_INTERVAL:
                return
            self._last_fetch = time.monotonic()
            try:
                response = await self._http.get(self._jwks_url)
                response.raise_for_status()
                self._fetched_keys = _keys_by_kid(response.json())
            except (httpx.HTTPError, ValueError) as exc:
                logger.warning("could not fetch the JWKS from %s: %s", self._jwks_url, type(exc).__name__)


def _keys_by_kid(jwks: Any) -> dict[str, dict[str, Any]]:
    keys = jwks.get("keys") if isinstance(jwks, dict) else None
    if not isinstance(keys, list):
        return {}
    return {key["kid"]: key for key in keys if isinstance(key, dict) and isinstance(key.get("kid"), str)}
