"""Consent evidence: what kind of artifact a file is, judged by its content.

A consent is recorded only with an artifact a person can check later: an image (a photo of
the subject holding the signed form, a selfie with the code), an audio recording (the
subject saying the code) or a video (both). The file's extension and name mean nothing:
its first bytes must be one of the accepted formats, and the file must decode as that
format. Text files, PDFs, archives and anything else are refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.errors import GreetflowError

EvidenceKind = Literal["image", "audio", "video"]

ACCEPTED = "an image (JPEG, PNG, WebP), audio (WAV, MP3, OGG, M4A) or video (MP4, WebM, MOV)"
_MAX_IMAGE_PIXELS = 60_000_000
_PROBE_TIMEOUT_S = 60.0
_INPUT_FORMAT = re.compile(r"^Input #0, ([^,\s]+(?:,[^,\s]+)*), from", re.MULTILINE)
# ISO base media brands (the `ftyp` box) of audio-only files and of QuickTime.
_M4A_BRANDS = frozenset({b"M4A ", b"M4B ", b"M4P "})
_MOV_BRANDS = frozenset({b"qt  "})


class EvidenceError(GreetflowError):
    """The file is not an accepted consent artifact; the message says why."""


@dataclass(frozen=True)
class EvidenceType:
    kind: EvidenceKind
    format: str  # JPEG, PNG, WebP, WAV, MP3, OGG, M4A, MP4, WebM, MOV
    content_type: str
    suffix: str  # the extension the stored object gets


_TYPES: dict[str, EvidenceType] = {
    t.format: t
    for t in (
        EvidenceType("image", "JPEG", "image/jpeg", ".jpg"),
        EvidenceType("image", "PNG", "image/png", ".png"),
        EvidenceType("image", "WebP", "image/webp", ".webp"),
        EvidenceType("audio", "WAV", "audio/wav", ".wav"),
        EvidenceType("audio", "MP3", "audio/mpeg", ".mp3"),
        EvidenceType("audio", "OGG", "audio/ogg", ".ogg"),
        EvidenceType("audio", "M4A", "audio/mp4", ".m4a"),
        EvidenceType("video", "MP4", "video/mp4", ".mp4"),
        EvidenceType("video", "WebM", "video/webm", ".webm"),
        EvidenceType("video", "MOV", "video/quicktime", ".mov"),
    )
}
# The demuxer ffmpeg must pick for each sniffed container.
_DEMUXERS: dict[str, str] = {
    "WAV": "wav",
    "MP3": "mp3",
    "OGG": "ogg",
    "ISO": "mov",  # "mov,mp4,m4a,3gp,3g2,mj2"
    "WebM": "matroska",  # "matroska,webm"
}


def sniff(head: bytes) -> str | None:
    """The accepted format the first bytes announce: JPEG, PNG, WebP, WAV, MP3, OGG, WebM,
    or ISO (MP4 / MOV / M4A, told apart by the streams); None for anything else."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "WAV"
    if head.startswith(b"OggS"):
        return "OGG"
    if head.startswith(b"ID3") or _mpeg_audio_frame(head):
        return "MP3"
    if head[4:8] == b"ftyp" or head[4:8] in (b"moov", b"mdat", b"wide", b"free"):
        return "ISO"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        # EBML: Matroska or WebM; only WebM is accepted (its DocType says so).
        return "WebM" if b"\x42\x82" in head[:64] and b"webm" in head[:64] else None
    return None


def _mpeg_audio_frame(head: bytes) -> bool:
    """An MPEG audio layer III frame header (an MP3 without an ID3 tag)."""
    if len(head) < 4 or head[0] != 0xFF or head[1] & 0xE0 != 0xE0:
        return False
    version, layer = (head[1] >> 3) & 0x3, (head[1] >> 1) & 0x3
    bitrate, rate = head[2] >> 4, (head[2] >> 2) & 0x3
    return version != 1 and layer == 1 and bitrate not in (0, 15) and rate != 3


def inspect_evidence(path: Path) -> EvidenceType:
    """What kind of consent artifact `path` is, by its content; EvidenceError (one line)
    when it is none of the accepted kinds or does not decode."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            head = f.read(64)
    except OSError as exc:
        raise EvidenceError(f"evidence {p.name} cannot be read: {exc.strerror}") from None
    container = sniff(head)
    if container is None:
        raise EvidenceError(
            f"evidence {p.name} is not an accepted consent artifact: it must be {ACCEPTED} "
            f"(judged by its content, not its name; this file is {_describe(head)})"
        )
    if container in ("JPEG", "PNG", "WebP"):
        _decode_image(p, container)
        return _TYPES[container]
    return _media_type(p, container)


def _describe(head: bytes) -> str:
    if head.startswith(b"%PDF"):
        return "a PDF"
    if head.startswith(b"PK\x03\x04"):
        return "a ZIP archive or office document"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "a Matroska file, not WebM"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "of an unknown type"
    return "text" if text and all(c.isprintable() or c in "\r\n\t" for c in text) else "of an unknown type"


def _decode_image(path: Path, expected: str) -> None:
    from PIL import Image

    pil_format = {"JPEG": "JPEG", "PNG": "PNG", "WebP": "WEBP"}[expected]
    try:
        with Image.open(path) as im:
            if im.format != pil_format:
                raise EvidenceError(f"evidence {path.name} starts like {expected} but is {im.format}")
            if im.width * im.height > _MAX_IMAGE_PIXELS:
                raise EvidenceError(
                    f"evidence {path.name} is {im.width}x{im.height} pixels: at most "
                    f"{_MAX_IMAGE_PIXELS // 1_000_000} megapixels"
                )
            im.load()
    except EvidenceError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise EvidenceError(f"evidence {path.name} is not a decodable {expected} image: {exc}") from None


def _media_type(path: Path, container: str) -> EvidenceType:
    """Audio or video evidence: ffmpeg must open it with the matching demuxer and decode
    its first seconds without an error."""
    from pipeline.render.media import run_ffmpeg

    proc = run_ffmpeg(["-i", path], timeout=_PROBE_TIMEOUT_S, check=False)
    info = proc.stderr.decode("utf-8", "replace")
    fmt = _INPUT_FORMAT.search(info)
    demuxers = fmt[1].split(",") if fmt else []
    label = "MP4/MOV/M4A" if container == "ISO" else container
    if _DEMUXERS[container] not in demuxers:
        raise EvidenceError(f"evidence {path.name} starts like {label} but ffmpeg cannot read it as one")
    has_video = re.search(r"Stream #\d+:\d+.*?: Video: (?!mjpeg|png)", info) is not None
    has_audio = re.search(r"Stream #\d+:\d+.*?: Audio: ", info) is not None
    if not has_video and not has_audio:
        raise EvidenceError(f"evidence {path.name} has no audio or video stream")
    decoded = run_ffmpeg(
        ["-v", "error", "-xerror", "-i", path, "-t", "3", "-f", "null", "-"],
        timeout=_PROBE_TIMEOUT_S,
        check=False,
    )
    if decoded.returncode != 0:
        err = " ".join(decoded.stderr.decode("utf-8", "replace").split())[:200]
        raise EvidenceError(f"evidence {path.name} does not decode as {label}: {err or 'ffmpeg failed'}")
    if container == "ISO":
        with path.open("rb") as f:
            brand = f.read(12)[8:12]
        if has_video:
            return _TYPES["MOV" if brand in _MOV_BRANDS else "MP4"]
        return _TYPES["M4A"]
    if container == "WebM":
        if not has_video:
            raise EvidenceError(f"evidence {path.name} is WebM without a video stream")
        return _TYPES["WebM"]
    if has_video:
        raise EvidenceError(
            f"evidence {path.name} is {label} with a video stream: a video must be MP4, WebM or MOV"
        )
    if not has_audio:
        raise EvidenceError(f"evidence {path.name} is {label} without an audio stream")
    return _TYPES[container]
