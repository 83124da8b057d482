"""The target guard: loopback URLs only, and no request ever leaves the URL given (no redirects elsewhere)."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx


class TargetError(ValueError):
    """A target the harness refuses to load."""


@dataclass(frozen=True)
class Target:
    """A checked base URL: scheme, host and port that every request must keep."""

    scheme: str
    host: str
    port: int
    base_path: str

    @property
    def base_url(self) -> str:
        """The URL requests are built on."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}{self.base_path}"


def is_loopback(host: str) -> bool:
    """True when `host` is a loopback address, or a name that resolves only to loopback addresses."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def check_target(url: str) -> Target:
    """Parse and check `url`; raise TargetError unless it is http(s) on a loopback host."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise TargetError(f"only http:// or https:// targets, not {url!r}")
    if not parts.hostname:
        raise TargetError(f"no host in {url!r}")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise TargetError("the target URL may not carry credentials, a query or a fragment")
    if not is_loopback(parts.hostname):
        raise TargetError(f"refusing {parts.hostname!r}: the load tester only targets loopback addresses")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return Target(parts.scheme, parts.hostname, port, parts.path.rstrip("/"))


def make_client(target: Target, *, max_connections: int, timeout_s: float, api_key: str | None) -> httpx.AsyncClient:
    """An AsyncClient that never follows redirects and refuses any URL off the target."""

    async def guard(request: httpx.Request) -> None:
        url = request.url
        if (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80)) != (
                target.scheme, target.host.strip("[]"), target.port):
            raise TargetError(f"refusing a request to {url} (off the target {target.base_url})")

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.AsyncClient(
        base_url=target.base_url,
        headers=headers,
        follow_redirects=False,
        timeout=httpx.Timeout(timeout_s, connect=min(10.0, timeout_s)),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        event_hooks={"request": [guard]},
        trust_env=False,  # no proxies from the environment: loopback means loopback
    )
