"""Unit tests of pipeline.dev.stack that start no servers."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from pipeline.dev import stack as devstack
from pipeline.dev.stack import ComponentStatus, DevStackError, StackStatus
from pipeline.settings import Settings


def test_render_lines_up_and_down() -> None:
    up = StackStatus(
        [
            ComponentStatus("broker", "127.0.0.1:19092", 11, True, True, Path("b.log")),
            ComponentStatus("s3", "http://127.0.0.1:19000", 12, True, True, None),
        ]
    )
    lines = up.render_lines()
    assert "pid 11" in lines[0] and "healthy" in lines[0] and "b.log" in lines[0]
    assert lines[-1] == "dev stack: up"
    assert up.component("s3").pid == 12

    down = StackStatus(
        [
            ComponentStatus("broker", "127.0.0.1:19092", None, False, False),
            ComponentStatus("s3", "http://127.0.0.1:19000", None, False, False),
        ]
    )
    assert down.render_lines()[-1] == "dev stack: down"
    assert not down.running and not down.healthy


def test_port_in_use_names_port_and_component() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(DevStackError, match=rf"port {port}.*in use"):
            devstack._check_port_free("127.0.0.1", port, devstack.S3)


def test_same_port_for_both_is_refused(tmp_path: Path) -> None:
    settings = Settings(dev_broker_port=23456, dev_s3_port=23456, data_dir=tmp_path)
    with pytest.raises(DevStackError, match="23456"):
        devstack.DevStack(settings, log=lambda m: None).start()


def test_log_tail_strips_colour(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)) + "\x1b[31mERROR\x1b[0m boom\n")
    tail = devstack._log_tail(log, lines=3)
    assert tail.splitlines() == ["line 98", "line 99", "ERROR boom"]
    assert devstack._log_tail(tmp_path / "missing.log") == ""


def test_read_pid(tmp_path: Path) -> None:
    p = tmp_path / "a.pid"
    assert devstack._read_pid(p) is None
    p.write_text("1234\n")
    assert devstack._read_pid(p) == 1234
    p.write_text("garbage")
    assert devstack._read_pid(p) is None


def test_status_and_down_without_a_stack(tmp_path: Path) -> None:
    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        ports = a.getsockname()[1], b.getsockname()[1]
    settings = Settings(dev_broker_port=ports[0], dev_s3_port=ports[1], data_dir=tmp_path)
    st = devstack.status(settings)
    assert not st.running and not st.healthy
    assert devstack.down(settings, log=lambda m: None).render_lines()[-1] == "dev stack: down"
