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
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
from jose import jwk, jwt
from jose.backends.base import Key
from jose.exceptions import ExpiredSignatureError, JWTError

from app.config import Settings
from app.errors import Unauthorized

logger = logging.getLogger(__name__)

AUDIENCE = "authenticated"
SERVICE_ROLE = "service_role"
# Supabase's access tokens are 1 to 2 KB (the standard claims, app_metadata, user_metadata); sign-ins through OAuth
# providers copy the provider's profile into user_metadata and reach a few KB. Past 8 KB a token already fails
# behind common proxies (nginx and Apache refuse a header line over 8 KB by default), and Supabase's answer to such
# tokens is a custom access token hook that trims them: 8 KB bounds what one token costs to check and to remember.
MAX_TOKEN_LENGTH = 8_192
# A JWT as Supabase writes it: three unpadded base64url parts. python-jose skips characters outside that alphabet,
# so without this one token could be sent in endless spellings (each a new entry of the cache below).
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
# ...and each part in its one canonical spelling: the unused low bits of its last character zero. Which characters
# qualify depends on the part's length modulo 4 (1 is no base64 at all). Both before the library and the cache.
_CANONICAL_LAST = {2: "AQgw", 3: "AEIMQUYcgkosw048"}
JWKS_REFRESH_INTERVAL = 60.0
# Fetched keys are also refreshed after this long, so a key the project revoked stops being trusted.
JWKS_MAX_AGE = 600.0
# One deadline for a whole JWKS fetch (connecting, and a server that answers a byte at a time), and a size limit:
# a project's JWKS is a few keys, well under 10 KB.
JWKS_FETCH_SECONDS = 5.0
JWKS_MAX_BYTES = 64 * 1024
# Which JWK key type each asymmetric algorithm needs: a key is only ever used for its own kind.
ASYMMETRIC_KEY_TYPES = {"RS256": "RSA", "ES256": "EC"}
# Verified tokens are remembered (each until its own `exp` and 5 minutes at most) so a page that makes several calls
# pays for one signature check. Bounded in count and in memory: an entry costs its token's length plus about
# VERIFIED_ENTRY_BYTES (measured: the principal, its strings, the dictionary slot), so 20 MiB holds 10,000 tokens
# of 1.4 KB (a typical Supabase token is shorter) or 2,400 of the longest.
VERIFIED_CACHE_SIZE = 10_000
VERIFIED_CACHE_BYTES = 20 * 1024 * 1024
VERIFIED_ENTRY_BYTES = 600
VERIFIED_CACHE_SECONDS = 300.0
# The claims read as times: python-jose turns them into int() itself, and a null, a list or 1e400 would raise there.
TIME_CLAIMS = ("exp", "nbf", "iat")
DEV_SECRET_FILE = "dev-jwt-secret"  # noqa: S105 - a file name, not a secret


@dataclass(frozen=True, slots=True)
class User:
    """A signed-in Supabase user. `email` is absent for phone and anonymous users."""

    id: UUID
    role: str = AUDIENCE
    email: str | None = None
    # Supabase's anonymous sign-in (`is_anonymous`): no signup credits until the account is made permanent.
    anonymous: bool = False


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
    """Access tokens to principals. `jwks_refresh_interval` is the least time between two fetches of the JWKS
    that tokens naming unknown keys can cause."""

    def __init__(
        self,
        settings: Settings,
        http: httpx.AsyncClient | None = None,
        *,
        jwks_refresh_interval: float = JWKS_REFRESH_INTERVAL,
    ) -> None:
        self._hs_secret = hs256_secret(settings)
        self._service_key = (
            settings.supabase_service_role_key.get_secret_value().encode()
            if settings.supabase_service_role_key
            else None
        )
        self._issuer = settings.jwt_issuer
        self._leeway = settings.jwt_leeway_seconds
        self._jwks_url = settings.jwks_url
        self._jwks_refresh_interval = jwks_refresh_interval
        self._static_keys = (
            _usable_keys(json.loads(settings.supabase_jwks), "SUPABASE_JWKS") if settings.supabase_jwks else {}
        )
        self._fetched_keys: dict[str, SigningKey] = {}
        self._last_fetch = float("-inf")
        self._fetch_lock = asyncio.Lock()
        self._verified: OrderedDict[str, tuple[float, Principal]] = OrderedDict()
        self._verified_bytes = 0
        self._http = http or httpx.AsyncClient(timeout=JWKS_FETCH_SECONDS)
        self.algorithms = {"HS256"} if self._hs_secret else set()
        if self._jwks_url or self._static_keys:
            self.algorithms |= set(ASYMMETRIC_KEY_TYPES)

    async def aclose(self) -> None:
        await self._http.aclose()

    def is_service_role_key(self, token: str) -> bool:
        return self._service_key is not None and hmac.compare_digest(token.encode(), self._service_key)

    async def verify(self, token: str) -> Principal:
        if len(token) > MAX_TOKEN_LENGTH:
            raise Unauthorized(f"token too long: at most {MAX_TOKEN_LENGTH} characters")
        now = time.time()
        # Looked up as sent: only a token that passed every check below is ever remembered, so a respelling of one
        # is never found here, and the shape check costs nothing on the hot path.
        cached = self._verified.get(token)
        if cached is not None:
            if now < cached[0]:
                self._verified.move_to_end(token)
                return cached[1]
            self._forget(token)
        principal, expires_at = await self._verify_uncached(token)
        self._remember(token, min(expires_at, now + VERIFIED_CACHE_SECONDS), principal)
        return principal

    def _remember(self, token: str, until: float, principal: Principal) -> None:
        self._forget(token)  # a concurrent request for the same token may have remembered it meanwhile
        self._verified[token] = (until, principal)
        self._verified_bytes += len(token) + VERIFIED_ENTRY_BYTES
        while len(self._verified) > VERIFIED_CACHE_SIZE or self._verified_bytes > VERIFIED_CACHE_BYTES:
            oldest, _ = self._verified.popitem(last=False)
            self._verified_bytes -= len(oldest) + VERIFIED_ENTRY_BYTES

    def _forget(self, token: str) -> None:
        if self._verified.pop(token, None) is not None:
            self._verified_bytes -= len(token) + VERIFIED_ENTRY_BYTES

    async def _verify_uncached(self, token: str) -> tuple[Principal, float]:
        if _JWT_SHAPE.fullmatch(token) is None or not _canonical(token):
            raise Unauthorized("invalid token")
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.get_unverified_claims(token)
        except JWTError:
            raise Unauthorized("invalid token") from None
        if not all(_is_time(unverified[name]) for name in TIME_CLAIMS if name in unverified):
            raise Unauthorized("invalid token")
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in self.algorithms:
            raise Unauthorized("invalid token")
        key: str | Key | None
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
        )

    async def _signing_key(self, kid: Any, algorithm: str) -> Key | None:
        if not isinstance(kid, str):
            return None
        if self._jwks_url and time.monotonic() - self._last_fetch > JWKS_MAX_AGE:
            await self._refresh_jwks()
        key = self._static_keys.get(kid) or self._fetched_keys.get(kid)
        if key is None and self._jwks_url:
            await self._refresh_jwks()
            key = self._fetched_keys.get(kid)
        # Each key was made for one algorithm when it was read (see _usable_keys): never used for another.
        if key is None or key.algorithm != algorithm:
            return None
        return key.key

    async def _refresh_jwks(self) -> None:
        """Refetch the project's JWKS (keys rotate), at most once a minute whatever tokens arrive. A fetch that
        fails or brings no usable key keeps the keys from before: `200 {}` must not sign every user out."""
        assert self._jwks_url is not None
        async with self._fetch_lock:
            if time.monotonic() - self._last_fetch < self._jwks_refresh_interval:
                return
            self._last_fetch = time.monotonic()
            try:
                async with asyncio.timeout(JWKS_FETCH_SECONDS):
                    document = await self._fetch_json(self._jwks_url)
            except (httpx.HTTPError, ValueError, TimeoutError) as exc:
                logger.warning("could not fetch the JWKS from %s: %s", self._jwks_url, type(exc).__name__)
                return
            keys = _usable_keys(document, self._jwks_url)
            if not keys:
                logger.warning(
                    "the JWKS from %s has no usable key: keeping the %d from before",
                    self._jwks_url,
                    len(self._fetched_keys),
                )
                return
            self._fetched_keys = keys

    async def _fetch_json(self, url: str) -> Any:
        async with self._http.stream("GET", url) as response:
            response.raise_for_status()
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > JWKS_MAX_BYTES:
                    raise ValueError(f"larger than {JWKS_MAX_BYTES} bytes")
        return json.loads(body)


def _canonical(token: str) -> bool:
    for part in token.split("."):
        remainder = len(part) % 4
        if remainder and part[-1] not in _CANONICAL_LAST.get(remainder, ""):
            return False
    return True


def _is_time(value: Any) -> bool:
    """A JSON number python-jose can compare with the clock: not a bool, a string, NaN or infinity."""
    return isinstance(value, int | float) and not isinstance(value, bool) and -(2**53) < value < 2**53


@dataclass(frozen=True, slots=True)
class SigningKey:
    algorithm: str
    key: Key


def _usable_keys(jwks: Any, source: str) -> dict[str, SigningKey]:
    """The document's signing keys by `kid`, each made ready for its one algorithm. A key that cannot be used (an
    unknown type, another use, malformed numbers) is left out and logged: a token naming it is then a 401."""
    entries = jwks.get("keys") if isinstance(jwks, dict) else None
    usable: dict[str, SigningKey] = {}
    for entry in entries if isinstance(entries, list) else ():
        if not isinstance(entry, dict) or not isinstance(entry.get("kid"), str):
            continue
        algorithm = next((alg for alg, kty in ASYMMETRIC_KEY_TYPES.items() if entry.get("kty") == kty), None)
        if algorithm is None or entry.get("alg", algorithm) != algorithm or entry.get("use", "sig") != "sig":
            continue
        try:
            usable[entry["kid"]] = SigningKey(algorithm, jwk.construct(entry, algorithm))
        except Exception as exc:  # python-jose and cryptography raise several kinds for malformed key material
            logger.warning(
                "key %r of the JWKS from %s cannot be used: %s", entry["kid"][:64], source, type(exc).__name__
            )
    return usable
