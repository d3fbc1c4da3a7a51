"""The webhook SSRF guard: which addresses it refuses, after resolution, and that it sends
to the address it checked (not to a second DNS answer)."""

from __future__ import annotations

import http.server
import ssl
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import ClassVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pipeline.webhooks.ssrf import GuardedSender, Resolver, UnsafeUrl, address_refusal, check_url

REFUSED = [
    "169.254.169.254",
    "fd00:ec2::254",
    "::ffff:169.254.169.254",
    "::ffff:10.0.0.1",
    "64:ff9b::a9fe:a9fe",
    "10.0.0.1",
    "172.16.5.4",
    "192.168.1.1",
    "100.64.0.1",
    "100.127.255.254",
    "127.0.0.1",
    "127.1.2.3",
    "::1",
    "::ffff:127.0.0.1",
    "0.0.0.0",
    "::",
    "169.254.10.10",
    "fe80::1",
    "224.0.0.251",
    "ff02::1",
    "fc00::1",
    "240.0.0.1",
    "198.18.0.1",
]


@pytest.mark.parametrize("address", REFUSED)
def test_non_public_addresses_are_refused(address: str) -> None:
    assert address_refusal(address) is not None


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.216.34", "2606:4700:4700::1111"])
def test_public_addresses_pass(address: str) -> None:
    assert address_refusal(address) is None


def test_loopback_allowed_only_when_asked_and_never_metadata() -> None:
    assert address_refusal("127.0.0.1", allow_loopback=True) is None
    assert address_refusal("::1", allow_loopback=True) is None
    assert address_refusal("169.254.169.254", allow_loopback=True) is not None
    assert address_refusal("10.0.0.1", allow_loopback=True) is not None


def _resolves_to(*addresses: str) -> Resolver:
    def resolver(_host: str, _port: int) -> Sequence[str]:
        return list(addresses)

    return resolver


def test_names_are_checked_after_resolution() -> None:
    with pytest.raises(UnsafeUrl, match="metadata"):
        check_url("https://hooks.example/x", resolver=_resolves_to("169.254.169.254"))
    # One bad answer among good ones is enough to refuse.
    with pytest.raises(UnsafeUrl, match="private"):
        check_url("https://hooks.example/x", resolver=_resolves_to("8.8.8.8", "10.0.0.1"))
    target = check_url("https://hooks.example:8443/x", resolver=_resolves_to("8.8.8.8"))
    assert (target.host, target.port, target.addresses) == ("hooks.example", 8443, ("8.8.8.8",))


@pytest.mark.parametrize(
    "url",
    [
        "http://8.8.8.8/hook",  # http outside loopback
        "ftp://8.8.8.8/",
        "https://user:pw@8.8.8.8/",
        "https:///nohost",
        "https://8.8.8.8/a b",
        "https://[::1]/",
        "https://0x7f000001/",  # no resolver magic: an odd spelling is just a name that does not resolve here
    ],
)
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(UnsafeUrl):
        check_url(url, resolver=_resolves_to())


def test_http_to_loopback_only_with_allow_loopback() -> None:
    assert check_url("http://127.0.0.1:9/x", allow_loopback=True).addresses == ("127.0.0.1",)
    with pytest.raises(UnsafeUrl):
        check_url("http://127.0.0.1:9/x")


class _Hook(http.server.BaseHTTPRequestHandler):
    hits: ClassVar[list[tuple[str, str | None]]] = []
    redirect_to: str | None = None

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        _Hook.hits.append((self.path, self.headers.get("Host")))
        if _Hook.redirect_to and self.path == "/first":
            self.send_response(307)
            self.send_header("Location", _Hook.redirect_to)
        else:
            self.send_response(204)
        self.end_headers()

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def hook() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Hook.hits = []
    _Hook.redirect_to = None
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


def test_sender_connects_to_the_checked_address_with_the_host_header(hook: int) -> None:
    answers = iter([["127.0.0.1"], ["169.254.169.254"]])  # a rebinding DNS server

    def rebinding(_host: str, _port: int) -> Sequence[str]:
        return next(answers)

    sender = GuardedSender(timeout_s=5, allow_loopback=True, resolver=rebinding)
    try:
        result = sender.post(f"http://hooks.test:{hook}/path?q=1", b"{}", {})
    finally:
        sender.close()
    assert result.status == 204 and not result.refused
    assert _Hook.hits == [("/path?q=1", f"hooks.test:{hook}")]


def test_every_redirect_hop_is_checked(hook: int) -> None:
    _Hook.redirect_to = "http://169.254.169.254/latest/meta-data/"
    sender = GuardedSender(timeout_s=5, allow_loopback=True)
    try:
        result = sender.post(f"http://127.0.0.1:{hook}/first", b"{}", {})
    finally:
        sender.close()
    assert result.refused and result.status is None
    assert "metadata" in (result.error or "") and "redirected to" in (result.error or "")
    assert [p for p, _ in _Hook.hits] == ["/first"]

    _Hook.redirect_to = f"http://127.0.0.1:{hook}/second"
    sender = GuardedSender(timeout_s=5, allow_loopback=True)
    try:
        result = sender.post(f"http://127.0.0.1:{hook}/first", b"{}", {})
    finally:
        sender.close()
    assert result.status == 204
    assert [p for p, _ in _Hook.hits][-2:] == ["/first", "/second"]


def test_redirect_loops_stop(hook: int) -> None:
    _Hook.redirect_to = f"http://127.0.0.1:{hook}/first"
    sender = GuardedSender(timeout_s=5, allow_loopback=True, max_redirects=2)
    try:
        result = sender.post(f"http://127.0.0.1:{hook}/first", b"{}", {})
    finally:
        sender.close()
    assert result.refused and "redirects" in (result.error or "")
    assert len(_Hook.hits) == 3


def _tls_server(tmp_path: Path, name: str) -> tuple[http.server.ThreadingHTTPServer, Path]:
    """An HTTPS server on 127.0.0.1 whose certificate names only `name`; returns it and the CA file."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, cert_file


def test_tls_to_the_checked_address_verifies_the_url_host_name(tmp_path: Path) -> None:
    _Hook.hits = []
    _Hook.redirect_to = None
    server, ca = _tls_server(tmp_path, "hooks.test")
    port = int(server.server_address[1])
    try:
        ok = GuardedSender(
            timeout_s=5,
            allow_loopback=True,
            resolver=_resolves_to("127.0.0.1"),
            verify=ssl.create_default_context(cafile=str(ca)),
        )
        result = ok.post(f"https://hooks.test:{port}/tls", b"{}", {})
        ok.close()
        assert result.status == 204, result.error
        assert _Hook.hits == [("/tls", f"hooks.test:{port}")]
        # The same address under another name: its certificate does not name it.
        other = GuardedSender(
            timeout_s=5,
            allow_loopback=True,
            resolver=_resolves_to("127.0.0.1"),
            verify=ssl.create_default_context(cafile=str(ca)),
        )
        result = other.post(f"https://evil.test:{port}/tls", b"{}", {})
        other.close()
        assert result.status is None and "certificate" in (result.error or "").lower()
    finally:
        server.shutdown()
        server.server_close()


def test_a_name_that_does_not_resolve_is_retried_not_refused() -> None:
    def nxdomain(host: str, _port: int) -> Sequence[str]:
        raise OSError(f"{host}: Name or service not known")

    sender = GuardedSender(timeout_s=5, resolver=nxdomain)
    try:
        result = sender.post("https://gone.test/x", b"{}", {})
    finally:
        sender.close()
    assert result.status is None and not result.refused
    assert "gone.test does not resolve" in (result.error or "")
