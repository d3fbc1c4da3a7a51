"""The label search cache: a search over pixels searched before (a template's shared intro
and outro) gives the same sightings as a fresh search, frame by frame."""

from __future__ import annotations

import numpy as np

from pipeline.moderation import labels
from pipeline.moderation.labels import LabelDetector
from tests.clips import frame


def _frames() -> list[np.ndarray]:
    return [
        np.asarray(frame(540, 960, color=(40, 90, 160))),
        np.asarray(frame(540, 960, color=(40, 90, 160), label_at=(0.12, 0.1))),
        np.asarray(frame(540, 960, label=False)),
        np.asarray(frame(540, 960, color=(150, 40, 40), label_scale=1.2)),
    ]


def test_cached_searches_give_the_fresh_searches_sightings() -> None:
    labels._SEARCHES.clear()
    frames = _frames()
    fresh = LabelDetector()
    want = [fresh.find(f, t=i * 0.5) for i, f in enumerate(frames)]
    assert want[0] is not None and want[2] is None
    calls = 0
    real = LabelDetector._search

    def counted(self: LabelDetector, *args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    LabelDetector._search = counted  # type: ignore[method-assign,assignment]
    try:
        first = LabelDetector(cache=True)
        got = [first.find(f, t=i * 0.5) for i, f in enumerate(frames)]
        searched = calls
        # a second clip with the same frames at other times: nothing is searched again
        second = LabelDetector(cache=True)
        again = [second.find(f, t=1 + i * 0.5) for i, f in enumerate(frames)]
    finally:
        LabelDetector._search = real  # type: ignore[method-assign]
        labels._SEARCHES.clear()
    assert got == want
    assert searched > 0 and calls == searched
    assert [s.model_copy(update={"t": 0.0}) if s else None for s in again] == [
        s.model_copy(update={"t": 0.0}) if s else None for s in want
    ]
    assert [s.t for s in again if s] == [1 + i * 0.5 for i, s in enumerate(want) if s]
