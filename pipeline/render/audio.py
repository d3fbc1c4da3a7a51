"""Sound: the music bed, effects, and the one-pass mix (voice over ducked music, loudness
normalized to the template's target, true peak limited).

The whole clip's audio is mixed in one continuous pass and encoded once, after the video
segments were joined: no segment border ever cuts the audio, so no click can appear there.
"""

from __future__ import annotations

import math
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from schemas.template import Audio, Effect, MusicBed

SAMPLE_RATE = 48_000
PENTATONIC = (0, 2, 4, 7, 9)  # major pentatonic degrees (semitones)
SCALES: dict[str, tuple[int, ...]] = {
    "pentatonic": PENTATONIC,
    "major": (0, 2, 4, 5, 7, 9, 11),
    "minor-pentatonic": (0, 3, 5, 7, 10),
}

TRUE_PEAK_MARGIN_DB = 0.6
LUFS_TOLERANCE = 0.3  # LU: 'about -14 LUFS'  # AAC encoding adds a little overshoot; limit below the target


def _midi_hz(n: float) -> float:
    return float(440.0 * 2.0 ** ((n - 69) / 12))


def _pluck(freq: float, dur: float, sr: int) -> np.ndarray:
    t = np.arange(int(dur * sr), dtype=np.float64) / sr
    tone = np.zeros_like(t)
    for k, amp in enumerate((1.0, 0.45, 0.22, 0.12, 0.06), start=1):
        tone += amp * np.sin(2 * np.pi * freq * k * t) * np.exp(-t * (2.2 + 1.6 * k))
    attack = np.minimum(1.0, t / 0.006)
    return tone * attack


def _bell(freq: float, dur: float, sr: int) -> np.ndarray:
    t = np.arange(int(dur * sr), dtype=np.float64) / sr
    env = np.exp(-t * 2.2) * np.minimum(1.0, t / 0.003)
    return env * (np.sin(2 * np.pi * freq * t) + 0.35 * np.sin(2 * np.pi * freq * 2.76 * t))


def music_bed(spec: MusicBed, duration_s: float, *, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A gentle arpeggio over a bass and a soft pad, stereo float64 (n, 2), peak -3 dBFS."""
    n = round(duration_s * sample_rate)
    out = np.zeros((n + sample_rate * 2, 2))
    rng = np.random.default_rng(spec.seed)
    step = 60.0 / spec.tempo_bpm / 2  # eighth notes
    degrees = SCALES[spec.mode]
    root = spec.root_midi
    scale = [root + 12 * o + d for o in (0, 1, 2) for d in degrees]
    k = len(degrees)
    shapes = (
        [0, 2, 3, k, k + 2, k, 3, 2],
        [k - 1, k, k + 2, k + 3, k + 4, k + 2, k, k - 1],
        [1, 3, 4, k + 1, k + 3, k + 1, 4, 3],
        [2, 3, k, k + 2, k + 5, k + 2, k + 1, k],
    )
    bass = (root - 24, root - 27, root - 19, root - 17)
    steps = math.ceil(duration_s / step)

    def add(sig: np.ndarray, start_s: float, gain: float, pan: float) -> None:
        i = int(start_s * sample_rate)
        j = min(out.shape[0], i + sig.size)
        if j <= i:
            return
        out[i:j, 0] += sig[: j - i] * gain * math.cos((pan + 1) * math.pi / 4)
        out[i:j, 1] += sig[: j - i] * gain * math.sin((pan + 1) * math.pi / 4)

    for s in range(steps):
        bar, pos = divmod(s, 8)
        note = scale[shapes[bar % len(shapes)][pos] % len(scale)]
        vel = 0.85 if pos % 4 == 0 else 0.6 + 0.1 * float(rng.random())
        add(_pluck(_midi_hz(note), 1.6, sample_rate), s * step, 0.32 * vel, -0.35 if s % 2 else 0.35)
        if pos == 0:
            add(_pluck(_midi_hz(bass[bar % len(bass)]), 3.0, sample_rate), s * step, 0.45, 0.0)
            if spec.bells:
                add(_bell(_midi_hz(note + 24), 2.0, sample_rate), s * step + 0.01, 0.07, 0.5)
    t = np.arange(out.shape[0]) / sample_rate
    swell = np.minimum(1.0, t / 1.5)
    for semis, pan in ((0, -0.4), (7, 0.4), (12, 0.0)):
        f = _midi_hz(root - 12 + semis)
        add(np.sin(2 * np.pi * f * t + 0.3 * np.sin(2 * np.pi * 0.25 * t)) * swell * 0.05, 0.0, 1.0, pan)
    for delay, gain, src, dst in ((0.23, 0.22, 0, 1), (0.31, 0.2, 1, 0), (0.46, 0.1, 0, 0)):
        d = int(delay * sample_rate)
        out[d:, dst] += gain * out[:-d, src]
    out = out[:n]
    fade_ends(out, sample_rate)
    peak = float(np.max(np.abs(out))) or 1.0
    return out * (10 ** (-3 / 20) / peak)


def fade_ends(x: np.ndarray, sr: int, fade_in_s: float = 0.02, fade_out_s: float = 0.8) -> None:
    """Fade the head and tail in place, so the sound starts and ends without a click."""
    n = x.shape[0]
    fi, fo = min(n, int(fade_in_s * sr)), min(n, int(fade_out_s * sr))
    if fi:
        x[:fi] *= np.linspace(0.0, 1.0, fi)[:, None]
    if fo:
        x[n - fo :] *= (0.5 + 0.5 * np.cos(np.linspace(0.0, np.pi, fo)))[:, None]


def effect(kind: str, *, sample_rate: int = SAMPLE_RATE, seed: int = 0) -> np.ndarray:
    """A short sound effect, stereo float64, peak about 0.5."""
    rng = np.random.default_rng(seed)
    if kind == "chime":
        sig = sum(_bell(_midi_hz(n), 2.5, sample_rate) * g for n, g in ((86, 1.0), (93, 0.6), (98, 0.4)))
        st = np.stack([sig, np.roll(sig, int(0.012 * sample_rate))], axis=1)
    elif kind == "sparkle":
        n = int(1.6 * sample_rate)
        st = np.zeros((n, 2))
        for i in range(14):
            tone = _bell(_midi_hz(float(rng.integers(88, 104))), 0.6, sample_rate)
            at = int(i * 0.09 * sample_rate)
            j = min(n, at + tone.size)
            pan = float(rng.uniform(0.2, 0.8))
            st[at:j, 0] += tone[: j - at] * (1 - pan) * (0.9**i)
            st[at:j, 1] += tone[: j - at] * pan * (0.9**i)
    elif kind == "boom":
        n = int(1.8 * sample_rate)
        t = np.arange(n) / sample_rate
        noise = rng.standard_normal(n)
        # low-passed noise burst and a thump
        k = int(0.004 * sample_rate)
        noise = np.convolve(noise, np.ones(k) / k, mode="same")
        sig = (noise * 3.0 + np.sin(2 * np.pi * 55 * t) * 0.8) * np.exp(-t * 3.5) * np.minimum(1.0, t / 0.004)
        st = np.stack([sig, sig], axis=1)
    else:
        raise ValueError(f"unknown effect {kind!r}")
    peak = float(np.max(np.abs(st))) or 1.0
    return np.asarray(st * (0.5 / peak))


def bed_with_effects(
    audio: Audio, duration_s: float, *, sample_rate: int = SAMPLE_RATE, music: np.ndarray | None = None
) -> np.ndarray:
    """The shared part of the soundtrack: music (at music_gain_db) plus effects."""
    if music is None:
        if not isinstance(audio.music, MusicBed):
            raise ValueError("a template whose music is a file needs the decoded music passed in")
        music = music_bed(audio.music, duration_s, sample_rate=sample_rate)
    bed = music * 10 ** (audio.music_gain_db / 20)
    n = bed.shape[0]
    for i, e in enumerate(audio.effects):
        add_effect(bed, e, sample_rate, seed=i)
    return bed[:n]


def add_effect(bed: np.ndarray, e: Effect, sample_rate: int, seed: int = 0) -> None:
    sig = effect(e.kind, sample_rate=sample_rate, seed=seed) * 10 ** (e.gain_db / 20)
    i = int(e.at * sample_rate)
    j = min(bed.shape[0], i + sig.shape[0])
    if j > i:
        bed[i:j] += sig[: j - i]


# --------------------------------------------------------------------------- loudness


def _k_weighting(sample_rate: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """BS.1770 K-weighting: high-shelf then high-pass biquads (b, a), for any rate."""
    # Coefficient derivation as in BS.1770-4 Annex 1 (and pyloudnorm / libebur128).
    f0, g, q = 1681.974450955533, 3.999843853973347, 0.7071752369554196
    k = math.tan(math.pi * f0 / sample_rate)
    vh = 10 ** (g / 20)
    vb = vh**0.4996667741545416
    a0 = 1 + k / q + k * k
    shelf_b = np.array(
        [(vh + vb * k / q + k * k) / a0, 2 * (k * k - vh) / a0, (vh - vb * k / q + k * k) / a0]
    )
    shelf_a = np.array([1.0, 2 * (k * k - 1) / a0, (1 - k / q + k * k) / a0])
    f0, q = 38.13547087602444, 0.5003270373238773
    k = math.tan(math.pi * f0 / sample_rate)
    a0 = 1 + k / q + k * k
    hp_b = np.array([1.0, -2.0, 1.0])
    hp_a = np.array([1.0, 2 * (k * k - 1) / a0, (1 - k / q + k * k) / a0])
    return [(shelf_b, shelf_a), (hp_b, hp_a)]


def integrated_lufs(x: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    """ITU-R BS.1770-4 integrated loudness (LUFS): K-weighting, 400 ms blocks with 75 %
    overlap, absolute gate at -70 LUFS, relative gate 10 LU below. Vectorized."""
    from scipy.signal import lfilter

    y = np.asarray(x, np.float64)
    if y.ndim == 1:
        y = y[:, None]
    for b, a in _k_weighting(sample_rate):
        y = lfilter(b, a, y, axis=0)
    block, step = round(0.4 * sample_rate), round(0.1 * sample_rate)
    if y.shape[0] < block:
        return -math.inf
    power = (y * y).sum(axis=1)  # channel weights are 1.0 for L and R
    c = np.concatenate([[0.0], np.cumsum(power)])
    starts = np.arange(0, y.shape[0] - block + 1, step)
    z = (c[starts + block] - c[starts]) / block
    with np.errstate(divide="ignore"):
        lk = -0.691 + 10 * np.log10(z)
    gated = z[lk > -70.0]
    if gated.size == 0:
        return -math.inf
    rel = -0.691 + 10 * math.log10(float(gated.mean())) - 10.0
    gated = z[(lk > -70.0) & (lk > rel)]
    return -0.691 + 10 * math.log10(float(gated.mean()))


def _tp_phases() -> np.ndarray:
    from scipy.signal import firwin

    h = firwin(48, 0.25) * 4  # 4x interpolation low-pass, 12 taps per phase (as BS.1770 Annex 2)
    return np.asarray(h.reshape(12, 4).T)  # (4 phases, 12 taps)


_TP = _tp_phases()


def oversampled_envelope(x: np.ndarray) -> np.ndarray:
    """Per input sample, the largest |value| of the 4x oversampled signal over all channels."""
    y = np.asarray(x, np.float64)
    if y.ndim == 1:
        y = y[:, None]
    taps = _TP.shape[1]
    env = np.zeros(y.shape[0], np.float32)
    if y.shape[0] < taps:
        return np.abs(y).max(axis=1).astype(np.float32) if y.size else env
    phases = _TP.astype(np.float32)
    lead = taps // 2
    for ch in range(y.shape[1]):
        xp = np.pad(y[:, ch].astype(np.float32), (lead, taps - 1 - lead))
        for h in phases:  # one short convolution per phase: cheaper than a windowed matmul
            np.maximum(env, np.abs(np.convolve(xp, h, "valid")), out=env)
    return env


def true_peak_db(x: np.ndarray) -> float:
    """Peak of the 4x oversampled signal (BS.1770 true peak estimate), dBTP."""
    env = oversampled_envelope(x)
    peak = float(env.max()) if env.size else 0.0
    return 20 * math.log10(peak) if peak > 0 else -math.inf


def limit_true_peak(
    x: np.ndarray, ceiling_db: float, sample_rate: int = SAMPLE_RATE, lookahead_s: float = 0.005
) -> np.ndarray:
    """A look-ahead peak limiter on the 4x oversampled envelope (no clipping, no clicks)."""
    from scipy.ndimage import minimum_filter1d, uniform_filter1d

    ceiling = 10 ** (ceiling_db / 20)
    env = oversampled_envelope(x)
    need = np.minimum(1.0, ceiling / np.maximum(env, 1e-9))
    if need.min() >= 1.0:
        return x
    look = max(1, int(lookahead_s * sample_rate))
    gain = minimum_filter1d(need, size=2 * look + 1, mode="nearest")
    # a moving average over a window no wider than the min filter's keeps gain <= need
    gain = uniform_filter1d(gain, size=look + 1, mode="nearest")
    gain = np.minimum(gain, need)
    return np.asarray(x * gain[:, None])


@dataclass(frozen=True)
class MixResult:
    samples: np.ndarray  # stereo float64
    lufs: float
    true_peak_db: float
    gain_db: float


def duck_envelope(
    n: int,
    spans: list[tuple[float, float]],
    duck_db: float,
    sample_rate: int = SAMPLE_RATE,
    attack_s: float = 0.12,
    release_s: float = 0.35,
) -> np.ndarray:
    """Gain (n,) for the music: duck_db while the voice speaks, smooth ramps around it."""
    target = np.ones(n)
    low = 10 ** (duck_db / 20)
    for s, e in spans:
        i, j = max(0, int(s * sample_rate)), min(n, int(e * sample_rate))
        target[i:j] = low
    # smooth: ramps start before the voice (attack) and recover after (release)
    a = max(1, int(attack_s * sample_rate))
    r = max(1, int(release_s * sample_rate))
    from scipy.ndimage import minimum_filter1d, uniform_filter1d

    held = minimum_filter1d(target, size=2 * max(a, r) + 1, origin=0, mode="nearest")
    return np.asarray(uniform_filter1d(held, size=max(a, r) * 2 + 1, mode="nearest"))


def mix(
    bed: np.ndarray,
    voice: np.ndarray | None,
    voice_start_s: float,
    voice_spans: list[tuple[float, float]],
    audio: Audio,
    *,
    sample_rate: int = SAMPLE_RATE,
) -> MixResult:
    """Voice over the ducked bed, normalized to audio.target_lufs, true peak limited."""
    out = np.array(bed, dtype=np.float64, copy=True)
    n = out.shape[0]
    if voice is not None and voice.size:
        spans = [(voice_start_s + s, voice_start_s + e) for s, e in voice_spans]
        duck = audio.voice.duck_db if audio.voice is not None else -10.0
        out *= duck_envelope(n, spans, duck, sample_rate)[:, None]
        gain = 10 ** ((audio.voice.gain_db if audio.voice is not None else 0.0) / 20)
        i = int(voice_start_s * sample_rate)
        j = min(n, i + voice.size)
        v = voice[: j - i].astype(np.float64) * gain
        out[i:j, 0] += v
        out[i:j, 1] += v
    ceiling = audio.true_peak_db - TRUE_PEAK_MARGIN_DB
    total_gain = 0.0
    lufs = integrated_lufs(out, sample_rate)
    for _ in range(3):  # gain to target, limit; the limiter lowers loudness a little: repeat
        if not math.isfinite(lufs):
            break
        delta = audio.target_lufs - lufs
        if abs(delta) < LUFS_TOLERANCE:
            break
        out *= 10 ** (delta / 20)
        total_gain += delta
        if delta > 0:
            out = limit_true_peak(out, ceiling, sample_rate)
        lufs = integrated_lufs(out, sample_rate)
    fade_ends(out, sample_rate, 0.005, 0.05)
    return MixResult(samples=out, lufs=lufs, true_peak_db=true_peak_db(out), gain_db=total_gain)


def write_wav(path: Path, samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Path:
    """Write float samples (n, channels) in [-1, 1] as 16-bit PCM WAV (TPDF dithered)."""
    rng = np.random.default_rng(0)
    dither = (rng.random(samples.shape) - rng.random(samples.shape)) / 32768.0
    pcm = np.clip(np.rint((samples + dither) * 32767.0), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(samples.shape[1] if samples.ndim == 2 else 1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
    return path
