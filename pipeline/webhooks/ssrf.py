"""The SSRF guard of outgoing webhooks.

Every address a webhook URL resolves to is checked, and the request is then sent to the
checked address itself (Host header and TLS SNI/certificate name set to the URL's host),
so a DNS answer that changes between the check and the connect (rebinding) cannot
redirect it. Redirects are followed here, a few at most, each hop checked the same way.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Sequence[str]]

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_METADATA = frozenset({ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")})
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


class UnsafeUrl(ValueError):
    """A webhook URL (or a redirect) that the guard refuses; the message says why."""


class Unresolvable(UnsafeUrl):
    """The URL's host name has no address now (perhaps only for now: DNS can fail)."""


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    return None


def address_refusal(address: str | IPAddress, *, allow_loopback: bool = False) -> str | None:
    """Why `address` may not be contacted, or None when it may."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return f"{ip} is a scoped (link-local) address"
        inner = _embedded_v4(ip)
        if inner is not None:
            why = address_refusal(inner, allow_loopback=allow_loopback)
            return f"{ip} embeds {inner}: {why}" if why else None
    if ip in _METADATA:
        return f"{ip} is a cloud metadata address"
    if ip.is_loopback:
        return None if allow_loopback else f"{ip} is a loopback address"
    if ip.is_unspecified:
        return f"{ip} is the unspecified address"
    if ip.is_link_local:
        return f"{ip} is a link-local address"
    if ip.is_multicast:
        return f"{ip} is a multicast address"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT:
        return f"{ip} is a carrier-grade NAT (100.64.0.0/10) address"
    if ip.is_private:
        return f"{ip} is a private address"
    if ip.is_reserved or not ip.is_global:
        return f"{ip} is not a public address"
    return None


@dataclass(frozen=True)
class Target:
    """A checked hop: the URL as given, its host, and the addresses it may be sent to."""

    url: str
    host: str
    port: int
    addresses: tuple[str, ...]


def check_url(url: str, *, allow_loopback: bool = False, resolver: Resolver = system_resolver) -> Target:
    """Parse, resolve and check `url`; UnsafeUrl (one line) when it may not be contacted.

    https only; http only to loopback with `allow_loopback` (local development)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise UnsafeUrl("not a valid URL") from None
    if any(c.isspace() or ord(c) < 0x20 for c in url):
        raise UnsafeUrl("the URL contains whitespace or control characters")
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").rstrip(".")
    if scheme not in ("https", "http") or not host:
        raise UnsafeUrl("the URL must be https:// with a host")
    if parts.username is not None or parts.password is not None:
        raise UnsafeUrl("the URL must not carry credentials")
    port = port or (443 if scheme == "https" else 80)
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses: list[str] = [str(literal)]
    else:
        try:
            addresses = list(resolver(host, port))
        except (OSError, UnicodeError) as exc:
            raise Unresolvable(f"{host} does not resolve ({exc})") from None
        if not addresses:
            raise Unresolvable(f"{host} does not resolve")
    for address in addresses:
        why = address_refusal(address, allow_loopback=allow_loopback)
        if why is not None:
            ip = str(ipaddress.ip_address(address))
            shown = (
                why if literal is not None else f"{host} resolves to {ip}, which {why.removeprefix(ip + ' ')}"
            )
            raise UnsafeUrl(f"refused: {shown}")
    if scheme == "http" and not (
        allow_loopback and all(ipaddress.ip_address(a).is_loopback or _mapped_loopback(a) for a in addresses)
    ):
        raise UnsafeUrl("the URL must use https (http only to loopback, in development)")
    return Target(url=url, host=host, port=port, addresses=tuple(addresses))


def _mapped_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback


@dataclass(frozen=True)
class SendResult:
    """One delivery attempt: the final status code (None when no answer came), an error
    line, whether the guard refused it (not worth retrying), and its duration."""

    status: int | None
    error: str | None
    refused: bool
    duration_s: float
    url: str

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class GuardedSender:
    """POSTs through the SSRF guard: each hop resolved, checked, and connected by address."""

    def __init__(
        self,
        *,
        timeout_s: float,
        allow_loopback: bool = False,
        max_redirects: int = 3,
        resolver: Resolver = system_resolver,
        verify: bool | ssl.SSLContext = True,
    ) -> None:
        self.allow_loopback = allow_loopback
        self.max_redirects = max_redirects
        self.resolver = resolver
        # trust_env off: a proxy from the environment would connect to the name, not the
        # checked address. No keep-alive: a pooled connection is keyed by address, and one
        # verified for another host name must not carry this request.
        self._client = httpx.Client(
            timeout=timeout_s,
            follow_redirects=False,
            trust_env=False,
            verify=verify,
            limits=httpx.Limits(max_keepalive_connections=0),
        )

    def close(self) -> None:
        self._client.close()

    def post(self, url: str, body: bytes, headers: dict[str, str]) -> SendResult:
        started = time.monotonic()
        current = url
        for _hop in range(self.max_redirects + 1):
            try:
                target = check_url(current, allow_loopback=self.allow_loopback, resolver=self.resolver)
            except Unresolvable as exc:  # retried: a DNS failure is often temporary
                return SendResult(None, str(exc), False, time.monotonic() - started, current)
            except UnsafeUrl as exc:
                hop = "" if current == url else f" (redirected to {current})"
                return SendResult(None, f"{exc}{hop}", True, time.monotonic() - started, current)
            try:
                status, location = self._send(target, body, headers)
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"[:500]
                return SendResult(None, error, False, time.monotonic() - started, current)
            if status in _REDIRECTS and location:
                current = urljoin(current, location)
                continue
            return SendResult(status, None, False, time.monotonic() - started, current)
        return SendResult(
            None, f"more than {self.max_redirects} redirects", True, time.monotonic() - started, current
        )

    def _send(self, target: Target, body: bytes, headers: dict[str, str]) -> tuple[int, str | None]:
        address = target.addresses[0]
        parsed = httpx.URL(target.url)
        default_port = 443 if parsed.scheme == "https" else 80
        host_header = target.host if target.port == default_port else f"{target.host}:{target.port}"
        if ":" in target.host and target.port == default_port:
            host_header = f"[{target.host}]"
        elif ":" in target.host:
            host_header = f"[{target.host}]:{target.port}"
        request = self._client.build_request(
            "POST",
            parsed.copy_with(host=address, port=target.port),
            content=body,
            headers={**headers, "Host": host_header},
            extensions={"sni_hostname": target.host},
        )
        response = self._client.send(request, stream=True)
        try:
            return response.status_code, response.headers.get("location")
        finally:
            response.close()
