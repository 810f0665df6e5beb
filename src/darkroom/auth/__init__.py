"""API keys, roles, tenants, quotas and rate limits, the audit log."""
