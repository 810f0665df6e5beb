"""Webhooks: signed job-event deliveries with retries, an SSRF guard and a per-job delivery log."""
