"""Where a webhook may go: the URL rules the API checks, and the address rules every delivery checks.

A webhook makes the server send a request wherever a user points it, so the server must not become a way into
the networks it sits in (server-side request forgery). Two checks:

- At the API (422, nothing stored): the URL is ``http``/``https`` (any case), at most :data:`MAX_URL_LENGTH`
  characters, with a host, without credentials (``user:pass@``), without control characters or spaces (a CRLF
  would split the request). A host written as an IP address in any form the C library accepts (``0``,
  ``2130706433``, ``0x7f.1``, ``[::1]``) and ``localhost`` are checked against the address rules at once, with
  no DNS lookup.
- At each delivery attempt (each retry too): the host is resolved, and every address it resolves to must be
  public: loopback, link-local (169.254.169.254, the cloud metadata service), private, shared, unspecified,
  multicast and reserved addresses are refused, as is the server itself, unless the operator allowed the host
  or its address (``finetune serve --allow-webhook-host HOST|IP|CIDR``). The connection then goes to that
  checked address, so a name that resolves differently a moment later cannot redirect it. Redirects are not
  followed: a 3xx answer is a failed attempt.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..errors import UsageError

MAX_URL_LENGTH = 2048
SCHEMES = ("http", "https")
_WILDCARDS = ("", "0.0.0.0", "::")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class WebhookRefused(ValueError):
    """A webhook URL or address that the rules refuse (a ValueError: a delivery counts it as a failed try)."""


def check_url(url: object) -> urllib.parse.SplitResult:
    """The parts of a webhook URL that passes the syntax rules; :class:`UsageError` (422) naming the problem."""
    if not isinstance(url, str):
        raise UsageError("webhook: expected an http:// or https:// URL")
    if len(url) > MAX_URL_LENGTH:
        raise UsageError(f"webhook: the URL is {len(url)} characters long; the most is {MAX_URL_LENGTH}")
    bad = next((c for c in url if ord(c) < 0x21 or ord(c) == 0x7F), None)
    if bad is not None:
        raise UsageError(f"webhook: the URL holds a control character or space ({bad!r})",
                         "percent-encode it (%20, %0D, %0A)")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port out of range or not a number)
    except ValueError as err:
        raise UsageError(f"webhook: not a valid URL ({err})") from None
    if parts.scheme.lower() not in SCHEMES:
        raise UsageError(f"webhook: expected an http:// or https:// URL, got {url[:80]!r}")
    if not parts.hostname:
        raise UsageError(f"webhook: the URL {url[:80]!r} names no host")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise UsageError("webhook: the URL must not carry credentials (user:password@)",
                         "authenticate the messages by their webhook-signature header instead")
    return parts


def literal_address(host: str) -> Address | None:
    """``host`` as an IP address when it is written as one, in any form ``inet_aton`` takes; else None."""
    text = host.strip("[]")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(text))
    except (OSError, UnicodeError, ValueError):
        return None


def _public(ip: Address) -> bool:
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:
        return _public(mapped)
    return ip.is_global and not ip.is_multicast


@dataclass(frozen=True)
class WebhookPolicy:
    """The address rules of one server: ``allowed`` are the hosts, addresses and networks the operator lets
    webhooks reach although they are not public; ``server`` is the server's own ``(host, port)``."""

    allowed: tuple[str, ...] = ()
    server: tuple[str, int] | None = None
    _names: frozenset[str] = field(init=False, repr=False, compare=False)
    _networks: tuple[Network, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names, networks = parse_allowed(self.allowed)
        object.__setattr__(self, "_names", names)
        object.__setattr__(self, "_networks", networks)

    def _allowed(self, host: str, ip: Address) -> bool:
        if host.lower().rstrip(".") in self._names:
            return True
        mapped = getattr(ip, "ipv4_mapped", None) or ip
        return any(mapped in net for net in self._networks if net.version == mapped.version)

    def check_address(self, host: str, ip: Address, port: int) -> None:
        """Raise :class:`WebhookRefused` if a webhook of ``host`` may not go to ``ip``:``port``."""
        if self._is_server(ip, port):
            raise WebhookRefused(f"{host} is this server itself")
        if not _public(ip) and not self._allowed(host, ip):
            raise WebhookRefused(f"{host} is a non-public address ({ip}); the server sends webhooks to public "
                                 "addresses only (the operator may allow it with --allow-webhook-host)")

    def _is_server(self, ip: Address, port: int) -> bool:
        if self.server is None or port != self.server[1]:
            return False
        bound = self.server[0].strip("[]")
        if bound not in _WILDCARDS:
            own = literal_address(bound)
            return (own == ip) if own is not None else ip.is_loopback
        return ip.is_loopback or ip.is_unspecified or _is_local(ip)

    def check_literal(self, url: str) -> None:
        """The API's check: the URL's syntax, and its host's address when written as one (no DNS lookup).
        :class:`UsageError` (422) for a refused URL."""
        parts = check_url(url)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        ip = literal_address(host)
        if ip is None and (host == "localhost" or host.endswith(".localhost")):
            ip = ipaddress.ip_address("127.0.0.1")
        if ip is not None:
            try:
                self.check_address(host, ip, port)
            except WebhookRefused as err:
                raise UsageError(f"webhook: {err}") from None

    def resolve(self, host: str, port: int) -> Address:
        """The address a delivery connects to: ``host`` resolved now, every address it has checked."""
        ip = literal_address(host)
        if ip is not None:
            found = [ip]
        else:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except (OSError, UnicodeError) as err:
                raise WebhookRefused(f"cannot resolve {host}: {err}") from None
            found = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
        if not found:
            raise WebhookRefused(f"{host} resolves to no address")
        for address in found:
            self.check_address(host, address, port)
        return found[0]


def parse_allowed(items: Iterable[str]) -> tuple[frozenset[str], tuple[Network, ...]]:
    """``--allow-webhook-host`` values: host names, IP addresses and CIDR networks; :class:`UsageError` for
    anything else."""
    names, networks = set(), []
    for item in items:
        text = str(item).strip().lower().strip("[]")
        if not text:
            raise UsageError("--allow-webhook-host: empty value", "give a host name, an IP address or a network")
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
            continue
        except ValueError:
            pass
        if "/" in text or ":" in text or not all(part for part in text.rstrip(".").split(".")):
            raise UsageError(f"--allow-webhook-host {item!r}: not a host name, an IP address or a network")
        names.add(text.rstrip("."))
    return frozenset(names), tuple(networks)


def _is_local(ip: Address) -> bool:
    """Whether ``ip`` is an address of this machine (it can be bound to; nothing is sent)."""
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((str(ip), 0))
        return True
    except OSError:
        return False


def target(url: str) -> tuple[urllib.parse.SplitResult, str, int]:
    """``(parts, host, port)`` of a webhook URL that passes :func:`check_url` (:class:`WebhookRefused` if not)."""
    try:
        parts = check_url(url)
    except UsageError as err:
        raise WebhookRefused(str(err)) from None
    host = parts.hostname or ""
    return parts, host, parts.port or (443 if parts.scheme.lower() == "https" else 80)


def post(url: str, body: bytes, headers: dict[str, str], timeout_s: float, policy: WebhookPolicy) -> int:
    """POST ``body`` to ``url`` and return the answer's status, within ``timeout_s`` in all. The host is resolved
    and checked by ``policy`` now, and the connection goes to the checked address (:class:`WebhookRefused`
    otherwise); no redirect is followed."""
    parts, host, port = target(url)
    address = policy.resolve(host, port)
    deadline = time.monotonic() + timeout_s
    sock = socket.create_connection((str(address), port), timeout=timeout_s)
    # The socket timeout bounds each read; this bounds the whole exchange (a receiver could answer a byte a time):
    # at the deadline the socket is shut, and an answer cut short that way is a timeout, not a delivery.
    expired = threading.Event()
    timer = threading.Timer(max(0.0, deadline - time.monotonic()), _abort, (sock, expired))
    timer.start()
    try:
        if parts.scheme.lower() == "https":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
        conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
        conn.sock = sock  # already connected, to the address that was checked
        conn.request("POST", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), body, headers)
        response = conn.getresponse()
        response.read(64 << 10)
        status = response.status
    except (OSError, http.client.HTTPException):
        if expired.is_set():
            raise TimeoutError(f"no complete answer within {timeout_s:g} s") from None
        raise
    finally:
        timer.cancel()
        sock.close()
    if expired.is_set():
        raise TimeoutError(f"no complete answer within {timeout_s:g} s")
    return status


def _abort(sock: socket.socket, expired: threading.Event) -> None:
    expired.set()
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
