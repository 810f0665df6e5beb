"""HTTP API: app factory, routers, error mapping. Never imports torch."""
