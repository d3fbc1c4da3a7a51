"""`greetflow demo`: the whole path on the embedded stack, from brief to downloaded clips."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipeline.adapters.kafka import ConsumerWorker
from pipeline.api.repository import CampaignOwners
from pipeline.bootstrap import Container
from pipeline.campaigns import sample_brief
from pipeline.dev.stack import DevStack
from pipeline.keys import sidecar_of
from pipeline.provenance import init_dev_ca, provenance_dir
from pipeline.settings import Settings
from pipeline.workers import ROLES
from schemas.jobs import FINAL_STATES, WAITING_FOR_HUMAN, JobState

DEMO_TENANT = "demo"

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def demo_settings(base: Settings, run_dir: Path) -> Settings:
    """A private stack for one demo run: free ports, a fresh database, in-memory broker and S3.

    Clips are signed with the dev CA of the base data dir (not a per-run one), so that a
    plain `greetflow verify demo-out/CLIP.mp4` afterwards trusts them."""
    broker, s3 = free_port(base.dev_host), free_port(base.dev_host)
    update: dict[str, Any] = {
        "data_dir": run_dir,
        "dev_broker_port": broker,
        "dev_s3_port": s3,
        "kafka_bootstrap": f"{base.dev_host}:{broker}",
        "s3_endpoint": f"http://{base.dev_host}:{s3}",
        "database_url": "",
        "distribution_base_url": "",
    }
    if base.c2pa_cert_chain is None and base.c2pa_private_key is None:
        ca = init_dev_ca(provenance_dir(base), organization=base.content_producer)
        update |= {"c2pa_cert_chain": ca.signer_chain, "c2pa_private_key": ca.signer_key}
        if base.c2pa_trust_anchors is None:
            update["c2pa_trust_anchors"] = ca.ca_cert
    return base.model_copy(update=update)


def run_demo(
    base: Settings,
    *,
    recipients: int,
    out_dir: Path,
    roles: Sequence[str] = ROLES,
    timeout_s: float = 600.0,
    console: Console | None = None,
) -> int:
    console = console or Console()
    run_dir = (base.data_dir / "demo" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    settings = demo_settings(base, run_dir)
    brief = sample_brief(recipients)
    console.print(
        f"[bold]Greetflow demo[/]: campaign [cyan]{brief.campaign_id}[/], "
        f"template {brief.template.name}, {len(brief.recipients)} recipients"
    )
    console.print(f"run directory: {run_dir}")
    t0 = time.monotonic()
    with DevStack(settings, log=lambda m: console.print(f"  [dim]stack[/] {m}")):
        container = Container(settings)
        workers: list[ConsumerWorker[Any]] = []
        threads: list[threading.Thread] = []
        try:
            _ = container.db  # migrate before the workers race to it
            for role in roles:
                worker = container.worker(role)
                thread = threading.Thread(target=worker.run, name=worker.name, daemon=True)
                thread.start()
                workers.append(worker)
                threads.append(thread)
            console.print(
                f"started {len(workers)} workers: {', '.join(w.name.split('@')[0] for w in workers)}"
            )
            # Owned by the API tenant "demo", so a key of that tenant can read the jobs.
            CampaignOwners(container.db).claim(brief.campaign_id, DEMO_TENANT)
            submitted = container.campaigns().submit(brief, owner=DEMO_TENANT)
            console.print(f"submitted {submitted.requested} render requests to render.requests")
            records = _wait_with_progress(container, submitted.job_ids, timeout_s, console, threads)
        finally:
            for w in workers:
                w.stop()
            for t in threads:
                t.join(timeout=30)
        by_job = {r.job_id: r for r in records}
        table = Table(title=f"{brief.campaign_id}: jobs")
        for col in ("recipient", "name", "locale", "state", "published URL / reason"):
            table.add_column(col, overflow="fold")
        out_dir.mkdir(parents=True, exist_ok=True)
        downloaded: list[Path] = []
        for r in brief.recipients:
            job = by_job.get(container.campaigns().job_id(brief.campaign_id, r.id, brief.template))
            state = job.state if job else None
            detail = (job.url if state == JobState.PUBLISHED else job.reason) if job else "missing"
            table.add_row(r.id, r.name, r.locale.value, str(state.value if state else "-"), detail or "")
            if job and state == JobState.PUBLISHED and job.published_key:
                dest = out_dir / f"{r.id}.mp4"
                container.store.get_file(settings.bucket_distribution, job.published_key, dest)
                downloaded.append(dest)
                vtt = sidecar_of(job.published_key, "vtt")
                if container.store.exists(settings.bucket_distribution, vtt):
                    container.store.get_file(settings.bucket_distribution, vtt, dest.with_suffix(".vtt"))
        console.print(table)
        if records:
            # The same job over the render API (`greetflow api serve`, docs/api.md), with a key
            # of tenant demo (`greetflow api key create --name demo --tenant demo --scopes jobs:read`).
            console.print(
                "a job's status over the render API: curl -H \"Authorization: Bearer $GREETFLOW_API_KEY\" "
                f"http://{settings.api_host}:{settings.api_port}/v1/jobs/{records[0].job_id}",
                soft_wrap=True,
            )
        container.close()
    elapsed = time.monotonic() - t0
    console.print(
        f"downloaded {len(downloaded)} clips and their captions to {out_dir.resolve()} in {elapsed:.1f} s"
    )
    if downloaded:
        console.print(
            f"check a clip's AI labels and C2PA manifest: greetflow verify {downloaded[0]}", soft_wrap=True
        )
    published = sum(1 for r in records if r.state == JobState.PUBLISHED)
    if published != len(brief.recipients):
        console.print(f"[red]{len(brief.recipients) - published} jobs did not publish[/]")
        return 1
    return 0


def _wait_with_progress(
    container: Container,
    job_ids: tuple[Any, ...],
    timeout_s: float,
    console: Console,
    threads: list[threading.Thread],
) -> list[Any]:
    settled = FINAL_STATES | WAITING_FOR_HUMAN
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("waiting for jobs", total=len(job_ids))

        def show(counts: dict[JobState, int]) -> None:
            done = sum(n for s, n in counts.items() if s in settled)
            summary = ", ".join(f"{s.value} {n}" for s, n in sorted(counts.items()))
            progress.update(task, completed=done, description=summary or "waiting for jobs")
            if not any(t.is_alive() for t in threads):
                raise RuntimeError("every worker stopped; see the log above")

        return container.campaigns().wait(job_ids, timeout_s=timeout_s, settled=settled, on_progress=show)
