"""The test-controlled TCP proxy itself: forwards, stalls (sockets stay open), refuses."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest

from tests.faults.proxy import TcpProxy


@pytest.fixture
def echo_port() -> Iterator[int]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return

            def echo(c: socket.socket) -> None:
                with c, contextlib.suppress(OSError):
                    while data := c.recv(4096):
                        c.sendall(data)

            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield int(server.getsockname()[1])
    server.close()


def _roundtrip(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    return sock.recv(4096)


def test_forward_stall_refuse_resume(echo_port: int) -> None:
    with TcpProxy("127.0.0.1", echo_port) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
            assert _roundtrip(s, b"ping") == b"ping"
            proxy.stall()
            s.settimeout(0.5)
            with pytest.raises(TimeoutError):
                _roundtrip(s, b"stalled")
            proxy.resume()
            s.settimeout(5)
            assert s.recv(4096) == b"stalled"  # held back, not lost
            proxy.refuse()
            with pytest.raises(OSError):  # reset (or closed)
                s.sendall(b"x")
                if not s.recv(4096):
                    raise ConnectionResetError("closed")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()
        proxy.resume()
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
            assert _roundtrip(s, b"again") == b"again"
