"""Token verification: HS256 with the project secret, ES256/RS256 from a JWKS served over HTTP."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import string
import threading
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jose import jwk
from sqlalchemy.engine import URL

from app.application import create_app
from app.auth import TokenVerifier, User
from app.errors import Unauthorized
from tests.conftest import TEST_SERVICE_ROLE_KEY, bearer, make_settings, sign, user_claims


def _pem(private_key: Any, private: bool) -> bytes:
    if private:
        return private_key.private_bytes(  # type: ignore[no-any-return]
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    return private_key.public_key().public_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class Keys:
    """An ES256 and an RS256 signing key, published as a Supabase project publishes its JWKS."""

    def __init__(self) -> None:
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.jwks = {
            "keys": [
                {**jwk.construct(_pem(self.ec, False), "ES256").to_dict(), "kid": "ec-1", "use": "sig"},
                {**jwk.construct(_pem(self.rsa, False), "RS256").to_dict(), "kid": "rsa-1", "use": "sig"},
            ]
        }
        self.requests = 0


class JwksServer:
    def __init__(self, keys: Keys) -> None:
        outer = self
        # What a misbehaving JWKS endpoint sends instead of the keys, and a pause before each of its bytes.
        self.answer: bytes | None = None
        self.drip_seconds = 0.0
        self.stopped = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.keys.requests += 1
                if self.path != "/auth/v1/.well-known/jwks.json":
                    self.send_error(404)
                    return
                body = outer.answer if outer.answer is not None else json.dumps(outer.keys.jwks).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not outer.drip_seconds:
                    self.wfile.write(body)
                    return
                for index in range(len(body)):  # one byte at a time, until the test ends
                    if outer.stopped.wait(outer.drip_seconds):
                        return
                    self.wfile.write(body[index : index + 1])
                    self.wfile.flush()

            def log_message(self, *args: Any) -> None:
                pass

        self.keys = keys
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


@pytest.fixture(scope="module")
def jwks_server(keys: Keys) -> Iterator[JwksServer]:
    server = JwksServer(keys)
    server.thread.start()
    yield server
    server.stopped.set()
    server.server.shutdown()


@pytest.fixture
def misbehaving_jwks(keys: Keys) -> Iterator[JwksServer]:
    """A JWKS endpoint of the test's own, told by the test what to answer."""
    server = JwksServer(keys)
    server.thread.start()
    yield server
    server.stopped.set()
    server.server.shutdown()


@asynccontextmanager
async def served_with(database_url: URL, tmp_path: Path, server: JwksServer) -> AsyncIterator[httpx.AsyncClient]:
    """An app configured like a current Supabase project: SUPABASE_URL (JWKS), no JWT secret."""
    settings = make_settings(database_url, tmp_path, supabase_url=server.url, supabase_jwt_secret=None)
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            yield http


@pytest.fixture
async def jwks_client(database_url: URL, tmp_path: Path, jwks_server: JwksServer) -> AsyncIterator[httpx.AsyncClient]:
    async with served_with(database_url, tmp_path, jwks_server) as http:
        yield http


def issued_by(server: JwksServer, **overrides: Any) -> dict[str, Any]:
    return user_claims(iss=f"{server.url}/auth/v1", **overrides)


async def test_valid_hs256_token(client: httpx.AsyncClient) -> None:
    user_id = uuid.uuid4()
    response = await client.get("/public-data", headers=bearer(sign(user_claims(user_id))))
    assert response.status_code == 200
    assert response.json()["user_id"] == str(user_id)


async def test_token_without_email_is_accepted(client: httpx.AsyncClient) -> None:
    token = sign(user_claims(email=None, phone="+15555550100"))
    response = await client.get("/dashboard", headers=bearer(token))
    assert response.status_code == 200
    assert response.json()["user"]["email"] is None


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"exp": int(time.time()) - 3600}, "token expired"),
        ({"nbf": int(time.time()) + 3600}, "invalid token"),
        ({"aud": "anon"}, "invalid token"),
        ({"aud": None}, "invalid token"),
        ({"sub": "not-a-uuid"}, "invalid token"),
        ({"sub": None}, "invalid token"),
        ({"exp": None}, "invalid token"),
    ],
    ids=["expired", "not-yet-valid", "wrong-audience", "no-audience", "sub-not-uuid", "no-sub", "no-exp"],
)
async def test_bad_claims_are_401(client: httpx.AsyncClient, claims: dict[str, Any], reason: str) -> None:
    response = await client.get("/profile", headers=bearer(sign(user_claims(**claims))))
    assert response.status_code == 401
    assert response.json() == {"detail": reason}
    assert response.headers["www-authenticate"] == "Bearer"


def _b64(value: bytes) -> str:
    return base64.urlsafe_b64encode(value).rstrip(b"=").decode()


def _unsigned(claims: dict[str, Any]) -> str:
    header = {"alg": "none", "typ": "JWT"}
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}."


def _hmac_with(key: bytes, claims: dict[str, Any], kid: str) -> str:
    """HS256 signed with arbitrary bytes (libraries refuse a public key as an HMAC secret; attackers don't)."""
    header = {"alg": "HS256", "typ": "JWT", "kid": kid}
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


@pytest.mark.parametrize(
    "token",
    [
        sign(user_claims(), key="another-secret-of-the-same-length-xxxxxxxxxxxx"),
        _unsigned(user_claims()),
        "not.a.token",
        "garbage",
        sign(user_claims())[:-4] + "AAAA",
        sign(user_claims(), algorithm="HS512"),
    ],
    ids=["wrong-secret", "alg-none", "malformed", "not-a-jwt", "tampered-signature", "hs512"],
)
async def test_bad_tokens_are_401(client: httpx.AsyncClient, token: str) -> None:
    response = await client.get("/profile", headers=bearer(token))
    assert response.status_code == 401
    assert response.json() == {"detail": "invalid token"}


_BASE64URL = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"


def _respelt(token: str) -> str:
    """The same token to a lenient decoder: the last character's unused low bit set (an HS256 signature is 43
    characters, so its last one carries 2 unused bits)."""
    return token[:-1] + _BASE64URL[_BASE64URL.index(token[-1]) ^ 1]


async def test_a_token_is_accepted_in_its_one_spelling_only(client: httpx.AsyncClient) -> None:
    """python-jose skips what is not base64url and ignores unused bits: each respelling would be a new cache entry."""
    token = sign(user_claims())
    assert (await client.get("/public-data", headers=bearer(token))).status_code == 200
    respellings = {
        "junk appended": token + "!!!!",
        "lots of junk appended": token + "!" * 4_000,
        "junk inside": token.replace(".", "!.", 1),
        "padding": token + "=",
        "unused bits set": _respelt(token),
    }
    for name, respelt in respellings.items():
        response = await client.get("/public-data", headers=bearer(respelt))
        assert response.status_code == 401, name
        assert response.json() == {"detail": "invalid token"}, name


async def test_tokens_longer_than_supabase_issues_are_refused(client: httpx.AsyncClient) -> None:
    big_but_possible = sign(user_claims(user_metadata={"bio": "x" * 5_500}))  # about 7,800 characters
    assert len(big_but_possible) < 8_192
    assert (await client.get("/public-data", headers=bearer(big_but_possible))).status_code == 200
    for too_long in (sign(user_claims(user_metadata={"bio": "x" * 6_500})), "x" * 20_000):
        response = await client.get("/public-data", headers=bearer(too_long))
        assert response.status_code == 401
        assert response.json() == {"detail": "token too long: at most 8192 characters"}
        assert response.headers["www-authenticate"] == "Bearer"


async def test_the_verified_token_cache_is_bounded_in_memory(database_url: URL, tmp_path: Path) -> None:
    """4,000 distinct valid tokens of 7.8 KB, fewer than the cache's count (10,000): its memory bound applies first.
    The verifier on its own, so that nothing but what it keeps is measured (each token made inside the measure
    and kept by nothing else)."""
    verifier = TokenVerifier(make_settings(database_url, tmp_path))
    user = uuid.uuid4()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for number in range(4_000):
            await verifier.verify(sign(user_claims(user, jti=str(number), user_metadata={"bio": "x" * 5_500})))
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        await verifier.aclose()
    assert kept < 22 * 1024 * 1024, f"{kept / 1024 / 1024:.0f} MiB kept"  # 20 MiB, and the allocator's slack


@pytest.mark.parametrize(
    "claims",
    [
        {"exp": None},
        {"exp": "9999999999"},
        {"exp": "soon"},
        {"exp": [9999999999]},
        {"exp": True},
        {"exp": float("inf")},
        {"nbf": None},
        {"iat": {"at": 1}},
    ],
    ids=[
        "exp-null",
        "exp-numeric-string",
        "exp-string",
        "exp-list",
        "exp-true",
        "exp-infinite",
        "nbf-null",
        "iat-object",
    ],
)
async def test_times_that_are_not_numbers_are_401(client: httpx.AsyncClient, claims: dict[str, Any]) -> None:
    response = await client.get("/profile", headers=bearer(sign({**user_claims(), **claims})))
    assert response.status_code == 401
    assert response.json() == {"detail": "invalid token"}


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer    ", "token abc"])
async def test_malformed_authorization_header_is_401(client: httpx.AsyncClient, header: str) -> None:
    response = await client.get("/public-data", headers={"Authorization": header})
    assert response.status_code == 401


async def test_missing_token_is_401(client: httpx.AsyncClient) -> None:
    response = await client.get("/profile")
    assert response.status_code == 401
    assert response.json() == {"detail": "missing bearer token"}
    assert response.headers["www-authenticate"] == "Bearer"


async def test_service_role_key_and_service_role_jwt(client: httpx.AsyncClient) -> None:
    by_key = await client.get("/public-data", headers=bearer(TEST_SERVICE_ROLE_KEY))
    assert by_key.json()["role"] == "service_role"
    # The legacy service-role key: HS256, iss "supabase", no aud, no sub.
    legacy = sign({"iss": "supabase", "role": "service_role", "iat": 1, "exp": int(time.time()) + 60})
    by_jwt = await client.get("/public-data", headers=bearer(legacy))
    assert by_jwt.json()["role"] == "service_role"
    almost = await client.get("/public-data", headers=bearer(TEST_SERVICE_ROLE_KEY + "x"))
    assert almost.status_code == 401


@pytest.mark.parametrize("algorithm", ["ES256", "RS256"])
async def test_valid_asymmetric_tokens(
    jwks_client: httpx.AsyncClient, jwks_server: JwksServer, keys: Keys, algorithm: str
) -> None:
    private, kid = (keys.ec, "ec-1") if algorithm == "ES256" else (keys.rsa, "rsa-1")
    user_id = uuid.uuid4()
    token = sign(issued_by(jwks_server, sub=str(user_id)), _pem(private, True), algorithm, kid=kid)
    response = await jwks_client.post("/profile", headers=bearer(token))
    assert response.status_code == 201
    assert response.json()["id"] == str(user_id)


async def test_asymmetric_token_matrix(jwks_client: httpx.AsyncClient, jwks_server: JwksServer, keys: Keys) -> None:
    ec_private = _pem(keys.ec, True)
    rsa_public = _pem(keys.rsa, False)
    other_ec = _pem(ec.generate_private_key(ec.SECP256R1()), True)
    cases = {
        "wrong issuer": sign(user_claims(iss="https://evil.example/auth/v1"), ec_private, "ES256", kid="ec-1"),
        "no issuer": sign(user_claims(), ec_private, "ES256", kid="ec-1"),
        "unknown kid": sign(issued_by(jwks_server), ec_private, "ES256", kid="nope"),
        "no kid": sign(issued_by(jwks_server), ec_private, "ES256"),
        "key of another kind": sign(issued_by(jwks_server), ec_private, "ES256", kid="rsa-1"),
        "signed by a stranger": sign(issued_by(jwks_server), other_ec, "ES256", kid="ec-1"),
        # The classic confusion attack: HS256 with the published public key as the HMAC secret.
        "hs256 with the public key": _hmac_with(rsa_public, issued_by(jwks_server), "rsa-1"),
        "hs256 without a secret": sign(issued_by(jwks_server)),
        "alg none": _unsigned(issued_by(jwks_server)),
    }
    for name, bad in cases.items():
        response = await jwks_client.get("/public-data", headers=bearer(bad))
        assert response.status_code == 401, name


async def test_jwks_is_cached_and_refetched_at_most_once_a_minute(
    jwks_client: httpx.AsyncClient, jwks_server: JwksServer, keys: Keys
) -> None:
    ec_private = _pem(keys.ec, True)
    good = sign(issued_by(jwks_server), ec_private, "ES256", kid="ec-1")
    before = keys.requests
    for _ in range(3):
        assert (await jwks_client.get("/public-data", headers=bearer(good))).status_code == 200
    assert keys.requests - before == 1
    unknown = sign(issued_by(jwks_server), ec_private, "ES256", kid="rotated-later")
    for _ in range(5):
        assert (await jwks_client.get("/public-data", headers=bearer(unknown))).status_code == 401
    assert keys.requests - before == 1


async def test_static_jwks_setting_works_offline(database_url: URL, tmp_path: Path, keys: Keys) -> None:
    settings = make_settings(database_url, tmp_path, supabase_jwt_secret=None, supabase_jwks=json.dumps(keys.jwks))
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            token = sign(user_claims(), _pem(keys.rsa, True), "RS256", kid="rsa-1")
            assert (await http.get("/public-data", headers=bearer(token))).json()["authenticated"] is True
            assert (await http.get("/public-data", headers=bearer(sign(user_claims())))).status_code == 401


async def test_a_remembered_token_still_expires(database_url: URL, tmp_path: Path) -> None:
    application = create_app(make_settings(database_url, tmp_path, jwt_leeway_seconds=0))
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            token = bearer(sign(user_claims(exp=int(time.time()) + 1)))
            assert (await http.get("/public-data", headers=token)).status_code == 200
            assert (await http.get("/public-data", headers=token)).status_code == 200
            await asyncio.sleep(2.1 - (time.time() % 1))
            expired = await http.get("/public-data", headers=token)
            assert expired.status_code == 401
            assert expired.json() == {"detail": "token expired"}


# --- A JWKS endpoint that misbehaves ---------------------------------------------------------------------------


async def test_a_malformed_key_is_401_not_500(
    database_url: URL, tmp_path: Path, keys: Keys, misbehaving_jwks: JwksServer
) -> None:
    broken = {"kty": "EC", "crv": "P-256", "x": "AAAA", "y": "AAAA", "kid": "broken", "use": "sig"}
    misbehaving_jwks.answer = json.dumps({"keys": [*keys.jwks["keys"], broken]}).encode()
    ec_private = _pem(keys.ec, True)
    async with served_with(database_url, tmp_path, misbehaving_jwks) as http:
        naming_it = sign(issued_by(misbehaving_jwks), ec_private, "ES256", kid="broken")
        response = await http.get("/public-data", headers=bearer(naming_it))
        assert response.status_code == 401
        assert response.json() == {"detail": "invalid token"}
        good = sign(issued_by(misbehaving_jwks), ec_private, "ES256", kid="ec-1")
        assert (await http.get("/public-data", headers=bearer(good))).status_code == 200


async def test_a_dripping_jwks_server_holds_a_request_for_one_deadline_at_most(
    database_url: URL, tmp_path: Path, keys: Keys, misbehaving_jwks: JwksServer
) -> None:
    misbehaving_jwks.drip_seconds = 0.5  # each read gets a byte in time; the whole answer takes minutes
    token = sign(issued_by(misbehaving_jwks), _pem(keys.ec, True), "ES256", kid="ec-1")
    async with served_with(database_url, tmp_path, misbehaving_jwks) as http:
        started = time.monotonic()
        response = await asyncio.wait_for(http.get("/public-data", headers=bearer(token)), 15)
        waited = time.monotonic() - started
    assert response.status_code == 401
    assert waited < 7, f"held for {waited:.1f}s"


async def test_a_jwks_answer_without_usable_keys_keeps_the_keys_from_before(
    database_url: URL, tmp_path: Path, keys: Keys, misbehaving_jwks: JwksServer
) -> None:
    """The verifier on its own, refetching whenever asked (the app allows it once a minute): a `200 {}` used to
    replace every key, and any token naming an unknown key makes it refetch."""
    settings = make_settings(database_url, tmp_path, supabase_url=misbehaving_jwks.url, supabase_jwt_secret=None)
    verifier = TokenVerifier(settings, jwks_refresh_interval=0)
    ec_private = _pem(keys.ec, True)

    def fresh(kid: str) -> str:  # never seen before, so never answered from the cache of verified tokens
        return sign(issued_by(misbehaving_jwks, jti=str(uuid.uuid4())), ec_private, "ES256", kid=kid)

    try:
        assert isinstance(await verifier.verify(fresh("ec-1")), User)
        unusable = [b"{}", b'{"keys": []}', b'{"keys": [{"kid": "ec-1", "kty": "EC", "x": "AAAA"}]}', b"<html>"]
        for answer in unusable:
            misbehaving_jwks.answer = answer
            with pytest.raises(Unauthorized):
                await verifier.verify(fresh("rotated-or-random"))
            assert isinstance(await verifier.verify(fresh("ec-1")), User), answer
    finally:
        await verifier.aclose()
