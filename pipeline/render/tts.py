"""Text to speech behind a small interface, with an offline eSpeak NG backend.

eSpeak NG ships inside the `espeakng-loader` wheel (the shared library and its data,
including yue = Cantonese, cmn = Mandarin, en and ja), so speech works with no network and
no system package. The library keeps global state and is not thread-safe, so every call
goes through one process-wide lock.

A voice line is spoken in *parts* (the fixed words of the template and the recipient's
name). Each part may use its own voice: a Latin name inside a Cantonese line is read by
the English voice rather than spelled out as "letter A, letter L...". The parts'
start and end times come back with the audio, so captions can follow the voice exactly.
"""

from __future__ import annotations

import ctypes
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

import numpy as np

from pipeline.render.media import RenderError
from schemas.common import Locale

# eSpeak voice per locale (see espeak-ng-data/lang).
ESPEAK_VOICES: dict[Locale, str] = {
    Locale.ZH_HANT_HK: "yue",
    Locale.ZH_HANS_CN: "cmn",
    Locale.EN: "en",
    Locale.JA: "ja",
}


@dataclass(frozen=True)
class SpeechPart:
    """A piece of a voice line and the language whose voice should read it."""

    text: str
    locale: Locale


@dataclass(frozen=True)
class Speech:
    """Mono float32 samples in [-1, 1] and where each part starts and ends (seconds)."""

    samples: np.ndarray
    sample_rate: int
    spans: tuple[tuple[float, float], ...]  # one (start, end) per part

    @property
    def duration_s(self) -> float:
        return float(self.samples.shape[0]) / self.sample_rate


class TTS(Protocol):
    """Speaks a voice line. `rate` is a speed factor (1.0 = the voice's normal speed)."""

    name: str

    def speak(self, parts: Sequence[SpeechPart], *, rate: float = 1.0) -> Speech: ...


# --------------------------------------------------------------------------- voice choice


def _script_of(ch: str) -> str:
    """'han', 'kana', 'hangul', 'latin' or 'other' for one character."""
    cp = ord(ch)
    if 0x3040 <= cp <= 0x30FF or 0x31F0 <= cp <= 0x31FF or 0xFF66 <= cp <= 0xFF9F:
        return "kana"
    if 0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2FFFF or 0xF900 <= cp <= 0xFAFF:
        return "han"
    if 0xAC00 <= cp <= 0xD7AF:
        return "hangul"
    if ch.isalpha() and unicodedata.name(ch, "").startswith("LATIN"):
        return "latin"
    return "other"


def voice_locale_for(text: str, line_locale: Locale) -> Locale:
    """Which locale's voice should read `text` (a name) inside a line in `line_locale`.

    Han characters are read by the line's Chinese voice (Mandarin for an English or
    Japanese line: eSpeak's ja voice does not read kanji); kana by Japanese; Latin letters
    by English unless the line is English already.
    """
    scripts = {_script_of(c) for c in text} - {"other"}
    if not scripts:
        return line_locale
    if "kana" in scripts:
        return Locale.JA
    if "han" in scripts:
        if line_locale in (Locale.ZH_HANT_HK, Locale.ZH_HANS_CN):
            return line_locale
        return Locale.ZH_HANS_CN
    if scripts == {"latin"}:
        return line_locale if line_locale == Locale.EN else Locale.EN
    return line_locale


# --------------------------------------------------------------------------- eSpeak NG

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_ESPEAK_CHARS_UTF8 = 1
_ESPEAK_POS_CHARACTER = 1
_ESPEAK_RATE = 1
_ESPEAK_VOLUME = 2
_ESPEAK_PITCH = 3
_EE_OK = 0


class _EspeakEvent(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", ctypes.c_char * 8),
    ]


_SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_EspeakEvent)
)

_LOCK = threading.Lock()


class _Espeak:
    """The loaded library (one per process)."""

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as exc:  # pragma: no cover - a declared dependency
            raise RenderError("espeakng-loader is not installed: pip install espeakng-loader") from exc
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Synchronize.restype = ctypes.c_int
        data = espeakng_loader.get_data_path().encode()
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data, 0)
        if rate <= 0:
            raise RenderError(f"eSpeak NG failed to initialise (data at {data.decode()})")
        self.lib = lib
        self.sample_rate = int(rate)
        self._chunks: list[np.ndarray] = []
        # keep a reference: the library calls it for every chunk
        self._callback = _SYNTH_CALLBACK(self._on_audio)
        lib.espeak_SetSynthCallback(self._callback)

    def _on_audio(self, wav: ctypes._Pointer[ctypes.c_short], n: int, events: object) -> int:
        if n > 0 and wav:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0

    def synth(self, text: str, voice: str, *, rate_wpm: int, pitch: int) -> np.ndarray:
        if self.lib.espeak_SetVoiceByName(voice.encode()) != _EE_OK:
            raise RenderError(f"eSpeak NG has no voice {voice!r}")
        self.lib.espeak_SetParameter(_ESPEAK_RATE, rate_wpm, 0)
        self.lib.espeak_SetParameter(_ESPEAK_PITCH, pitch, 0)
        self.lib.espeak_SetParameter(_ESPEAK_VOLUME, 100, 0)
        raw = text.encode("utf-8") + b"\0"
        buf = ctypes.create_string_buffer(raw, len(raw))
        self._chunks = []
        err = self.lib.espeak_Synth(
            buf, len(raw), 0, _ESPEAK_POS_CHARACTER, 0, _ESPEAK_CHARS_UTF8, None, None
        )
        if err != _EE_OK:
            raise RenderError(f"eSpeak NG failed to speak {text!r} with voice {voice} (error {err})")
        self.lib.espeak_Synchronize()
        if not self._chunks:
            return np.zeros(0, np.float32)
        return (np.concatenate(self._chunks).astype(np.float32) / 32768.0).astype(np.float32)


@lru_cache(maxsize=1)
def _espeak() -> _Espeak:
    return _Espeak()


def _trim(x: np.ndarray, sr: int, threshold: float = 0.01) -> np.ndarray:
    """Cut leading/trailing near-silence, keeping 20 ms either side."""
    loud = np.flatnonzero(np.abs(x) > threshold)
    if loud.size == 0:
        return x[:0]
    pad = int(0.02 * sr)
    return x[max(0, loud[0] - pad) : min(x.size, loud[-1] + pad)]


@lru_cache(maxsize=8)
def _resample_filter(up: int, down: int) -> np.ndarray:
    """scipy's own `resample_poly` low-pass (Kaiser, beta 5), designed once per ratio
    instead of on every call."""
    from scipy.signal import firwin

    max_rate = max(up, down)
    return np.asarray(firwin(2 * 10 * max_rate + 1, 1.0 / max_rate, window=("kaiser", 5.0)))


class EspeakTTS:
    """Offline speech with eSpeak NG. Output is resampled to `sample_rate` (48 kHz).

    The fixed words of a template are the same for every recipient, so each part's audio is
    kept in a small per-instance cache; only a name not heard recently is synthesized.
    `timing_only`: the samples are silence of the exact length the real audio would have,
    for intake checks that need only the durations (fitting a name into a voice line)."""

    name = "espeak-ng"
    # Bytes of part audio kept (48 kHz float32: about 5 s of speech per MB).
    CACHE_BYTES = 16 * 1024 * 1024

    def __init__(
        self,
        *,
        sample_rate: int = 48_000,
        words_per_minute: int = 165,
        pitch: int = 55,
        gap_s: float = 0.12,
        timing_only: bool = False,
    ) -> None:
        self.sample_rate = sample_rate
        self.words_per_minute = words_per_minute
        self.pitch = pitch
        self.gap_s = gap_s
        self.timing_only = timing_only
        # audio per part, or (timing_only) its length in samples
        self._parts: OrderedDict[tuple[str, Locale, int], np.ndarray | int] = OrderedDict()
        self._cached_bytes = 0

    def _part(self, eng: _Espeak, text: str, locale: Locale, wpm: int) -> np.ndarray:
        key = (text, locale, wpm)
        hit = self._parts.get(key)
        if hit is not None:
            self._parts.move_to_end(key)
            return np.zeros(hit, np.float32) if isinstance(hit, int) else hit
        raw = _trim(eng.synth(text, ESPEAK_VOICES[locale], rate_wpm=wpm, pitch=self.pitch), eng.sample_rate)
        if raw.size == 0:
            raise RenderError(f"eSpeak NG produced no sound for {text!r} ({locale.value})")
        g = np.gcd(self.sample_rate, eng.sample_rate)
        up, down = self.sample_rate // g, eng.sample_rate // g
        kept: np.ndarray | int
        if self.timing_only:
            # resample_poly's output length: ceil(n * up / down)
            kept = int(-(-raw.size * up // down))
            audio = np.zeros(kept, np.float32)
            cost = 64
        else:
            from scipy.signal import resample_poly

            h = _resample_filter(up, down).astype(raw.dtype)
            audio = kept = resample_poly(raw, up, down, window=h).astype(np.float32)
            audio.setflags(write=False)
            cost = audio.nbytes
        self._parts[key] = kept
        self._cached_bytes += cost
        while self._cached_bytes > self.CACHE_BYTES and self._parts:
            _, old = self._parts.popitem(last=False)
            self._cached_bytes -= 64 if isinstance(old, int) else old.nbytes
        return audio

    def speak(self, parts: Sequence[SpeechPart], *, rate: float = 1.0) -> Speech:
        eng = _espeak()
        wpm = max(80, min(450, round(self.words_per_minute * rate)))
        pieces: list[np.ndarray] = []
        spans: list[tuple[float, float]] = []
        pos = 0
        gap = np.zeros(int(self.gap_s * self.sample_rate / max(rate, 0.5)), np.float32)
        with _LOCK:
            for i, part in enumerate(parts):
                text = part.text.strip()
                if not text:
                    spans.append((pos / self.sample_rate, pos / self.sample_rate))
                    continue
                audio = self._part(eng, text, part.locale, wpm)
                if i and pieces:
                    pieces.append(gap)
                    pos += gap.size
                spans.append((pos / self.sample_rate, (pos + audio.size) / self.sample_rate))
                pieces.append(audio)
                pos += audio.size
        samples = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
        return Speech(samples=samples, sample_rate=self.sample_rate, spans=tuple(spans))


def make_tts(backend: str, *, sample_rate: int = 48_000, timing_only: bool = False) -> TTS:
    """The TTS for a settings value ('espeak'); other backends plug in here."""
    if backend in ("espeak", "espeak-ng"):
        return EspeakTTS(sample_rate=sample_rate, timing_only=timing_only)
    raise ValueError(f"unknown TTS backend {backend!r} (known: espeak)")
