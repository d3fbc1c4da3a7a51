"""Brief intake under attack, through the real `greetflow submit` process on the real stack
(Tansu broker, moto S3 server, SQLite): hostile files fail fast in one line, bad briefs are
refused at intake with a reason, and a valid brief still submits afterwards. One 28-character
name goes through the real render path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.bench_faults import worker_env
from pipeline.bootstrap import Container
from pipeline.briefs import load_document
from pipeline.campaigns import BriefError, load_brief
from pipeline.dev.stack import DevStack
from pipeline.render.layout import TextDoesNotFit
from pipeline.settings import Settings
from tests.integration.pipeline_fixtures import stack_settings

pytestmark = pytest.mark.integration

GREETFLOW = [sys.executable, "-m", "pipeline.cli"]
MAX_RSS_MB = 200
# CPU seconds beyond what the command needs to start and refuse a trivial file. CPU time
# (user + system, from wait4) rather than wall time: it does not grow when other processes
# share the cores.
MAX_EXTRA_S = 2.0


@dataclass(frozen=True)
class Run:
    rc: int
    stdout: str
    stderr: str
    wall_s: float
    cpu_s: float
    max_rss_mb: float


# Runs argv[2:] and writes its exit code and rusage to argv[1]. A child's ru_maxrss counts
# the memory of the process it was spawned from (Linux records the pre-exec address space
# at exec), and this test process is gigabytes into a full run; spawned from this small
# launcher instead, the command's peak is its own.
LAUNCHER = """
import json, os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"rc": os.waitstatus_to_exitcode(status), "cpu_s": usage.ru_utime + usage.ru_stime,
               "max_rss_kb": usage.ru_maxrss}, f)
"""


def run_cli(settings: Settings, *args: str, cwd: Path) -> Run:
    """`greetflow ARGS` as a child process, with its own CPU time and peak RSS (wait4)."""
    out, err, usage = cwd / "stdout.txt", cwd / "stderr.txt", cwd / "usage.json"
    with out.open("wb") as fo, err.open("wb") as fe:
        t0 = time.monotonic()
        subprocess.run(
            [sys.executable, "-c", LAUNCHER, str(usage), *GREETFLOW, *args],
            cwd=cwd,
            stdout=fo,
            stderr=fe,
            env=worker_env(settings),
            check=True,
        )
        wall = time.monotonic() - t0
    measured = json.loads(usage.read_text())
    return Run(
        rc=measured["rc"],
        stdout=out.read_text("utf-8", "replace"),
        stderr=err.read_text("utf-8", "replace"),
        wall_s=wall,
        cpu_s=measured["cpu_s"],
        max_rss_mb=measured["max_rss_kb"] / 1024,
    )


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    settings = stack_settings(tmp_path_factory.mktemp("intake") / "data")
    with DevStack(settings, log=lambda _m: None):
        yield settings


@pytest.fixture(scope="module")
def baseline_s(live: Settings, tmp_path_factory: pytest.TempPathFactory) -> float:
    """CPU seconds the command takes to start and refuse a one-line broken file."""
    d = tmp_path_factory.mktemp("baseline")
    (d / "broken.yaml").write_text("campaign_id: [\n", encoding="utf-8")
    run = run_cli(live, "submit", "broken.yaml", cwd=d)
    assert run.rc == 2, run
    return run.cpu_s


def brief_data(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "campaign_id": "intake-ok",
        "title": "Intake",
        "template": {"name": "lunar-new-year", "version": "1"},
        "default_locale": "en",
        "schedule": {"cron": "0 20 5 2 *", "timezone": "Asia/Hong_Kong"},
        "recipients": [{"id": "r-1", "name": "Alice Wong", "locale": "en"}],
    }
    data.update(overrides)
    return data


def alias_bomb() -> str:
    """The "billion laughs": nine levels of nine aliases, 9**9 strings once expanded."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        prev, cur = chr(96 + i), chr(97 + i)
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


HOSTILE: dict[str, tuple[str, bytes, str]] = {
    "deep-json": ("deep.json", b"[" * 100_000 + b"]" * 100_000, "nested deeper than"),
    "alias-bomb": ("bomb.yaml", alias_bomb().encode(), "YAML aliases"),
    "non-utf8": ("latin1.yaml", "campaign_id: x\ntitle: Caf\xe9\n".encode("latin-1"), "not UTF-8"),
}
# The same limits, checked in this process only (each subprocess costs seconds of startup).
HOSTILE_IN_PROCESS: dict[str, tuple[str, bytes, str]] = {
    "deep-yaml-block": (
        "deep.yaml",
        b"a:\n" + b"".join(b" " * i + b"b:\n" for i in range(1, 5000)),
        "nested",
    ),
    "deep-yaml-flow": ("flow.yaml", b"[" * 100_000 + b"]" * 100_000, "nesting depth"),
    "merge-key-alias": ("merge.yaml", b"base: &b {x: 1}\nuse: {<<: *b}\n", "YAML aliases"),
    "python-tag": ("tag.yaml", b"x: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
    "broken-json": ("broken.json", b'{"campaign_id": ', "not valid JSON"),
}


def assert_one_line_error(run: Run, name: str, fragment: str) -> None:
    assert run.rc == 2, run
    assert "Traceback" not in run.stderr and "Traceback" not in run.stdout, run.stderr[-2000:]
    lines = run.stderr.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], run.stderr[-2000:]
    if not name:  # refused after the stack was reached: its INFO log lines may come first
        assert errors[0].startswith("error: "), errors[0]
    else:  # refused before anything else ran: the error is all there is
        assert len(lines) == 1, run.stderr[-2000:]
        assert errors[0].startswith(f"error: {name}: "), errors[0]
    assert fragment in errors[0], errors[0]


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_files_fail_fast_in_one_line(
    case: str, live: Settings, baseline_s: float, tmp_path: Path
) -> None:
    name, body, fragment = HOSTILE[case]
    if case == "alias-bomb":
        assert len(body) < 1100  # ~1 KB on disk
    (tmp_path / name).write_bytes(body)
    run = run_cli(live, "submit", name, cwd=tmp_path)
    assert_one_line_error(run, name, fragment)
    assert run.max_rss_mb < MAX_RSS_MB, f"{run.max_rss_mb:.0f} MB"
    assert run.cpu_s < baseline_s + MAX_EXTRA_S, f"{run.cpu_s:.2f} s CPU (baseline {baseline_s:.2f} s)"
    # The loader alone, in this process: well under the bound.
    t0 = time.monotonic()
    with pytest.raises(BriefError):
        load_brief(tmp_path / name, live)
    assert time.monotonic() - t0 < MAX_EXTRA_S


@pytest.mark.parametrize("case", sorted(HOSTILE_IN_PROCESS))
def test_hostile_files_in_process(case: str, live: Settings, tmp_path: Path) -> None:
    name, body, fragment = HOSTILE_IN_PROCESS[case]
    (tmp_path / name).write_bytes(body)
    t0 = time.monotonic()
    with pytest.raises(BriefError, match=fragment) as err:
        load_brief(tmp_path / name, live)
    assert time.monotonic() - t0 < MAX_EXTRA_S
    assert "\n" not in str(err.value) and str(err.value).startswith(f"{tmp_path / name}: ")


def test_an_oversized_brief_is_refused_before_parsing(live: Settings, tmp_path: Path) -> None:
    (tmp_path / "big.yaml").write_text("x: " + "a" * 3000 + "\n", encoding="utf-8")
    small = live.model_copy(update={"intake_max_brief_bytes": 2048})
    with pytest.raises(BriefError, match="larger than the limit of 2048 bytes"):
        load_brief(tmp_path / "big.yaml", small)


LONG_ZH = "陳" * 28

BAD_BRIEFS: dict[str, tuple[dict[str, Any], str]] = {
    "cron": ({"schedule": {"cron": "garbage cron x y"}}, "invalid cron expression"),
    "time-zone": (
        {"schedule": {"cron": "0 20 5 2 *", "timezone": "../../../../etc/passwd"}},
        "unknown time zone",
    ),
    "dates": (
        {
            "schedule": {
                "cron": "0 20 5 2 *",
                "start_date": "2027-03-01T00:00:00",
                "end_date": "2027-01-01T00:00:00",
            }
        },
        "must be after start_date",
    ),
    "both-audiences": ({"audience_key": "audiences/x.csv"}, "not both"),
    "schema-version": ({"schema_version": 0}, "schema_version 0 is not supported"),
    "webhook-http": ({"webhook_url": "http://hooks.example.com/x"}, "must use https"),
    "missing-audience-object": (
        {"recipients": [], "audience_key": "audiences/nope.csv"},
        "audience object 'audiences/nope.csv' not found",
    ),
    "too-long-name": (
        {"recipients": [{"id": "r-long", "name": LONG_ZH, "locale": "zh-Hant-HK"}]},
        "recipient r-long: name '" + LONG_ZH + "' (28 characters) is too long for the voice line",
    ),
}


# The same checks in this process (the validation is the same code the CLI runs).
BAD_BRIEFS_IN_PROCESS: dict[str, tuple[dict[str, Any], str]] = {
    "cron-seconds": ({"schedule": {"cron": "0 0 20 5 2 *"}}, "expected 5 fields"),
    "cron-range": ({"schedule": {"cron": "61 * * * *"}}, "invalid cron expression"),
    "time-zone-absolute": (
        {"schedule": {"cron": "0 20 5 2 *", "timezone": "/etc/localtime"}},
        "unknown time zone",
    ),
    "time-zone-unknown": (
        {"schedule": {"cron": "0 20 5 2 *", "timezone": "Mars/Olympus"}},
        "unknown time zone",
    ),
    "dates-equal": (
        {"schedule": {"cron": "0 20 5 2 *", "start_date": "2027-01-01T00:00:00", "end_date": "2027-01-01"}},
        "must be after start_date",
    ),
    "no-audience": ({"recipients": []}, "needs inline recipients or an audience_key"),
    "schema-version-negative": ({"schema_version": -1}, "schema_version -1 is not supported"),
    "schema-version-future": ({"schema_version": 2}, "schema_version 2 is not supported"),
    "webhook-loopback": ({"webhook_url": "http://127.0.0.1:9/x"}, "LOOPBACK_WEBHOOKS"),
    "webhook-credentials": ({"webhook_url": "https://u:p@hooks.example.com/x"}, "credentials"),
    "webhook-scheme": ({"webhook_url": "file:///etc/passwd"}, "https:// URL with a host"),
    "webhook-port": ({"webhook_url": "https://hooks.example.com:99999/x"}, "not a valid URL"),
}


@pytest.mark.parametrize("case", sorted(BAD_BRIEFS_IN_PROCESS))
def test_bad_briefs_in_process(case: str, live: Settings, tmp_path: Path) -> None:
    overrides, fragment = BAD_BRIEFS_IN_PROCESS[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(yaml.safe_dump(brief_data(**overrides)), encoding="utf-8")
    with pytest.raises(BriefError, match=fragment) as err:
        load_brief(path, live)
    assert "\n" not in str(err.value) and str(err.value).startswith(f"{path}: not a valid campaign brief: ")


@pytest.mark.parametrize("case", sorted(BAD_BRIEFS))
def test_bad_briefs_are_refused_at_intake(case: str, live: Settings, tmp_path: Path) -> None:
    overrides, fragment = BAD_BRIEFS[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(yaml.safe_dump(brief_data(**overrides), allow_unicode=True), encoding="utf-8")
    run = run_cli(live, "submit", path.name, cwd=tmp_path)
    if case == "too-long-name":
        assert "at most 9 characters of it fit" in run.stderr, run.stderr
    # Intake refusals that need the stack (audience object, template fit) name the brief's
    # campaign instead of the file.
    stack_checks = ("missing-audience-object", "too-long-name")
    assert_one_line_error(run, "" if case in stack_checks else path.name, fragment)


def test_loopback_webhook_passes_only_with_the_development_setting(live: Settings) -> None:
    from pipeline.campaigns import parse_brief

    data = brief_data(webhook_url="http://[::1]:8080/hook")
    with pytest.raises(BriefError, match="must use https"):
        parse_brief(data, settings=live)
    dev = live.model_copy(update={"intake_allow_loopback_webhooks": True})
    assert parse_brief(data, settings=dev).webhook_url == "http://[::1]:8080/hook"
    with pytest.raises(BriefError, match="must use https"):
        parse_brief(brief_data(webhook_url="http://10.0.0.1/hook"), settings=dev)


def test_a_valid_brief_still_submits(live: Settings, tmp_path: Path) -> None:
    data = brief_data(
        recipients=[
            {"id": "r-1", "name": "Alice Wong", "locale": "en"},
            {"id": "r-2", "name": "陳大文", "locale": "zh-Hant-HK"},
            # 28 characters: fits the bundled template because its name layer shrinks
            {"id": "r-3", "name": "WOLFESCHLEGELSTEINHAUSENBERG", "locale": "en"},
        ],
        webhook_url="https://hooks.example.com/greetflow",
    )
    (tmp_path / "ok.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    run = run_cli(live, "submit", "ok.json", cwd=tmp_path)
    assert run.rc == 0, run.stderr[-2000:]
    assert "campaign intake-ok: 3 jobs" in run.stdout, run.stdout
    container = Container(live)
    try:
        assert len(container.jobs.list_jobs(campaign_id="intake-ok")) == 3
    finally:
        container.close()


def test_an_audience_key_brief_submits_its_audience(live: Settings, tmp_path: Path) -> None:
    container = Container(live)
    try:
        rows = "id,name,locale\n" + "".join(f"a-{i},Customer {i},en\n" for i in range(5))
        container.store.put_bytes(
            live.bucket_assets, "audiences/five.csv", rows.encode(), content_type="text/csv"
        )
        path = tmp_path / "aud.yaml"
        data = brief_data(campaign_id="intake-aud", recipients=[], audience_key="audiences/five.csv")
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
        run = run_cli(live, "submit", path.name, cwd=tmp_path)
        assert run.rc == 0, run.stderr[-2000:]
        assert "campaign intake-aud: 5 jobs" in run.stdout, run.stdout
        assert len(container.jobs.list_jobs(campaign_id="intake-aud")) == 5
    finally:
        container.close()


def test_template_files_load_with_the_same_limits(tmp_path: Path) -> None:
    from pipeline.render.templates import TemplateError, load_template_file

    (tmp_path / "bomb.yaml").write_text(alias_bomb(), encoding="utf-8")
    with pytest.raises(TemplateError, match="YAML aliases"):
        load_template_file(tmp_path / "bomb.yaml")
    (tmp_path / "deep.json").write_bytes(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(TemplateError, match="nested deeper"):
        load_template_file(tmp_path / "deep.json")
    assert load_document(Path(__file__).parents[2] / "pipeline/templates/lunar-new-year.yaml")["name"]


def test_a_28_character_name_renders_through_the_real_engine(tmp_path: Path) -> None:
    """The name intake accepted above (shrunk below the layer's min_size) renders: the same
    fitting code decides at intake and at render."""
    from pipeline.render.compose import box_px, size_scale
    from pipeline.render.draw import safe_area
    from pipeline.render.engine import renderer_from_settings
    from pipeline.render.fonts import find_font_face
    from pipeline.render.layout import fit_text_box
    from pipeline.render.templates import get_template
    from schemas.brief import Recipient, TemplateRef
    from schemas.common import Locale
    from schemas.events import RenderRequested
    from schemas.template import TextLayer

    name = "WOLFESCHLEGELSTEINHAUSENBERG"
    assert len(name) == 28
    t = get_template(TemplateRef(name="lunar-new-year")).template
    layer = next(la for la in t.layers if isinstance(la, TextLayer) and la.id == "name")
    assert layer.overflow == "shrink"
    w, h = 540, 960
    text = f"To {name}"
    face = find_font_face(text, Locale.EN, weight=layer.style.weight)
    box = box_px(safe_area(w, h), layer.box_without_photo or layer.box)
    kw: dict[str, Any] = {"box_width": box.width, "box_height": box.height, "style": layer.style}
    with pytest.raises(TextDoesNotFit):  # without the overflow rule it would fail at render
        fit_text_box(text, face, scale=size_scale(w, h), ornament=True, overflow="reject", **kw)
    shrunk = fit_text_box(text, face, scale=size_scale(w, h), ornament=True, overflow="shrink", **kw)
    assert shrunk.size < round(layer.style.min_size * size_scale(w, h))

    settings = Settings(data_dir=tmp_path / "data", render_width=w, render_height=h)
    renderer = renderer_from_settings(settings)
    req = RenderRequested(
        job_id=uuid.uuid4(),
        campaign_id="intake-render",
        recipient=Recipient(id="r-3", name=name, locale=Locale.EN),
        template=TemplateRef(name="lunar-new-year"),
        locale=Locale.EN,
    )
    res = renderer.render(req, tmp_path / "out")
    assert res.video_path.stat().st_size > 10_000
    assert (res.width, res.height) == (w, h)
    assert res.name_box is not None
    x0, _, x1, _ = res.name_box
    area = safe_area(w, h)
    assert area.x0 <= x0 and x1 <= area.x1  # drawn inside the safe area
    assert any(name in drawn for _, drawn in res.drawn_texts)


def test_the_templates_overflow_rule_decides_at_intake(tmp_path: Path) -> None:
    """The same 28-character name: accepted by `shrink` (the shipped rule), refused by
    `reject` with the recipient, the length and what fits; `wrap` takes more lines."""
    from pipeline.render.fonts import find_font_face
    from pipeline.render.layout import fit_text_box
    from pipeline.render.templates import check_recipients, shipped_templates_dir
    from schemas.brief import Recipient, TemplateRef
    from schemas.common import Locale
    from schemas.template import TextStyle

    name = "WOLFESCHLEGELSTEINHAUSENBERG"
    recipient = Recipient(id="r-wolf", name=name, locale=Locale.EN)
    shipped = (shipped_templates_dir() / "lunar-new-year.yaml").read_text(encoding="utf-8")
    for rule in ("reject", "wrap"):
        variant = shipped.replace('version: "1"', f'version: "{rule}"').replace(
            "overflow: shrink", f"overflow: {rule}"
        )
        (tmp_path / f"lny-{rule}.yaml").write_text(variant, encoding="utf-8")
    frame = (540, 960)

    def problems(version: str) -> list[str]:
        ref = TemplateRef(name="lunar-new-year", version=version)
        return check_recipients(ref, [recipient], extra_dir=tmp_path, size=frame)

    assert problems("1") == []
    [refused] = problems("reject")
    assert refused.startswith(
        f"recipient r-wolf: name '{name}' (28 characters) does not fit text layer 'name'"
    )
    assert "overflow: reject" in refused and "at most 25 characters of it fit" in refused
    # one unbreakable word: more lines do not help, so `wrap` refuses it too
    [not_wrapped] = problems("wrap")
    assert "overflow: wrap" in not_wrapped and "at most 25 characters" in not_wrapped

    face = find_font_face("Ab", Locale.EN)
    style = TextStyle(max_size=60, min_size=40, max_lines=1)
    long_text = "Lorem ipsum dolor sit"
    with pytest.raises(TextDoesNotFit):
        fit_text_box(long_text, face, box_width=300, box_height=400, style=style, scale=1.0)
    wrapped = fit_text_box(
        long_text, face, box_width=300, box_height=400, style=style, scale=1.0, overflow="wrap"
    )
    assert 1 < len(wrapped.lines) <= 3 and wrapped.size >= 40
    shrunk = fit_text_box(
        long_text, face, box_width=300, box_height=400, style=style, scale=1.0, overflow="shrink"
    )
    assert len(shrunk.lines) == 1 and 20 <= shrunk.size < 40
