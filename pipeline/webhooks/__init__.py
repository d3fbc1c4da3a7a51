"""Outgoing webhooks: endpoints, signed deliveries with retries, the SSRF guard."""
