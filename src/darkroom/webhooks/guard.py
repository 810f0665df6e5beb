"""SSRF guard: a webhook URL is called only if it is well formed and every address its host resolves to is public,
or allow-listed.

Two layers, because a webhook URL is attacker-controlled text that the server later connects to:
1. `validate_url`, at submit and again before each send: http(s) only, no control characters, NUL or whitespace
   (PostgreSQL cannot store NUL, and a row it refuses must never reach the delivery log), no userinfo
   (`http://good.example@10.0.0.1/`), a host in plain form (no decimal, octal or hex IPv4 spellings that resolvers
   read as addresses), a valid port, a length cap.
2. `check`, before each send: the host is resolved here and the request then goes to the vetted address (with the
   original Host header and TLS server name), so a DNS answer that changes between check and connect (rebinding)
   cannot redirect it. Redirects are never followed for the same reason.

"Public" is judged on the address the socket would reach: IPv6 forms that embed an IPv4 address (mapped, 6to4,
NAT64) are judged by that IPv4 address; deprecated or translation-only forms (IPv4-compatible `::a.b.c.d`, SIIT
`::ffff:0:a.b.c.d`, Teredo, site-local `fec0::/10`) are refused outright. Python 3.11's `is_global` calls most of
these global, so the checks are explicit.

Refusal messages name the URL's host and a generic reason, never what the server's resolver answered: the delivery
log is shown to the user who chose the URL, and DNS answers from inside the network are not theirs to read.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]

MAX_URL_CHARS = 2000
_LABEL = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
_HOST_NAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")
_BAD_CHARS = re.compile(r"[\x00-\x20\x7f-\x9f\\]")  # controls (NUL included), space, DEL, C1 controls, backslash

_IPV6_REFUSED = tuple(
    ipaddress.IPv6Network(n)
    for n in (
        "::/96",  # IPv4-compatible (deprecated): ::127.0.0.1
        "::ffff:0:0:0/96",  # SIIT IPv4-translated: ::ffff:0:a.b.c.d
        "2001::/32",  # Teredo
        "fec0::/10",  # site-local (deprecated)
        "fc00::/7",  # unique local
        "100::/64",  # discard-only
        "2001:db8::/32",  # documentation
    )
)
_IPV4_REFUSED = tuple(
    ipaddress.IPv4Network(n)
    for n in (
        "0.0.0.0/8",  # "this network"
        "100.64.0.0/10",  # carrier-grade NAT
        "192.0.0.0/24",  # IETF protocol assignments
        "192.88.99.0/24",  # 6to4 relay anycast (deprecated)
        "198.18.0.0/15",  # benchmarking
    )
)
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))


class WebhookRefused(Exception):
    """The URL may not be called (malformed, unresolvable host, or a non-public address that is not allow-listed)."""


@dataclass(frozen=True)
class Target:
    url: str
    host: str
    port: int
    scheme: str
    address: str  # the vetted IP the request goes to (never shown to the user)


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


def validate_url(url: str) -> SplitResult:
    """The URL's parts if it is a well-formed http(s) URL darkroom may store and call; `WebhookRefused` saying why
    otherwise. Pure syntax: no DNS, so it is cheap enough for every submit."""
    if not isinstance(url, str) or not url:
        raise WebhookRefused("the URL is empty")
    if len(url) > MAX_URL_CHARS:
        raise WebhookRefused(f"the URL is longer than {MAX_URL_CHARS} characters")
    if _BAD_CHARS.search(url):
        raise WebhookRefused("the URL contains whitespace, a backslash or a control character (NUL included)")
    if not url.isascii():
        raise WebhookRefused("the URL must be ASCII (write international host names in punycode, xn--…)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise WebhookRefused("the URL is malformed or its port is not valid") from None
    if parts.scheme not in ("http", "https"):
        raise WebhookRefused("the URL's scheme must be http or https")
    if "@" in parts.netloc:
        raise WebhookRefused("the URL may not carry a user name or password (payloads are signed instead)")
    if port == 0:
        raise WebhookRefused("the URL's port is not valid")
    _check_host(parts.hostname or "")
    return parts


def _check_host(host: str) -> None:
    if not host:
        raise WebhookRefused("the URL has no host")
    try:
        ipaddress.ip_address(host)
        return  # a literal in canonical form (IPv6 came in brackets); judged by `check` like any answer
    except ValueError:
        pass
    name = host.rstrip(".")
    if not _HOST_NAME.match(name):
        raise WebhookRefused("the URL's host is not a valid host name or IP address")
    if _NUMERIC_LABEL.match(name.rsplit(".", 1)[-1]):
        # WHATWG URL parsers and inet_aton read `2130706433`, `0177.0.0.1` or `0x7f.1` as IPv4 addresses.
        raise WebhookRefused("the URL's host is an IPv4 address in a non-standard form; write it as a.b.c.d")


def is_public(ip: IPAddress) -> bool:
    """Public unicast only: excludes private, loopback, link-local (cloud metadata at 169.254.169.254), CGNAT,
    reserved, unspecified and multicast ranges, and IPv6 forms that lead to such an IPv4 address."""
    if isinstance(ip, ipaddress.IPv4Address):
        return _public_v4(ip)
    if ip.ipv4_mapped is not None:
        return _public_v4(ip.ipv4_mapped)
    if ip.sixtofour is not None:
        return _public_v4(ip.sixtofour)
    if any(ip in net for net in _NAT64):
        return _public_v4(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip.teredo is not None or any(ip in net for net in _IPV6_REFUSED):
        return False
    flags = (ip.is_private, ip.is_reserved, ip.is_loopback, ip.is_link_local, ip.is_site_local, ip.is_multicast)
    return ip.is_global and not ip.is_unspecified and not any(flags)


def _public_v4(ip: ipaddress.IPv4Address) -> bool:
    flags = (ip.is_private, ip.is_reserved, ip.is_loopback, ip.is_link_local, ip.is_multicast, ip.is_unspecified)
    return ip.is_global and not any(flags) and not any(ip in net for net in _IPV4_REFUSED)


def check(url: str, allow: AllowList, resolve: Resolver = system_resolver) -> Target:
    parts = validate_url(url)
    host = (parts.hostname or "").rstrip(".")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        addresses = [ipaddress.ip_address(a.split("%")[0]) for a in resolve(host, port)]
    except (OSError, ValueError, UnicodeError):
        raise WebhookRefused(f"cannot resolve {host}") from None
    if not addresses:
        raise WebhookRefused(f"{host} resolves to no address")
    if host not in allow.hosts:
        for ip in addresses:
            if not is_public(ip) and not allow.allows_address(ip):
                raise WebhookRefused(
                    f"{host} resolves to a non-public address; an operator may allow it with "
                    "DARKROOM_WEBHOOKS__ALLOW_HOSTS"
                )
    return Target(url=url, host=host, port=port, scheme=parts.scheme, address=str(addresses[0]))
