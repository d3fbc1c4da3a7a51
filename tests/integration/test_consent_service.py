"""The consent service on the real S3 server, broker and database, with real faces."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pipeline.bootstrap import Container
from pipeline.consent.service import ConsentError, ConsentService
from pipeline.moderation.gallery import GalleryError
from pipeline.render.media import run_ffmpeg
from pipeline.topics import CONSENT_EVENTS
from schemas.common import Scope
from tests import faces
from tests.integration.pipeline_fixtures import consume_all

pytestmark = pytest.mark.integration


def evidence_text(path: Path, code: str) -> Path:
    path.write_text(f"I, Grace, consent to my likeness in greetings. Code: {code}\n", encoding="utf-8")
    return path


def evidence_selfie(directory: Path) -> Path:
    """The subject's consent artifact: another picture of Grace (matches her photo)."""
    return faces.grace_selfie(directory / "evidence")


def consent_video(path: Path, still: Path) -> Path:
    """A 2 s 'consent video' showing the subject (a still of the photo)."""
    run_ffmpeg(
        [
            "-y",
            "-loop",
            "1",
            "-framerate",
            "10",
            "-t",
            "2",
            "-i",
            still,
            "-vf",
            "scale=480:-2,format=yuv420p",
            "-c:v",
            "libx264",
            "-preset",
            "veryfast",
            path,
        ],
        timeout=60,
    )
    return path


def test_grant_with_code_evidence_and_photo(container: Container, tmp_path: Path) -> None:
    svc = container.consent_service()
    ch = svc.challenge("grandma-grace", issued_by="op")
    assert len(ch.code) == 6 and (ch.expires_at - ch.issued_at) == timedelta(minutes=30)
    ev = evidence_selfie(tmp_path)
    rec = svc.grant(
        "grandma-grace",
        scopes=["face", "name"],
        purpose="lny-2027",
        evidence=ev,
        challenge_code=ch.code.lower(),
        recorded_by="op",
        photo=faces.grace(tmp_path),
    )
    assert rec.purpose == "campaign:lny-2027" and rec.challenge_code == ch.code
    assert rec.expires_at is not None and rec.expires_at - rec.granted_at == timedelta(days=365)
    # the artifact is kept, content-addressed, in the assets bucket
    s = container.settings
    assert container.store.get_bytes(s.bucket_assets, rec.evidence_key or "") == ev.read_bytes()
    view = svc.show("grandma-grace")
    assert view.reference_faces == 1 and [r.action for r in view.records] == ["grant"]
    (event,) = consume_all(s, CONSENT_EVENTS, expect=1)
    payload = json.loads(event.value)["payload"]
    assert (payload["action"], payload["subject_id"], sorted(payload["scopes"])) == (
        "grant",
        "grandma-grace",
        ["face", "name"],
    )
    assert event.key == b"grandma-grace"

    # the code is spent
    with pytest.raises(ConsentError, match="already used"):
        svc.grant(
            "grandma-grace",
            scopes=["name"],
            purpose="lny-2027",
            evidence=ev,
            challenge_code=ch.code,
            recorded_by="op",
        )


@pytest.fixture
def svc(container: Container) -> ConsentService:
    return container.consent_service()


def test_grant_refusals(svc: ConsentService, container: Container, tmp_path: Path) -> None:
    grace, pair = faces.grace(tmp_path), faces.pair(tmp_path)
    code = svc.challenge("g", issued_by="op").code
    ev = evidence_selfie(tmp_path)

    def attempt(**kw: object) -> None:
        args: dict[str, object] = {
            "scopes": ["face"],
            "purpose": "*",
            "evidence": ev,
            "challenge_code": code,
            "recorded_by": "op",
            "photo": grace,
        }
        args.update(kw)
        svc.grant("g", **args)  # type: ignore[arg-type]

    with pytest.raises(ConsentError, match="challenge code"):
        attempt(challenge_code="")
    with pytest.raises(ConsentError, match="not issued"):
        attempt(challenge_code="ZZZZZZ")
    with pytest.raises(ConsentError, match="not an accepted consent artifact"):
        attempt(evidence=evidence_text(tmp_path / "consent.txt", code))
    with pytest.raises(ConsentError, match="needs the consented photo"):
        attempt(photo=None)
    with pytest.raises(ConsentError, match="2 faces"):
        attempt(photo=pair)
    with pytest.raises(ConsentError, match="does not match the consented photo"):
        attempt(evidence=faces.astronaut(tmp_path))  # a selfie of somebody else
    with pytest.raises(ConsentError, match="purpose"):
        attempt(purpose="campaign:../etc")
    with pytest.raises(ConsentError, match="not in the future"):
        attempt(expires_at=datetime.now(UTC) - timedelta(days=1))
    expired = svc.challenge("g", issued_by="op", ttl_s=60)
    container.consents.issue_challenge(
        "g", "OLD234", issued_by="op", ttl_s=1, at=datetime.now(UTC) - timedelta(minutes=5)
    )
    with pytest.raises(ConsentError, match="expired"):
        attempt(challenge_code="OLD234")
    assert svc.show("g").records == ()  # nothing was recorded
    assert expired.code != code


def test_consent_video_of_the_subject_is_accepted(svc: ConsentService, tmp_path: Path) -> None:
    code = svc.challenge("g2", issued_by="op").code
    video = consent_video(tmp_path / "consent.mp4", faces.grace_selfie(tmp_path))
    rec = svc.grant(
        "g2",
        scopes=["face", "voice"],
        purpose="*",
        evidence=video,
        challenge_code=code,
        recorded_by="op",
        photo=faces.grace(tmp_path),
    )
    assert rec.evidence_key is not None and rec.evidence_key.endswith(".mp4")
    code2 = svc.challenge("g3", issued_by="op").code
    with pytest.raises(ConsentError, match="does not match"):
        svc.grant(
            "g3",
            scopes=["face"],
            purpose="*",
            evidence=consent_video(tmp_path / "a.mp4", faces.astronaut(tmp_path)),
            challenge_code=code2,
            recorded_by="op",
            photo=faces.grace(tmp_path),
        )


def test_a_protected_person_cannot_be_consented_under_another_subject(
    container: Container, tmp_path: Path
) -> None:
    gallery = container.gallery_service()
    astronaut = faces.astronaut(tmp_path)
    assert gallery.protect("Eileen Collins", [astronaut], enrolled_by="op") == 1
    assert gallery.protect("Eileen Collins", [astronaut], enrolled_by="op") == 0
    with pytest.raises(GalleryError, match="2 faces"):
        gallery.protect("Two People", [faces.pair(tmp_path)], enrolled_by="op")
    svc = container.consent_service()
    code = svc.challenge("not-a-celebrity", issued_by="op").code
    portrait = faces.astronaut_portrait(tmp_path)
    with pytest.raises(ConsentError, match="protected person 'Eileen Collins'"):
        svc.grant(
            "not-a-celebrity",
            scopes=["face"],
            purpose="*",
            evidence=evidence_selfie(tmp_path),
            challenge_code=code,
            recorded_by="op",
            photo=portrait,
        )
    assert [p.name for p in gallery.people()] == ["Eileen Collins"]


def test_revoke_and_expiry_end_grants_delete_faces_and_emit(
    svc: ConsentService, container: Container, tmp_path: Path
) -> None:
    grace = faces.grace(tmp_path)
    code = svc.challenge("sub", issued_by="op").code
    g = svc.grant(
        "sub",
        scopes=["face", "name"],
        purpose="*",
        evidence=evidence_selfie(tmp_path),
        challenge_code=code,
        recorded_by="op",
        photo=grace,
    )
    r = svc.revoke("sub", recorded_by="op", scopes=["face"])
    view = svc.show("sub")
    assert [e.scopes for e in view.effective] == [frozenset({Scope.NAME})]
    assert view.reference_faces == 0 and container.consents.face_record_ids("sub") == set()
    with pytest.raises(ConsentError, match="no consent"):
        svc.revoke("nobody", recorded_by="op")

    code = svc.challenge("short", issued_by="op").code
    s = svc.grant(
        "short",
        scopes=["face"],
        purpose="*",
        evidence=evidence_selfie(tmp_path),
        challenge_code=code,
        recorded_by="op",
        photo=grace,
        expires_at=datetime.now(UTC) + timedelta(hours=1),
    )
    assert svc.expire_due() == []
    later = datetime.now(UTC) + timedelta(hours=2)
    (exp,) = svc.expire_due(at=later)
    assert exp.action == "expire" and exp.supersedes == s.record_id
    assert svc.expire_due(at=later) == []  # idempotent
    assert container.consents.face_record_ids("short") == set()
    events = consume_all(container.settings, CONSENT_EVENTS, expect=4)
    actions = [
        (json.loads(e.value)["payload"]["subject_id"], json.loads(e.value)["payload"]["action"])
        for e in events
    ]
    assert actions == [("sub", "grant"), ("sub", "revoke"), ("short", "grant"), ("short", "expire")]
    assert {g.record_id, r.record_id} <= {x.record_id for x in svc.show("sub").records}
