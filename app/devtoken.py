"""Print a development access token, signed like a Supabase one, for /docs and curl.

poetry run dev-token [--email EMAIL] [--user-id UUID | --new] [--hours N] [--json]
poetry run dev-token --service-role [--hours N] [--json]

The same email always gives the same user id (so a second terminal is the same user); --user-id names one,
--new makes a new one. --json prints {"token", "user_id", "email", "role", "expires_at"} for scripts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid

from jose import jwt

from app.auth import AUDIENCE, SERVICE_ROLE, hs256_secret
from app.config import load_settings

# Any fixed namespace: development user ids derive from the email within it.
DEV_USER_NAMESPACE = uuid.UUID("5b0c3f2e-6a0d-4c52-9a7e-0f1d2c3b4a59")


def dev_user_id(email: str | None) -> uuid.UUID:
    return uuid.uuid5(DEV_USER_NAMESPACE, (email or "").strip().lower())


def make_token(secret: str, user_id: uuid.UUID, email: str | None, hours: float, issuer: str | None) -> str:
    now = int(time.time())
    claims: dict[str, object] = {
        "sub": str(user_id),
        "aud": AUDIENCE,
        "role": AUDIENCE,
        "iat": now,
        "exp": now + int(hours * 3600),
    }
    if email:
        claims["email"] = email
    if issuer:
        claims["iss"] = issuer
    return jwt.encode(claims, secret, algorithm="HS256")


def make_service_token(secret: str, hours: float) -> str:
    """A JWT whose role is service_role, like Supabase's legacy service-role key: the admin routes accept it."""
    now = int(time.time())
    claims = {"role": SERVICE_ROLE, "iss": "supabase", "iat": now, "exp": now + int(hours * 3600)}
    return jwt.encode(claims, secret, algorithm="HS256")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dev-token", description=__doc__.splitlines()[0])
    parser.add_argument("--email", default="dev@example.com", help="the email claim ('' for none)")
    who = parser.add_mutually_exclusive_group()
    who.add_argument("--user-id", type=uuid.UUID, default=None, help="the user's id (default: one per email)")
    who.add_argument("--new", action="store_true", help="a new user id, not the email's")
    who.add_argument("--service-role", action="store_true", help="a service-role token, for the admin routes")
    parser.add_argument("--hours", type=float, default=24.0, help="lifetime in hours (default 24)")
    parser.add_argument("--json", action="store_true", help="print JSON with the token and the user id")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = load_settings()
    if settings.is_production:
        print("dev-token refuses to run with ENVIRONMENT=production", file=sys.stderr)
        return 2
    secret = hs256_secret(settings)
    if secret is None:
        print(
            "no HS256 secret: this project verifies tokens with its Supabase JWKS, so sign in through Supabase "
            "(or set SUPABASE_JWT_SECRET)",
            file=sys.stderr,
        )
        return 2
    user_id: uuid.UUID | None = None
    email: str | None = None
    if args.service_role:
        token, role = make_service_token(secret, args.hours), SERVICE_ROLE
    else:
        email = args.email or None
        user_id = args.user_id or (uuid.uuid4() if args.new else dev_user_id(email))
        token, role = make_token(secret, user_id, email, args.hours, settings.jwt_issuer), AUDIENCE
    if args.json:
        expires_at = int(time.time() + args.hours * 3600)
        user = str(user_id) if user_id else None
        print(json.dumps({"token": token, "user_id": user, "email": email, "role": role, "expires_at": expires_at}))
        return 0
    print(token)
    who = f"user {user_id}" if user_id else "the service role"
    print(f"# {who}; use: curl -H 'Authorization: Bearer <token>' ...", file=sys.stderr)
    return 0


def cli() -> int:
    """`poetry run dev-token`: from anywhere in the checkout, with the checkout's .env, like the other commands."""
    from app.scripts import enter_project

    return main(enter_project())


if __name__ == "__main__":
    sys.exit(main())
