"""`campaign_<id>`: one Airflow DAG per brief file in the campaigns folder.

The folder is `GREETFLOW_CAMPAIGNS_DIR`, or `campaigns/` beside this file. Reading it is
the only I/O at parse time; every task is a few lines that call
`pipeline.campaign_runs.CampaignRunService` of a `pipeline.bootstrap.airflow_container`
(imported inside the task). Settings come from Airflow connections and variables or
GREETFLOW_ variables (`pipeline.adapters.airflow`); nothing secret is in this file. See docs/airflow.md.

validate_brief -> resolve_audience -> prewarm_segments -> publish_requests (one mapped
task per chunk) -> wait_for_jobs (reschedule-mode sensor) -> write_report -> check_complete
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from airflow.sdk import (
    DAG,
    CronTriggerTimetable,
    Param,
    PokeReturnValue,
    TriggerRule,
    dag,
    get_current_context,
    task,
)
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.briefs import DocumentError, load_document, one_line
from pipeline.settings import Settings
from schemas.brief import Schedule, TemplateRef
from schemas.common import DisplayText, Slug

if TYPE_CHECKING:
    from pipeline.campaign_runs import CampaignRunService

log = logging.getLogger(__name__)

BRIEF_SUFFIXES = (".yaml", ".yml", ".json")
TASK_DEFAULTS: dict[str, Any] = {"owner": "greetflow", "retries": 2, "retry_delay": timedelta(seconds=30)}


class _Header(BaseModel):
    """The part of a brief that shapes its DAG (the whole brief is validated by a task)."""

    model_config = ConfigDict(extra="ignore")
    campaign_id: Slug
    title: DisplayText
    template: TemplateRef
    schedule: Schedule | None = None


def _read(path: Path) -> Any:
    """The brief's data, read with the intake limits (size, UTF-8, depth, no YAML aliases)."""
    return load_document(
        path, max_bytes=_settings.intake_max_brief_bytes, max_depth=_settings.intake_max_depth
    )


def _aware(value: datetime | None, tz: ZoneInfo) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=tz)


@contextmanager
def _runs(*, migrate: bool = False) -> Iterator[CampaignRunService]:
    """The run service on a Container from Airflow connections / variables / GREETFLOW_ env.
    Only the first task of a run applies the database migrations."""
    from pipeline.bootstrap import airflow_container

    with airflow_container(migrate=migrate) as c:
        yield c.campaign_run_service()


def _timetable(sched: Schedule | None) -> tuple[CronTriggerTimetable | None, ZoneInfo]:
    """Raises ValueError (or a subclass) on a bad cron expression or time zone."""
    if sched is None:
        return None, ZoneInfo("UTC")
    try:
        tz = ZoneInfo(sched.timezone)
    except (KeyError, ValueError) as exc:
        raise ValueError(f"unknown time zone {sched.timezone!r}") from exc
    from croniter import croniter

    if not croniter.is_valid(sched.cron):
        raise ValueError(f"invalid cron expression {sched.cron!r}")
    return CronTriggerTimetable(sched.cron, timezone=sched.timezone), tz


def campaign_dag(path: Path, header: _Header, poll_s: float) -> DAG:
    sched = header.schedule
    timetable, tz = _timetable(sched)
    brief_path, campaign_id = str(path), header.campaign_id

    @dag(
        dag_id=f"campaign_{campaign_id}",
        description=header.title,
        schedule=timetable,
        start_date=_aware(sched.start_date, tz) if sched else None,
        end_date=_aware(sched.end_date, tz) if sched else None,
        catchup=False,
        max_active_runs=1,
        default_args=TASK_DEFAULTS,
        tags=["greetflow", "campaign"],
        params={
            "deadline_s": Param(
                None,
                type=["null", "number"],
                minimum=1,
                description="Seconds this run waits for its jobs (empty: GREETFLOW_CAMPAIGN_DEADLINE_S)",
            )
        },
        doc_md=f"**{header.title}**  \nBrief: `{path.name}`  \nTemplate: `{header.template.name}` "
        f"v{header.template.version}  \nSchedule: `{sched.cron if sched else 'manual'}` "
        f"({sched.timezone if sched else '-'})",
    )
    def campaign() -> None:
        @task
        def validate_brief() -> dict[str, Any]:
            ctx = get_current_context()
            with _runs(migrate=True) as svc:
                run = svc.start(
                    Path(brief_path),
                    ctx["run_id"],
                    expect_campaign_id=campaign_id,
                    deadline_s=ctx["params"].get("deadline_s"),
                )
            return run.to_xcom()

        @task
        def resolve_audience(run: dict[str, Any]) -> list[dict[str, Any]]:
            from pipeline.campaign_runs import RunInfo

            with _runs() as svc:
                return svc.resolve(RunInfo.from_xcom(run)).to_xcom()

        @task
        def prewarm_segments(run: dict[str, Any], parts: list[dict[str, Any]]) -> dict[str, Any]:
            from pipeline.campaign_runs import RunInfo

            locales = sorted({loc for p in parts for loc in p["locales"]})
            with _runs() as svc:
                return svc.prewarm(RunInfo.from_xcom(run), locales)

        @task
        def publish_requests(run: dict[str, Any], part: dict[str, Any]) -> dict[str, int]:
            from pipeline.campaign_runs import RunInfo

            retry = int(get_current_context()["ti"].try_number) > 1
            with _runs() as svc:
                return svc.submit_part(RunInfo.from_xcom(run), part["key"], retry=retry)

        @task.sensor(mode="reschedule", poke_interval=poll_s, timeout=timedelta(days=30).total_seconds())
        def wait_for_jobs(run: dict[str, Any]) -> PokeReturnValue:
            from airflow.sdk.exceptions import AirflowSensorTimeout

            from pipeline.campaign_runs import RunInfo

            info = RunInfo.from_xcom(run)
            with _runs() as svc:
                progress = svc.progress(info)
            log.info("campaign %s: %s", info.campaign_id, progress.describe())
            if progress.settled:
                return PokeReturnValue(is_done=True, xcom_value=progress.counts)
            if progress.deadline_passed:
                raise AirflowSensorTimeout(f"deadline {info.deadline} passed: {progress.describe()}")
            return PokeReturnValue(is_done=False)

        # Reports whatever happened, also when the wait ran past the deadline.
        @task(trigger_rule=TriggerRule.ALL_DONE_MIN_ONE_SUCCESS)
        def write_report(run: dict[str, Any]) -> dict[str, Any]:
            from pipeline.campaign_runs import RunInfo

            with _runs() as svc:
                report, written = svc.report(RunInfo.from_xcom(run))
            return {
                "complete": report.complete,
                "total": report.total,
                "counts": {k: v for k, v in report.counts.items() if v},
                "report_json": written.json_key,
                "report_csv": written.csv_key,
            }

        @task
        def check_complete(summary: dict[str, Any]) -> None:
            from airflow.sdk.exceptions import AirflowFailException

            if not summary["complete"]:
                raise AirflowFailException(f"campaign {campaign_id} incomplete: {summary['counts']}")

        run = validate_brief()
        parts = resolve_audience(run)
        warm = prewarm_segments(run, parts)
        sent = publish_requests.partial(run=run).expand(part=parts)
        waited = wait_for_jobs(run)
        summary = write_report(run)
        checked = check_complete(summary)
        warm >> sent >> waited >> summary
        waited >> checked

    return campaign()


def invalid_brief_dag(dag_id: str, path: Path, error: str) -> DAG:
    """A brief that cannot be read shows up as a failing, unscheduled DAG (not as an
    import error that would hide every other campaign of this file)."""

    @dag(
        dag_id=dag_id,
        schedule=None,
        catchup=False,
        tags=["greetflow", "campaign", "invalid-brief"],
        description=f"INVALID brief {path.name}",
        default_args={"owner": "greetflow"},
    )
    def invalid() -> None:
        @task
        def validate_brief() -> None:
            from airflow.sdk.exceptions import AirflowFailException

            raise AirflowFailException(f"{path}: {error}")

        validate_brief()

    return invalid()


def _safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")[:60] or "brief"


def build_all(folder: Path, poll_s: float) -> dict[str, DAG]:
    dags: dict[str, DAG] = {}
    files = sorted(p for p in folder.glob("*") if p.suffix in BRIEF_SUFFIXES) if folder.is_dir() else []
    for path in files:
        try:
            header = _Header.model_validate(_read(path))
            _timetable(header.schedule)
        except (DocumentError, OSError, ValueError, ValidationError) as exc:
            error = one_line(str(exc))
            log.error("campaign brief %s is invalid: %s", path, error)
            built = invalid_brief_dag(f"campaign_invalid_{_safe_id(path.stem)}", path, error)
        else:
            built = campaign_dag(path, header, poll_s)
        if built.dag_id in dags:
            first = dags[built.dag_id].description
            built = invalid_brief_dag(
                f"campaign_invalid_{_safe_id(path.stem)}", path, f"duplicate {built.dag_id} (also: {first})"
            )
        dags[built.dag_id] = built
    return dags


_settings = Settings()
for _dag_id, _dag in build_all(
    _settings.campaigns_dir or Path(__file__).resolve().parent / "campaigns",
    _settings.campaign_poll_interval_s,
).items():
    globals()[_dag_id] = _dag
