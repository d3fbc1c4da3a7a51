"""Pure logic of the fast render path: where the personal segment is cut into chunks
encoded side by side, and the bench's recipient names (distinct, or Zipf-drawn)."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipeline.render.bench import NAMES, _requests, name_pool, zipf_names
from pipeline.render.compose import Still
from pipeline.render.engine import encode_chunks
from pipeline.render.fonts import find_font_face
from schemas.common import Locale


def still(start: float, end: float, fade: float = 0.0, video: Path | None = None) -> Still:
    return Still("s", np.zeros((4, 4, 4), np.uint8), 0, 0, start, end, fade, fade, video=video)


def test_a_personal_segment_is_cut_once_per_keyframe_interval_at_most() -> None:
    # 105 frames at 30 fps (3.5 s): two keyframe intervals of 60, so two chunks on 2+ CPUs
    assert encode_chunks(105, 2, 30, [], 2.5) == [(0, 51), (51, 105)]
    assert len(encode_chunks(105, 16, 30, [], 2.5)) == 2
    assert encode_chunks(105, 1, 30, [], 2.5) == [(0, 105)]
    assert encode_chunks(60, 4, 30, [], 2.5) == [(0, 60)]
    # 25 fps: any frame lasts a whole number of microseconds
    assert encode_chunks(100, 2, 25, [], 0.0) == [(0, 50), (50, 100)]


def test_cuts_last_whole_microseconds_and_avoid_fades() -> None:
    for n in range(61, 400, 7):
        chunks = encode_chunks(n, 8, 30, [], 0.0)
        assert chunks[0][0] == 0 and chunks[-1][1] == n
        assert all(b > a for a, b in chunks)
        assert all(a % 3 == 0 for a, _ in chunks)  # 1/30 s is not a whole number of µs; 3 frames are
        assert all(b0 == a1 for (_, b0), (a1, _) in itertools.pairwise(chunks))
    # a caption fading out across the middle pushes the cut out of its fade
    fading = still(2.5, 2.5 + 53 / 30, fade=0.3)
    chunks = encode_chunks(105, 2, 30, [fading], 2.5)
    cut = chunks[1][0] / 30 + 2.5
    assert not (fading.end - fading.fade_out < cut < fading.end)  # type: ignore[operator]
    # a moving photo (raw frames) keeps the segment whole
    assert encode_chunks(105, 2, 30, [still(2.5, 6.0, video=Path("x.rgba"))], 2.5) == [(0, 105)]


def test_name_pool_has_5000_distinct_names_in_four_scripts() -> None:
    pool = name_pool(5000)
    assert len(pool) == 5000 and len({n for n, _ in pool}) == 5000
    assert pool[: len(NAMES)] == list(NAMES)
    assert {loc for _, loc in pool} == {Locale.ZH_HANT_HK, Locale.ZH_HANS_CN, Locale.EN, Locale.JA}


def test_every_pool_name_has_a_font_that_draws_it() -> None:
    seen: set[tuple[str, Locale]] = set()
    for name, loc in name_pool(5000):
        # a face per distinct (character set, locale) is enough: fonts are chosen per text
        key = ("".join(sorted(set(name))), loc)
        if key in seen:
            continue
        seen.add(key)
        find_font_face(name, loc)  # raises FontNotFoundError on tofu


def test_zipf_draw_is_seeded_and_skewed() -> None:
    a, b = zipf_names(400, 1.1), zipf_names(400, 1.1)
    assert a == b
    counts = Counter(a)
    top = name_pool(5000)[0]
    assert counts.most_common(1)[0][0] == top
    assert len(counts) < 300  # names repeat
    with pytest.raises(ValueError, match="positive"):
        zipf_names(3, 0)


def test_bench_recipients_without_dedup_are_all_distinct() -> None:
    reqs = _requests(40, "lunar-new-year")
    assert len({(r.recipient.name, r.locale) for r in reqs}) == 40
    assert [r.recipient.name for r in reqs[: len(NAMES)]] == [n for n, _ in NAMES]
    assert len({r.job_id for r in reqs}) == 40
