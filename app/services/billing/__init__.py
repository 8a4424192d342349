"""Stripe billing: checkout and the portal (checkout), the webhook's signature check and exactly-once dispatch
(webhook), what each event does (handlers), the payloads we read (payloads) and the pure rules (rules)."""
