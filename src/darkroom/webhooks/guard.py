"""SSRF guard: a webhook URL is called only if every address its host resolves to is public, or allow-listed.

The check resolves the name itself and the request then goes to the vetted address (with the original Host header
and TLS server name), so a DNS answer that changes between check and connect (rebinding) cannot redirect it.
Redirects are never followed for the same reason.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]


class WebhookRefused(Exception):
    """The URL may not be called (scheme, unresolvable host, or a non-public address that is not allow-listed)."""


@dataclass(frozen=True)
class Target:
    url: str
    host: str
    port: int
    scheme: str
    address: str  # the vetted IP the request goes to


@dataclass(frozen=True)
class AllowList:
    hosts: frozenset[str]
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

    @classmethod
    def parse(cls, entries: list[str]) -> AllowList:
        hosts, networks = set(), []
        for entry in (e.strip().lower() for e in entries):
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.add(entry.rstrip("."))
        return cls(frozenset(hosts), tuple(networks))

    def allows_address(self, ip: IPAddress) -> bool:
        return any(ip.version == net.version and ip in net for net in self.networks)


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def is_public(ip: IPAddress) -> bool:
    """Public unicast only: excludes private, loopback, link-local (cloud metadata at 169.254.169.254), CGNAT,
    reserved, unspecified and multicast ranges. An IPv4-mapped IPv6 address is judged as its IPv4 address."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def check(url: str, allow: AllowList, resolve: Resolver = system_resolver) -> Target:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise WebhookRefused(f"scheme {parts.scheme!r} is not http or https")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise WebhookRefused("the URL has no host")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise WebhookRefused("the URL's port is not valid") from None
    try:
        addresses = [ipaddress.ip_address(a.split("%")[0]) for a in resolve(host, port)]
    except (OSError, ValueError) as exc:
        raise WebhookRefused(f"cannot resolve {host}: {exc}") from None
    if not addresses:
        raise WebhookRefused(f"{host} resolves to no address")
    if host not in allow.hosts:
        for ip in addresses:
            if not is_public(ip) and not allow.allows_address(ip):
                raise WebhookRefused(
                    f"{host} resolves to {ip}, a non-public address; allow it with DARKROOM_WEBHOOKS__ALLOW_HOSTS"
                )
    return Target(url=url, host=host, port=port, scheme=parts.scheme, address=str(addresses[0]))
