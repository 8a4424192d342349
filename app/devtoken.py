"""Print a development access token, signed like a Supabase one, for /docs and curl.

poetry run dev-token [--user-id UUID] [--email EMAIL] [--hours N]
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid

from jose import jwt

from app.auth import AUDIENCE, hs256_secret
from app.config import load_settings


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dev-token", description=__doc__.splitlines()[0])
    parser.add_argument("--user-id", type=uuid.UUID, default=None, help="the user's id (default: a new one)")
    parser.add_argument("--email", default="dev@example.com", help="the email claim ('' for none)")
    parser.add_argument("--hours", type=float, default=24.0, help="lifetime in hours (default 24)")
    args = parser.parse_args(argv)

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
    user_id = args.user_id or uuid.uuid4()
    token = make_token(secret, user_id, args.email or None, args.hours, settings.jwt_issuer)
    print(token)
    print(f"# user {user_id}; use: curl -H 'Authorization: Bearer <token>' ...", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
