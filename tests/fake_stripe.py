"""A local fake of Stripe's API: answers the calls the app makes from what a test put in it, and records every
request. It holds objects as Stripe would (subscriptions, invoices, checkout sessions, invoice payments, events)
and answers GETs for them, expansions and list filters included, in the pinned API version's shapes."""

from __future__ import annotations

import copy
import itertools
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

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
MISSING = 404, {"error": {"type": "invalid_request_error", "code": "resource_missing", "message": "No such object"}}


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    form: dict[str, str]


@dataclass
class FakeStripe:
    url: str = ""
    requests: list[Recorded] = field(default_factory=list)
    # An error answered instead (to requests for `fail_path` only, when set).
    failure: tuple[int, dict[str, Any]] | None = None
    fail_path: str | None = None
    delay: float = 0.0  # seconds before answering: a slow Stripe
    # Like Stripe, a request repeating an idempotency key gets the first answer again.
    answered: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    # What Stripe holds now, by id.
    subscriptions: dict[str, dict[str, Any]] = field(default_factory=dict)
    invoices: dict[str, dict[str, Any]] = field(default_factory=dict)
    checkout_sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    invoice_payments: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    serial: Iterator[int] = field(default_factory=itertools.count)  # ids of created objects

    def reset(self) -> None:
        for store in (self.requests, self.invoice_payments, self.events):
            store.clear()
        for table in (self.answered, self.subscriptions, self.invoices, self.checkout_sessions):
            table.clear()
        self.failure, self.fail_path, self.delay = None, None, 0.0
        self.serial = itertools.count()

    def holds(self, *objects: dict[str, Any]) -> None:
        """Make Stripe's current state of these objects what they say."""
        for obj in objects:
            store = {"subscription": self.subscriptions, "invoice": self.invoices}[obj["object"]]
            store[obj["id"]] = copy.deepcopy(obj)

    def pays(self, invoice_id: str, payment_intent: str, amount: int) -> None:
        """An invoice payment, as Stripe lists it since 2025-03-31."""
        self.invoice_payments.append(
            {
                "id": f"inpay_{payment_intent}",
                "object": "invoice_payment",
                "invoice": invoice_id,
                "amount_paid": amount,
                "currency": "usd",
                "status": "paid",
                "payment": {"type": "payment_intent", "payment_intent": payment_intent},
            }
        )

    def answer(self, recorded: Recorded) -> tuple[int, dict[str, Any]]:
        if self.failure and (self.fail_path is None or self.fail_path == recorded.path):
            return self.failure
        if recorded.method == "GET":
            return self.read(recorded.path, recorded.form)
        key = recorded.headers.get("idempotency-key", "")
        if not key or key not in self.answered:
            answered = self.create(recorded)
            if key:
                self.answered[key] = answered
            return answered
        return self.answered[key]

    def create(self, recorded: Recorded) -> tuple[int, dict[str, Any]]:
        number = next(self.serial)
        form = recorded.form
        if recorded.path == "/v1/customers":
            return 200, {"id": f"cus_test_{number}", "object": "customer", "email": form.get("email")}
        if recorded.path == "/v1/checkout/sessions":
            session_id = f"cs_test_{number}"
            metadata = {key[9:-1]: value for key, value in form.items() if key.startswith("metadata[")}
            session = {
                "id": session_id,
                "object": "checkout.session",
                "mode": form["mode"],
                "customer": form.get("customer"),
                "metadata": metadata,
                "payment_intent": None,
                "url": f"https://checkout.stripe.com/c/pay/{session_id}",
            }
            self.checkout_sessions[session_id] = session
            return 200, session
        if recorded.path == "/v1/billing_portal/sessions":
            return 200, {
                "id": f"bps_test_{number}",
                "object": "billing_portal.session",
                "url": "https://billing.example/p",
            }
        return 404, {"error": {"type": "invalid_request_error", "message": f"Unrecognized request URL {recorded.path}"}}

    def read(self, path: str, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        kind, _, object_id = path.removeprefix("/v1/").partition("/")
        expand = {value for key, value in query.items() if key.startswith("expand[")}
        if kind == "subscriptions" and object_id:
            found = self.subscriptions.get(object_id)
            return (200, found) if found else MISSING
        if kind == "invoices" and object_id:
            return self.read_invoice(object_id, expand)
        if kind == "events":
            return self.read_events(object_id, query)
        if path == "/v1/checkout/sessions":
            wanted = query.get("payment_intent")
            return 200, listed(s for s in self.checkout_sessions.values() if s.get("payment_intent") == wanted)
        if path == "/v1/invoice_payments":
            wanted = query.get("payment[payment_intent]")
            payments = [copy.deepcopy(p) for p in self.invoice_payments if p["payment"]["payment_intent"] == wanted]
            if "data.invoice" in expand:
                for payment in payments:
                    payment["invoice"] = self.invoices.get(payment["invoice"], {"id": payment["invoice"]})
            return 200, listed(payments)
        return 404, {"error": {"type": "invalid_request_error", "message": f"Unrecognized request URL {path}"}}

    def read_invoice(self, invoice_id: str, expand: set[str]) -> tuple[int, dict[str, Any]]:
        found = copy.deepcopy(self.invoices.get(invoice_id))
        if found is None:
            return MISSING
        if "payments" in expand:
            found["payments"] = listed(p for p in self.invoice_payments if p["invoice"] == invoice_id)
        details = (found.get("parent") or {}).get("subscription_details")
        if "parent.subscription_details.subscription" in expand and details and details.get("subscription"):
            details["subscription"] = self.subscriptions.get(details["subscription"], details["subscription"])
        return 200, found

    def read_events(self, event_id: str, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if event_id:
            found = next((event for event in self.events if event["id"] == event_id), None)
            return (200, found) if found else MISSING
        types = {value for key, value in query.items() if key.startswith("types[")}
        since = int(query.get("created[gte]", "0"))
        newest_first = sorted(self.events, key=lambda event: event["created"], reverse=True)
        chosen = [e for e in newest_first if e["created"] >= since and (not types or e["type"] in types)]
        after = query.get("starting_after")
        if after:
            index = next(i for i, event in enumerate(chosen) if event["id"] == after)
            chosen = chosen[index + 1 :]
        limit = int(query.get("limit", "10"))
        page = listed(chosen[:limit])
        page["has_more"] = len(chosen) > limit
        return 200, page


def listed(items: Any) -> dict[str, Any]:
    return {"object": "list", "data": list(items), "has_more": False, "url": "/v1/list"}


def start_fake_stripe(fake: FakeStripe) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            self.respond(Recorded("GET", parts.path, self.lower_headers(), dict(parse_qsl(parts.query))))

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
            self.respond(Recorded("POST", self.path, self.lower_headers(), dict(parse_qsl(body))))

        def lower_headers(self) -> dict[str, str]:
            return {key.lower(): value for key, value in self.headers.items()}

        def respond(self, recorded: Recorded) -> None:
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
