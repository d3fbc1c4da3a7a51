"""Sound: speech per locale, music bed, ducking, loudness and true peak."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from pipeline.render import audio as A
from pipeline.render.engine import make_cues, speech_parts
from pipeline.render.templates import get_template
from pipeline.render.tts import EspeakTTS, SpeechPart, voice_locale_for
from schemas.common import Locale
from schemas.template import MusicBed

SR = 48_000


def _db(x: np.ndarray) -> float:
    return 20 * math.log10(float(np.sqrt(np.mean(np.square(x)))) + 1e-12)


@pytest.mark.parametrize(
    ("locale", "line"),
    [
        (Locale.ZH_HANT_HK, "陳大文，新年快樂，恭喜發財！"),
        (Locale.ZH_HANS_CN, "李小明，新年快乐，恭喜发财！"),
        (Locale.EN, "Alice Wong, happy Lunar New Year!"),
        (Locale.JA, "はなこさん、あけましておめでとうございます！"),
    ],
)
def test_espeak_speaks_every_locale(locale: Locale, line: str) -> None:
    speech = EspeakTTS().speak([SpeechPart(line, locale)])
    assert speech.sample_rate == SR
    assert 0.8 < speech.duration_s < 6.0
    assert _db(speech.samples) > -30  # audible, not silence
    assert speech.spans[0][0] == 0.0 and speech.spans[0][1] == pytest.approx(speech.duration_s)
    faster = EspeakTTS().speak([SpeechPart(line, locale)], rate=1.5)
    assert faster.duration_s < speech.duration_s * 0.85


def test_name_voice_follows_its_script() -> None:
    assert voice_locale_for("陳大文", Locale.ZH_HANT_HK) == Locale.ZH_HANT_HK
    assert voice_locale_for("Alice Wong", Locale.ZH_HANT_HK) == Locale.EN
    assert voice_locale_for("陳大文", Locale.EN) == Locale.ZH_HANS_CN
    assert voice_locale_for("はなこ", Locale.EN) == Locale.JA
    assert voice_locale_for("山田花子", Locale.JA) == Locale.ZH_HANS_CN  # eSpeak ja reads no kanji


def test_voice_line_parts_and_caption_cues() -> None:
    parts = speech_parts("{recipient.name}, happy Lunar New Year! Wishing you luck.", Locale.EN, "陳大文")
    assert [p.text for p, _ in parts] == ["陳大文", "happy Lunar New Year!", "Wishing you luck."]
    assert parts[0][0].locale == Locale.ZH_HANS_CN
    assert parts[0][1] == "陳大文, "
    cues = make_cues([s for _, s in parts], [(0.0, 0.7), (0.8, 2.0), (2.1, 3.0)], 2.7, 5.95, max_cells=30)
    assert cues[0].start == 2.7 and cues[-1].end <= 5.95
    assert all(a.end <= b.start + 1e-9 for a, b in itertools.pairwise(cues))
    assert "陳大文" in cues[0].text


def test_japanese_reading_is_spoken_and_its_kanji_shown() -> None:
    line = "{recipient.name}さん、中秋節《ちゅうしゅうせつ》、｜お月見《おつきみ》です！"
    parts = speech_parts(line, Locale.JA, "はなこ")
    assert [p.text for p, _ in parts] == ["はなこ", "さん、ちゅうしゅうせつ、おつきみです！"]
    assert "".join(shown for _, shown in parts) == "はなこさん、中秋節、お月見です！"
    # In Chinese 《》 are title marks: spoken and shown as written.
    (zh,) = speech_parts("送上《恭喜發財》", Locale.ZH_HANT_HK, "x")
    assert zh[0].text == zh[1] == "送上《恭喜發財》"


def test_shipped_japanese_captions_show_kanji() -> None:
    from pipeline.render.templates import drawn_texts

    t = get_template("mid-autumn").template
    assert "{recipient.name}さん、中秋節、おめでとうございます！" in drawn_texts(t, Locale.JA)


def test_loudness_meter_matches_pyloudnorm() -> None:
    import pyloudnorm

    bed = A.bed_with_effects(get_template("lunar-new-year").template.audio, 9.0)
    for gain in (0.3, 1.0, 2.5):
        x = bed * gain
        assert A.integrated_lufs(x) == pytest.approx(pyloudnorm.Meter(SR).integrated_loudness(x), abs=0.1)


def test_true_peak_limiter() -> None:
    from scipy.signal import resample_poly

    rng = np.random.default_rng(0)
    x = rng.standard_normal((SR * 3, 2)) * 0.4
    y = A.limit_true_peak(x, -1.6)
    over8 = 20 * math.log10(float(np.abs(resample_poly(y, 8, 1, axis=0)).max()))
    assert over8 <= -1.0  # white noise is the worst case for a 4x true-peak estimate
    assert A.true_peak_db(y) <= -1.59
    quiet = x * 0.1
    assert np.array_equal(A.limit_true_peak(quiet, -1.0), quiet)


def test_mix_ducks_music_and_hits_the_loudness_target() -> None:
    t = get_template("lunar-new-year").template
    bed = A.bed_with_effects(t.audio, t.duration_s)
    speech = EspeakTTS().speak([SpeechPart("陳大文，新年快樂，恭喜發財！", Locale.ZH_HANT_HK)])
    m = A.mix(bed, speech.samples, 2.7, list(speech.spans), t.audio)
    assert m.samples.shape == bed.shape
    assert m.lufs == pytest.approx(-14.0, abs=0.35)
    assert m.true_peak_db <= -1.0 - A.TRUE_PEAK_MARGIN_DB + 0.05
    env = A.duck_envelope(bed.shape[0], [(2.7, 4.0)], -10.0)
    assert env[int(3.3 * SR)] == pytest.approx(10 ** (-10 / 20), rel=0.02)
    assert env[int(1.0 * SR)] == pytest.approx(1.0) and env[int(6.0 * SR)] == pytest.approx(1.0)
    assert np.abs(np.diff(env)).max() < 0.001  # smooth ramps: no zipper clicks
    assert np.abs(m.samples[:5]).max() < 0.01 and np.abs(m.samples[-5:]).max() < 0.01


def test_music_bed_levels() -> None:
    bed = A.music_bed(MusicBed(), 6.0)
    assert bed.shape == (6 * SR, 2)
    assert np.abs(bed).max() == pytest.approx(10 ** (-3 / 20), rel=1e-6)
    assert _db(bed) > -30
    assert np.abs(bed[:10]).max() < 0.05 and np.abs(bed[-10:]).max() < 0.01  # no clicks
