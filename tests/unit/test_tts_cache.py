"""The TTS part cache, the shared resampling filter and the timing-only voice of intake."""

from __future__ import annotations

import numpy as np
from scipy.signal import resample_poly

from pipeline.render import tts as tts_mod
from pipeline.render.tts import EspeakTTS, SpeechPart
from schemas.common import Locale


def test_the_cached_filter_resamples_exactly_as_scipy_designs_it() -> None:
    x = np.random.default_rng(3).standard_normal(20_011).astype(np.float32)
    for up, down in ((160, 147), (2, 1), (320, 147)):
        h = tts_mod._resample_filter(up, down).astype(x.dtype)
        assert np.array_equal(resample_poly(x, up, down, window=h), resample_poly(x, up, down))
        assert resample_poly(x, up, down).size == -(-x.size * up // down)


def test_fixed_words_are_spoken_once_and_timing_only_is_silent_with_real_spans() -> None:
    fixed = SpeechPart(text="新年快樂", locale=Locale.ZH_HANT_HK)
    tts = EspeakTTS()
    first = tts.speak([fixed, SpeechPart(text="陳大文", locale=Locale.ZH_HANT_HK)])
    again = tts.speak([fixed, SpeechPart(text="李小明", locale=Locale.ZH_HANT_HK)])
    n = round(first.spans[0][1] * tts.sample_rate)
    assert np.array_equal(first.samples[:n], again.samples[:n])  # the same cached audio
    assert np.abs(first.samples).max() > 0.05

    timing = EspeakTTS(timing_only=True)
    quiet = timing.speak([fixed, SpeechPart(text="陳大文", locale=Locale.ZH_HANT_HK)])
    assert not quiet.samples.any()
    assert quiet.samples.size > tts.sample_rate  # a second or more of (silent) speech
    assert abs(quiet.duration_s - first.duration_s) < 0.05  # eSpeak varies by a few samples


def test_the_part_cache_is_bounded_in_bytes() -> None:
    tts = EspeakTTS()
    tts.CACHE_BYTES = 400_000
    for i in range(12):
        tts.speak([SpeechPart(text=f"第{i}位朋友，新年快樂", locale=Locale.ZH_HANT_HK)])
    assert tts._cached_bytes <= 400_000
    assert sum(a.nbytes for a in tts._parts.values() if isinstance(a, np.ndarray)) == tts._cached_bytes
