"""The small interfaces services depend on, so they can be tested without Kafka or S3."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from schemas.events import RenderRequested, _Payload


class EventPublisher(Protocol):
    def publish(
        self,
        topic: str,
        payload: _Payload,
        *,
        key: str,
        trace_id: str | None = None,
        event_id: uuid.UUID | None = None,
    ) -> Any: ...


@dataclass(frozen=True)
class RenderedClip:
    video_path: Path
    poster_path: Path
    sha256: str
    duration_s: float
    width: int
    height: int
    # Optional extras (renderers that do not make them leave them None).
    captions_path: Path | None = None  # WebVTT sidecar of the voice line
    template: str | None = None  # "name@version" the clip was rendered from
    generator: str | None = None  # model id of the generated visuals
    # (layer id, text) of every per-recipient text drawn, and the merge values substituted
    # (recorded beside the clip for moderation); None: the renderer does not report them.
    drawn_texts: tuple[tuple[str, str], ...] | None = None
    merge_values: Mapping[str, str] | None = None
    # How the visuals were generated (models and fingerprints, parameters, plate keys,
    # reference assets), JSON-serialisable; None: nothing generated worth recording.
    generation: Mapping[str, object] | None = None


class Renderer(Protocol):
    """Renders one clip into out_dir. `photo` is the subject photo, already fetched from
    the assets bucket, when the recipient has one."""

    def __call__(self, req: RenderRequested, out_dir: Path, photo: Path | None) -> RenderedClip: ...
