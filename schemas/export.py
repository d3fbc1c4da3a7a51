"""JSON Schema export: generated from the models, never written by hand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from schemas.brief import CampaignBrief, Recipient, SubjectUse, TemplateRef
from schemas.consent import ConsentRecordView, ModerationRecordView, SubjectConsentView
from schemas.events import PAYLOADS, Envelope
from schemas.provenance import AigcLabel, ProvenanceReport
from schemas.template import Template


def all_schemas() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    models: list[tuple[str, type[BaseModel]]] = [
        ("CampaignBrief", CampaignBrief),
        ("Recipient", Recipient),
        ("TemplateRef", TemplateRef),
        ("SubjectUse", SubjectUse),
        ("Template", Template),
        # consent ledger, review queue and provenance (`consent show --json`, `verify --json`)
        ("ConsentRecordView", ConsentRecordView),
        ("SubjectConsentView", SubjectConsentView),
        ("ModerationRecordView", ModerationRecordView),
        ("AigcLabel", AigcLabel),
        ("ProvenanceReport", ProvenanceReport),
    ]
    for event_type, payload in PAYLOADS.items():
        models.append((payload.__name__, payload))
        models.append((f"Envelope.{event_type}", Envelope[payload]))  # type: ignore[valid-type]
    for name, model in models:
        schema = model.model_json_schema()
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = f"greetflow:{name}"
        out[name] = schema
    return out


def export(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in all_schemas().items():
        path = directory / f"{name}.schema.json"
        path.write_text(json.dumps(schema, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        written.append(path)
    return written
