"""A TCP proxy the test controls, to give the workers a database outage.

with TcpProxy("127.0.0.1", 5432) as proxy:      # listens on 127.0.0.1:proxy.port
    ...                                           # point the workers at proxy.port
    proxy.stall()     # stop forwarding bytes; every socket stays open
    proxy.refuse()    # close the listener and reset every connection (RST)
    proxy.resume()    # forward again (re-listening on the same port)
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
from types import TracebackType

FORWARD = "forward"
STALLED = "stalled"
REFUSING = "refusing"


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, *, listen_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.listen_host = listen_host
        self.port = 0
        self.mode = FORWARD
        self.accepted = 0
        self._flowing = threading.Event()
        self._flowing.set()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._closed = False

    # ------------------------------------------------------------------ control

    def start(self) -> TcpProxy:
        self._listen()
        return self

    def stall(self) -> None:
        """Keep every socket open (and accept new ones) but forward nothing."""
        self.mode = STALLED
        self._flowing.clear()

    def refuse(self) -> None:
        """Close the listener (new connections are refused) and reset the open ones."""
        self.mode = REFUSING
        self._flowing.set()
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = set(self._conns), set()
        if listener is not None:
            # shutdown first: it wakes the blocked accept() and stops listening at once (a
            # bare close() leaves the socket listening while accept() holds it)
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                listener.close()
        for s in conns:
            _reset(s)

    def resume(self) -> None:
        if self.mode == REFUSING:
            self._listen()
        self.mode = FORWARD
        self._flowing.set()

    def close(self) -> None:
        self._closed = True
        self.refuse()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing

    def _listen(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.listen_host, self.port))
        sock.listen(64)
        self.port = int(sock.getsockname()[1])
        with self._lock:
            self._listener = sock
        threading.Thread(target=self._accept_loop, args=(sock,), daemon=True, name="proxy-accept").start()

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _addr = listener.accept()
            except OSError:
                return  # closed by refuse()
            self.accepted += 1
            threading.Thread(target=self._serve, args=(client,), daemon=True, name="proxy-conn").start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            _reset(client)
            return
        upstream.settimeout(None)
        with self._lock:
            if self.mode == REFUSING or self._closed:
                _reset(client)
                _reset(upstream)
                return
            self._conns.update((client, upstream))
        done = threading.Event()
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(src, dst, done), daemon=True, name="proxy-pump").start()

    def _pump(self, src: socket.socket, dst: socket.socket, done: threading.Event) -> None:
        try:
            while not done.is_set():
                self._flowing.wait()
                try:
                    ready, _, _ = select.select([src], [], [], 0.2)
                except (OSError, ValueError):
                    break
                if not ready:
                    continue
                self._flowing.wait()  # stalled: leave the bytes in the kernel buffer
                data = src.recv(65536)
                if not data:
                    break
                self._flowing.wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            done.set()
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()


def _reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets a RST, not a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()
