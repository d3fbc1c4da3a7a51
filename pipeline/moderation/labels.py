"""The visible AI label: is it on screen for the required time?

GB 45438 wants a visible label at the start of a generated video. The renderer draws the
label text that the clip's template declares (schemas.provenance.VISIBLE_AI_LABEL unless
the template says otherwise), light on a dark pill, near the top-left of the safe area.
The check looks for that same text (`expected_label_text`). This module does
not depend on how: it renders the label text itself and finds it in sampled frames by
normalised cross-correlation over a range of text sizes, anywhere in the top-left search
region. So a template may move or resize the label and the check still holds; what it
assumes is the LabelSpec below (text, single line, light on darker, in the region).
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.settings import Settings
from schemas.brief import TemplateRef
from schemas.common import Locale
from schemas.events import Finding, Severity
from schemas.provenance import VISIBLE_AI_LABEL, LabelSighting, VisibleLabelReport

log = logging.getLogger(__name__)


def expected_label_text(template: TemplateRef | None = None, templates_dir: Path | None = None) -> str:
    """The label text a job's clip must show: what its template declares, else the default.

    A template that cannot be loaded here gives the default text: a clip whose template
    declared another label then fails the check (it never passes unchecked)."""
    if template is None:
        return VISIBLE_AI_LABEL
    from pipeline.render.templates import TemplateError, get_template, label_text

    try:
        return label_text(get_template(template, templates_dir).template)
    except TemplateError as exc:
        log.warning("label check of template %s uses the default label text: %s", template.name, exc)
        return VISIBLE_AI_LABEL


@dataclass(frozen=True)
class LabelSpec:
    """Where and how large the visible label may be, as fractions of the frame."""

    text: str = VISIBLE_AI_LABEL
    # search region: x0, y0, x1, y1 as fractions of the frame width / height
    region: tuple[float, float, float, float] = (0.0, 0.0, 0.8, 0.3)
    # font size range, as a fraction of the frame height (the renderer draws 34/1920)
    min_size: float = 0.010
    max_size: float = 0.035
    size_step: float = 1.12


TEMPLATE_PX = 22  # font size of the rendered template; the frame region is scaled to it


@lru_cache(maxsize=8)
def _template(text: str) -> np.ndarray:
    """The label text, white on black with a dark margin, as float64 in [0, 1]."""
    from pipeline.render.fonts import find_font_face

    face = find_font_face(text, Locale.ZH_HANS_CN, weight="regular")
    font = ImageFont.truetype(str(face.path), TEMPLATE_PX, index=face.index)
    left, top, right, bottom = font.getbbox(text)
    m = round(TEMPLATE_PX * 0.25)
    img = Image.new("L", (int(right - left) + 2 * m, int(bottom - top) + 2 * m), 0)
    ImageDraw.Draw(img).text((m - left, m - top), text, font=font, fill=255)
    return np.asarray(img, dtype=np.float64) / 255.0


def _box_sums(a: np.ndarray, h: int, w: int) -> np.ndarray:
    ii = np.zeros((a.shape[0] + 1, a.shape[1] + 1))
    ii[1:, 1:] = a.cumsum(0).cumsum(1)
    return ii[h:, w:] - ii[:-h, w:] - ii[h:, :-w] + ii[:-h, :-w]


def _fast_len(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n (FFT sizes that pocketfft handles fastest)."""
    best = 1 << max(0, (n - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


def ncc(image: np.ndarray, template: np.ndarray) -> np.ndarray:
    """Normalised cross-correlation of `template` at every valid position of `image`."""
    h, w = template.shape
    if image.shape[0] < h or image.shape[1] < w:
        return np.zeros((0, 0))
    t = template - template.mean()
    t_norm = math.sqrt(float((t * t).sum()))
    fh, fw = _fast_len(image.shape[0] + h - 1), _fast_len(image.shape[1] + w - 1)
    spec = np.fft.rfft2(image, (fh, fw)) * np.fft.rfft2(t[::-1, ::-1], (fh, fw))
    corr = np.fft.irfft2(spec, (fh, fw))[h - 1 : image.shape[0], w - 1 : image.shape[1]]
    s1 = _box_sums(image, h, w)
    s2 = _box_sums(image * image, h, w)
    var = np.maximum(s2 - s1 * s1 / (h * w), 0.0)
    denom = np.sqrt(var) * t_norm
    out = np.zeros_like(corr)
    ok = denom > 1e-6
    out[ok] = corr[ok] / denom[ok]
    return out


_Outcome = tuple[bool, float | None, tuple[int, int, int, int] | None, float]


class _SearchCache:
    """Outcomes of label searches by what decides them: the spec, the threshold, the region
    and frame height, the size locked from earlier frames, and the region's pixels. A
    template's shared intro and outro decode to the same pixels in every clip, so their
    frames are searched once per process; a search of other pixels runs in full."""

    def __init__(self, entries: int = 1024) -> None:
        self._entries = entries
        self._data: OrderedDict[tuple[object, ...], _Outcome] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[object, ...]) -> _Outcome | None:
        with self._lock:
            hit = self._data.get(key)
            if hit is not None:
                self._data.move_to_end(key)
            return hit

    def put(self, key: tuple[object, ...], value: _Outcome) -> None:
        with self._lock:
            self._data[key] = value
            while len(self._data) > self._entries:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


_SEARCHES = _SearchCache()


class LabelDetector:
    """Finds the visible label in frames, coarse-to-fine over text sizes. Keeps the size
    found in one frame to search the next frames of the same clip around it (a clip keeps
    its label size)."""

    FINE = (0.94, 0.97, 1.0, 1.03, 1.06)

    def __init__(
        self,
        spec: LabelSpec | None = None,
        *,
        threshold: float = 0.5,
        label_text: str = VISIBLE_AI_LABEL,
        cache: bool = False,
    ) -> None:
        """`label_text`: the text to look for when no `spec` is given (see expected_label_text).
        `cache`: reuse the outcome of a search over pixels searched before (see _SearchCache)."""
        self.spec = spec or LabelSpec(text=label_text)
        self.threshold = threshold
        self._template = _template(self.spec.text)
        sizes = []
        f = self.spec.min_size
        while f <= self.spec.max_size * 1.0001:
            sizes.append(f)
            f *= self.spec.size_step
        self.sizes: tuple[float, ...] = tuple(sizes)
        self._locked: float | None = None
        self._last_box: tuple[int, int, int, int] | None = None
        self._cache = _SEARCHES if cache else None

    def _match(
        self, gray: Image.Image, size: float, frame_h: int
    ) -> tuple[float, tuple[float, float], float]:
        """(score, (x, y) of the best match in region pixels, scale k) at one text size."""
        k = TEMPLATE_PX / (size * frame_h)
        dims = (max(1, round(gray.width * k)), max(1, round(gray.height * k)))
        region = np.asarray(gray.resize(dims, Image.Resampling.BILINEAR), dtype=np.float64) / 255.0
        scores = ncc(region, self._template)
        if scores.size == 0:
            return -1.0, (0.0, 0.0), k
        pos = np.unravel_index(int(np.argmax(scores)), scores.shape)
        return float(scores[pos]), (pos[1] / k, pos[0] / k), k

    def find(self, rgb: np.ndarray, t: float = 0.0) -> LabelSighting | None:
        """The label in one RGB frame, or None when no match reaches the threshold."""
        h, w = rgb.shape[:2]
        x0f, y0f, x1f, y1f = self.spec.region
        region = (int(w * x0f), int(h * y0f), int(w * x1f), int(h * y1f))
        if self._last_box is not None:
            # Where it was in the previous frame first (cheap); the whole region if not there.
            bx0, by0, bx1, by1 = self._last_box
            mx, my = (bx1 - bx0) // 3, (by1 - by0)
            near = (max(region[0], bx0 - mx), max(region[1], by0 - my),
                    min(region[2], bx1 + mx), min(region[3], by1 + my))  # fmt: skip
            hit = self._find_in(rgb, near, t)
            if hit is not None:
                return hit
        return self._find_in(rgb, region, t)

    def _find_in(self, rgb: np.ndarray, region: tuple[int, int, int, int], t: float) -> LabelSighting | None:
        x0, y0, x1, y1 = region
        crop = np.ascontiguousarray(rgb[y0:y1, x0:x1])
        if self._cache is None:
            return self._search(crop, rgb.shape[0], region, t)
        key = (
            self.spec, self.threshold, region, rgb.shape[0], self._locked,
            hashlib.blake2b(crop.data, digest_size=20).digest(),
        )  # fmt: skip
        hit = self._cache.get(key)
        if hit is not None:
            found, size, box, score = hit
            if not found:
                return None
            self._locked, self._last_box = size, box
            return LabelSighting(t=round(t, 3), score=score, box=box)
        sighting = self._search(crop, rgb.shape[0], region, t)
        if sighting is None:
            self._cache.put(key, (False, None, None, 0.0))
        else:
            self._cache.put(key, (True, self._locked, sighting.box, sighting.score))
        return sighting

    def _search(
        self, crop: np.ndarray, h: int, region: tuple[int, int, int, int], t: float
    ) -> LabelSighting | None:
        """The best match in `crop` (the pixels of `region` of a frame `h` high)."""
        x0, y0 = region[0], region[1]
        gray = Image.fromarray(crop).convert("L")
        if self._locked is not None:
            centre = self._locked
        else:
            coarse = [(self._match(gray, size, h)[0], size) for size in self.sizes]
            centre = max(coarse)[1]
        best: tuple[float, float, tuple[float, float], float] | None = None
        for factor in self.FINE:
            size = centre * factor
            score, (bx, by), k = self._match(gray, size, h)
            if best is None or score > best[0]:
                best = (score, size, (bx, by), k)
        if best is None:  # FINE is not empty: never happens
            return None
        score, size, (bx, by), k = best
        if score < self.threshold:
            return None
        self._locked = size
        th, tw = self._template.shape
        box = (round(x0 + bx), round(y0 + by), round(x0 + bx + tw / k), round(y0 + by + th / k))
        self._last_box = box
        return LabelSighting(t=round(t, 3), score=round(score, 3), box=box)


def visible_label_report(
    frames: Sequence[tuple[float, LabelSighting | None]],
    *,
    duration_s: float,
    required_s: float,
) -> VisibleLabelReport:
    """Judge sampled frames (time, sighting or None): the label must show in every sampled
    frame from the start until `required_s` (or the whole clip when it is shorter)."""
    ordered = sorted(frames, key=lambda f: f[0])
    sightings = tuple(s for _, s in ordered if s is not None)
    if not ordered:
        return VisibleLabelReport(
            ok=False, required_s=required_s, shown_from_start_s=0.0, duration_s=duration_s,
            message="no frames were sampled",
        )  # fmt: skip
    first_miss = next((t for t, s in ordered if s is None), None)
    shown = duration_s if first_miss is None else first_miss
    need = min(required_s, duration_s)
    starts = ordered[0][0] <= 0.1
    ok = starts and shown >= need - 1e-6
    if ok:
        msg = f"label shown from the start for {shown:.1f}s (required {need:.1f}s)"
    elif not starts:
        msg = f"no frame sampled at the start (first at {ordered[0][0]:.2f}s)"
    else:
        msg = f"label missing at {shown:.1f}s; required from the start for {need:.1f}s"
    return VisibleLabelReport(
        ok=ok,
        required_s=required_s,
        shown_from_start_s=round(shown, 3),
        duration_s=round(duration_s, 3),
        sightings=sightings,
        message=msg,
    )


def label_findings(report: VisibleLabelReport) -> list[Finding]:
    evidence = {
        "required_s": report.required_s,
        "shown_from_start_s": report.shown_from_start_s,
        "frames_with_label": len(report.sightings),
        "first": report.sightings[0].model_dump(mode="json") if report.sightings else None,
    }
    if report.ok:
        return [
            Finding(kind="label_visible", severity=Severity.INFO, message=report.message, evidence=evidence)
        ]
    return [
        Finding(
            kind="label_missing",
            severity=Severity.BLOCK,
            message=f"visible AI label check failed: {report.message}",
            evidence=evidence,
        )
    ]


def check_visible_label(
    video: Path, settings: Settings, *, label_text: str = VISIBLE_AI_LABEL
) -> VisibleLabelReport:
    """Sample a clip (densely over the label window) and judge its visible label, which must
    read `label_text` (the clip's template's label: expected_label_text)."""
    from pipeline.faces import sample_clip

    clip = sample_clip(video, settings)
    detector = LabelDetector(threshold=settings.label_match_threshold, label_text=label_text)
    frames = [(fr.t, detector.find(fr.image, fr.t)) for fr in clip.frames]
    return visible_label_report(frames, duration_s=clip.duration_s, required_s=settings.label_min_seconds)
