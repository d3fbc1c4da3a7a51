from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from pydantic import ValidationError

from schemas import (
    CampaignBrief,
    ClipRendered,
    Envelope,
    Recipient,
    RenderRequested,
    SubjectUse,
    TemplateRef,
    job_id_for,
    parse_envelope,
)
from schemas.events import UnknownEventType
from schemas.export import export


def _req() -> RenderRequested:
    return RenderRequested(
        job_id=job_id_for(b"k" * 32, "c1", "r1", "lunar-new-year", "1"),
        campaign_id="c1",
        recipient=Recipient(id="r1", name="陳大文", locale="zh-Hant-HK"),
        template=TemplateRef(name="lunar-new-year"),
        locale="zh-Hant-HK",
    )


def test_job_id_is_deterministic_keyed_and_depends_on_every_part() -> None:
    key = b"k" * 32
    a = job_id_for(key, "c1", "r1", "lny", "1")
    assert a == job_id_for(key, "c1", "r1", "lny", "1")
    assert a.version == 8
    others = {
        job_id_for(key, "c2", "r1", "lny", "1"),
        job_id_for(key, "c1", "r2", "lny", "1"),
        job_id_for(key, "c1", "r1", "lny", "2"),
        job_id_for(b"j" * 32, "c1", "r1", "lny", "1"),
    }
    assert a not in others and len(others) == 4


def test_envelope_round_trip() -> None:
    env = Envelope.wrap(_req(), trace_id="t-1")
    back = parse_envelope(env.model_dump_json(), RenderRequested)
    assert back.payload == env.payload
    assert back.type == "render.requested" and back.trace_id == "t-1"
    assert back.occurred_at.utcoffset() is not None and back.occurred_at.utcoffset().total_seconds() == 0


def test_envelope_of_the_wrong_type_is_refused() -> None:
    env = Envelope.wrap(_req())
    with pytest.raises(UnknownEventType):
        parse_envelope(env.model_dump_json(), ClipRendered)


def test_newer_schema_version_is_refused() -> None:
    raw = json.loads(Envelope.wrap(_req()).model_dump_json())
    raw["schema_version"] = 99
    with pytest.raises(UnknownEventType, match="newer"):
        parse_envelope(json.dumps(raw), RenderRequested)


@pytest.mark.parametrize(
    "name",
    ["", "   ", "a\u202eb", "zero\u200bwidth", "bell\x07", "x" * 41],
)
def test_display_names_reject_control_bidi_and_overlong(name: str) -> None:
    with pytest.raises(ValidationError):
        Recipient(id="r", name=name)


@pytest.mark.parametrize("rid", ["../etc", "a/b", "-lead", "x" * 65, "空"])
def test_ids_are_key_safe(rid: str) -> None:
    with pytest.raises(ValidationError):
        Recipient(id=rid, name="A")


def test_photo_requires_a_face_subject() -> None:
    with pytest.raises(ValidationError, match="subjects"):
        Recipient(id="r", name="A", photo_key="photos/a.jpg")
    ok = Recipient(
        id="r", name="A", photo_key="photos/a.jpg", subjects=(SubjectUse(subject_id="s", scopes={"face"}),)
    )
    assert ok.photo_key == "photos/a.jpg"


def test_brief_rejects_duplicate_recipients() -> None:
    r = Recipient(id="r", name="A")
    with pytest.raises(ValidationError, match="duplicate"):
        CampaignBrief(campaign_id="c", title="t", template=TemplateRef(name="t"), recipients=(r, r))


def test_schema_export_writes_valid_json(tmp_path: Path) -> None:
    paths = export(tmp_path)
    names = {p.name for p in paths}
    assert "CampaignBrief.schema.json" in names
    assert "Envelope.render.requested.schema.json" in names
    for p in paths:
        doc = json.loads(p.read_text())
        assert doc["$schema"].endswith("2020-12/schema")


def test_render_requested_is_immutable() -> None:
    req = _req()
    with pytest.raises(ValidationError):
        req.campaign_id = "x"  # type: ignore[misc]
    assert isinstance(req.job_id, uuid.UUID)
