"""The consent rule applied to a job's subjects, on the ledger as stored."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from pipeline.consent import rules
from pipeline.repositories import ConsentRecord, ConsentRepository
from schemas.brief import SubjectUse
from schemas.events import Finding


class ConsentCheck:
    """Reads the subjects' ledgers and asks `pipeline.consent.rules`."""

    def __init__(self, consents: ConsentRepository) -> None:
        self.consents = consents

    def histories(self, subjects: Iterable[SubjectUse]) -> dict[str, list[ConsentRecord]]:
        """Every record of each subject, oldest first."""
        out: dict[str, list[ConsentRecord]] = {}
        for use in subjects:
            if use.subject_id not in out:
                out[use.subject_id] = self.consents.records(use.subject_id)
        return out

    def findings(self, subjects: tuple[SubjectUse, ...], *, campaign_id: str, at: datetime) -> list[Finding]:
        """A blocking finding per subject whose consent does not cover the clip at `at`."""
        return rules.consent_findings(self.histories(subjects), subjects, campaign_id=campaign_id, at=at)

    def face_references(
        self, subjects: tuple[SubjectUse, ...], *, campaign_id: str, at: datetime
    ) -> dict[str, list[tuple[float, ...]]]:
        """Reference embeddings of the subjects whose face consent for this use is in force."""
        by_record = rules.face_grants(self.histories(subjects), subjects, campaign_id=campaign_id, at=at)
        out: dict[str, list[tuple[float, ...]]] = {}
        for record_id, embs in self.consents.subject_faces(by_record).items():
            out.setdefault(by_record[record_id], []).extend(embs)
        return out
