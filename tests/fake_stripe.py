"""A local fake of Stripe's API: answers the calls the app makes and records every request."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl

SECRET_KEY = "sk_test_picads_fake_key"
WEBHOOK_SECRET = "whsec_test_picads_webhook_secret"
FRONTEND = "https://app.example.com"
PACK = "price_pack_starter"
PLAN = "price_plan_pro"
HUGE_PACK = "price_pack_big"  # the most credits one price may grant
CATALOGUE = {
    "credit_packs": {
        PACK: {"name": "Starter pack", "credits": 500},
        HUGE_PACK: {"name": "Agency pack", "credits": 1_000_000},
    },
    "subscription_plans": {PLAN: {"name": "Pro monthly", "credits": 2000}},
}


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    form: dict[str, str]


@dataclass
class FakeStripe:
    """Answers the three calls the API makes and records every request; `failure` makes it answer an error."""

    url: str = ""
    requests: list[Recorded] = field(default_factory=list)
    failure: tuple[int, dict[str, Any]] | None = None
    fail_path: str | None = None
    delay: float = 0.0  # seconds before answering: a slow Stripe
    # Like Stripe, a request repeating an idempotency key gets the first answer again.
    answered: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)

    def answer(self, recorded: Recorded) -> tuple[int, dict[str, Any]]:
        if self.failure and (self.fail_path is None or self.fail_path == recorded.path):
            return self.failure
        key = recorded.headers.get("idempotency-key", "")
        if key not in self.answered:
            self.answered[key] = self.create(recorded)
        return self.answered[key]

    def create(self, recorded: Recorded) -> tuple[int, dict[str, Any]]:
        number = len(self.answered)
        if recorded.path == "/v1/customers":
            return 200, {"id": f"cus_test_{number}", "object": "customer", "email": recorded.form.get("email")}
        if recorded.path == "/v1/checkout/sessions":
            session_id = f"cs_test_{number}"
            return 200, {
                "id": session_id,
                "object": "checkout.session",
                "mode": recorded.form["mode"],
                "url": f"https://checkout.stripe.com/c/pay/{session_id}",
            }
        if recorded.path == "/v1/billing_portal/sessions":
            return 200, {
                "id": f"bps_test_{number}",
                "object": "billing_portal.session",
                "url": "https://billing.example/p",
            }
        return 404, {"error": {"type": "invalid_request_error", "message": f"Unrecognized request URL {recorded.path}"}}


def start_fake_stripe(fake: FakeStripe) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
            recorded = Recorded(
                "POST", self.path, {k.lower(): v for k, v in self.headers.items()}, dict(parse_qsl(body))
            )
            fake.requests.append(recorded)
            time.sleep(fake.delay)
            status, payload = fake.answer(recorded)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Request-Id", f"req_test_{len(fake.requests)}")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
