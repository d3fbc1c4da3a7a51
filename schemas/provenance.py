"""Labels and provenance of a published clip: the AIGC metadata label and the verify report.

The AIGC entry is the implicit (metadata) label of GB 45438-2025: a JSON object stored as
the MP4 metadata key `AIGC`. Field names are the standard's, so the model uses aliases.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

AIGC_METADATA_KEY = "AIGC"
# The visible label the renderer draws when a template does not say otherwise, and that
# the moderation check looks for.
VISIBLE_AI_LABEL = "AI生成 / AI-generated"
TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"


class AigcLabel(BaseModel):
    """GB 45438 metadata label. `Label` "1": the content is AI-generated (2: possibly, 3: suspected)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    label: Literal["1", "2", "3"] = Field(default="1", alias="Label")
    content_producer: str = Field(alias="ContentProducer", min_length=1, max_length=256)
    produce_id: str = Field(alias="ProduceID", min_length=1, max_length=256)
    reserved_code1: str = Field(default="", alias="ReservedCode1", max_length=256)
    content_propagator: str = Field(default="", alias="ContentPropagator", max_length=256)
    propagate_id: str = Field(default="", alias="PropagateID", max_length=256)
    reserved_code2: str = Field(default="", alias="ReservedCode2", max_length=256)

    def to_json(self) -> str:
        """The value written into the file: compact JSON with the standard's field names."""
        return self.model_dump_json(by_alias=True)


class LabelSighting(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    t: float
    score: float
    box: tuple[int, int, int, int] | None = None  # x0, y0, x1, y1 in frame pixels


class VisibleLabelReport(BaseModel):
    """Whether the visible 'AI生成 / AI-generated' label shows for the required time."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ok: bool
    required_s: float
    shown_from_start_s: float  # how long it shows, without a gap, from the first frame
    duration_s: float
    sightings: tuple[LabelSighting, ...] = ()
    message: str = ""


class C2paReport(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    present: bool
    validation_state: str | None = None  # Invalid, Valid (signature good) or Trusted (chain too)
    trusted: bool = False
    active_manifest: str | None = None
    title: str | None = None
    claim_generator: str | None = None
    signer: str | None = None
    issuer: str | None = None
    actions: tuple[str, ...] = ()
    digital_source_types: tuple[str, ...] = ()
    parameters: dict[str, Any] = Field(default_factory=dict)
    ingredients: tuple[str, ...] = ()  # titles of the ingredient assets (reference images)
    failures: tuple[str, ...] = ()
    message: str = ""


class ProvenanceReport(BaseModel):
    """What `greetflow verify CLIP --json` prints."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    sha256: str
    visible_label: VisibleLabelReport | None
    aigc: AigcLabel | None
    aigc_raw: str | None = None
    c2pa: C2paReport
    ok: bool
