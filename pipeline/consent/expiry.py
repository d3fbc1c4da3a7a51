"""The daily consent sweep (the consent_sweep Airflow DAG runs it through
`Container.consent_expiry`).

1. Every grant past its expires_at gets an `expire` record (append-only), its reference
   faces are deleted, and the change is emitted on consent.events.
2. Every published clip whose consent no longer covers it is taken down: the clips of
   the expired grants, and any clip a lost consent event left behind.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from pipeline.consent.service import ConsentService

log = logging.getLogger(__name__)


class Takedown(Protocol):
    """What the sweep needs from the takedown side (pipeline.publish.TakedownService)."""

    def take_down_subject(
        self, subject_id: str, *, reason: str, trace_id: str | None = None, at: datetime | None = None
    ) -> list[uuid.UUID]: ...

    def sweep(self, *, trace_id: str | None = None, at: datetime | None = None) -> list[uuid.UUID]: ...


@dataclass(frozen=True)
class ExpiryReport:
    expired_records: tuple[uuid.UUID, ...] = ()
    expired_subjects: tuple[str, ...] = ()
    taken_down: tuple[uuid.UUID, ...] = field(default_factory=tuple)

    def summary(self) -> str:
        return (
            f"{len(self.expired_records)} grant(s) expired for {len(self.expired_subjects)} subject(s); "
            f"{len(self.taken_down)} clip(s) taken down"
        )


def expire_consents(
    consents: ConsentService, takedown: Takedown, *, now: datetime | None = None
) -> ExpiryReport:
    """Expire due grants and take down every clip whose consent is gone. Idempotent.

    `now` defaults to the current time; pass it only to replay a sweep (tests, backfills).
    """
    expired = consents.expire_due(at=now)
    taken: list[uuid.UUID] = []
    for subject in sorted({r.subject_id for r in expired}):
        taken.extend(
            takedown.take_down_subject(subject, reason=f"consent of subject {subject} expired", at=now)
        )
    taken.extend(j for j in takedown.sweep(at=now) if j not in taken)
    report = ExpiryReport(
        expired_records=tuple(r.record_id for r in expired),
        expired_subjects=tuple(sorted({r.subject_id for r in expired})),
        taken_down=tuple(taken),
    )
    log.info("consent expiry: %s", report.summary())
    return report
