"""The loud warning of a server that anyone on the network can administer: no API keys, not on loopback."""

from __future__ import annotations

import ipaddress
import logging

log = logging.getLogger("promptserve")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and `localhost`: only this machine can connect."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any address
        return False


def warn_if_open(host: str, has_keys: bool) -> bool:
    """Log a warning when the server listens beyond loopback without keys; True if it did."""
    if has_keys or is_loopback(host):
        return False
    log.warning("SECURITY: listening on %s with no API keys: anyone who can reach this port may run, create, "
                "replace and delete every task, train jobs and read all usage. Pass --api-keys FILE "
                "(PROMPTSERVE_API_KEYS), or bind 127.0.0.1 behind a proxy that authenticates.", host)
    return True
