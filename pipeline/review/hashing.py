"""Password hashing for the review app behind a bounded pool.

One argon2id verification holds `memory_kib` of memory for its whole run. Without a
bound, N parallel logins hold N times that (32 wrong logins took the app from 113 MB to
1.4 GB), so at most `slots` hash or verify at once in this process, at most
`max_waiting` more wait for a slot, each at most `wait_s`; any other is refused at once
with `HashPoolBusy` instead of queuing.
"""

from __future__ import annotations

import base64
import math
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from pipeline.errors import GreetflowError


class HashPoolBusy(GreetflowError):
    """Every hashing slot is taken and the wait is over (or too many already wait)."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__("too many logins at once: try again shortly")
        self.retry_after_s = retry_after_s


class HashPool:
    def __init__(
        self,
        *,
        slots: int,
        wait_s: float,
        max_waiting: int,
        memory_kib: int = 65_536,
        time_cost: int = 3,
        parallelism: int = 4,
    ) -> None:
        if slots < 1:
            raise ValueError("a hash pool needs at least one slot")
        self.hasher = PasswordHasher(time_cost=time_cost, memory_cost=memory_kib, parallelism=parallelism)
        self._slots = threading.BoundedSemaphore(slots)
        self._wait_s = wait_s
        self._max_waiting = max_waiting
        self._lock = threading.Lock()
        self._waiting = 0
        self._dummy: str | None = None

    @property
    def retry_after_s(self) -> int:
        return max(1, math.ceil(self._wait_s))

    @contextmanager
    def slot(self) -> Iterator[None]:
        if self._slots.acquire(blocking=False):
            got = True
        else:
            with self._lock:
                if self._waiting >= self._max_waiting:
                    raise HashPoolBusy(self.retry_after_s)
                self._waiting += 1
            try:
                got = self._slots.acquire(timeout=self._wait_s) if self._wait_s > 0 else False
            finally:
                with self._lock:
                    self._waiting -= 1
        if not got:
            raise HashPoolBusy(self.retry_after_s)
        try:
            yield
        finally:
            self._slots.release()

    def hash(self, password: str) -> str:
        with self.slot():
            return self.hasher.hash(password)

    def dummy_hash(self) -> str:
        """A well-formed hash with this pool's parameters that no password matches, for
        names that match no reviewer: verifying it costs what a wrong password costs."""
        if self._dummy is None:
            h = self.hasher

            def b64(n: int) -> str:
                return base64.b64encode(secrets.token_bytes(n)).decode().rstrip("=")

            self._dummy = (
                f"$argon2id$v=19$m={h.memory_cost},t={h.time_cost},p={h.parallelism}"
                f"${b64(h.salt_len)}${b64(h.hash_len)}"
            )
        return self._dummy

    def verify(self, stored: str, password: str) -> bool:
        """Whether `password` matches `stored`, inside a slot (HashPoolBusy when none is free)."""
        with self.slot():
            try:
                return bool(self.hasher.verify(stored, password))
            except (VerifyMismatchError, VerificationError, InvalidHashError):
                return False

    def needs_rehash(self, stored: str) -> bool:
        try:
            return bool(self.hasher.check_needs_rehash(stored))
        except InvalidHashError:
            return True
