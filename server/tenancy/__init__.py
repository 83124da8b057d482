"""Tenants share the server: limits and their rate limiter, usage metering (the scheduler does fair share)."""
