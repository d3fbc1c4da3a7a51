"""Text layout: CJK-aware line breaking and auto-fit inside a box.

Latin text breaks at spaces; CJK text may break between any two characters except where
the rules of kinsoku shori forbid it (no closing punctuation at the start of a line, no
opening bracket at its end). Among the wrappings with at most `max_lines` lines the
largest font size wins, with a small penalty per extra line, and lines are balanced
(the narrowest wrapping with that many lines) rather than greedily filled.

This module is also the one place that decides whether a recipient's text fits: the
renderer (`compose.draw_text`, `engine._voice`) and brief intake
(`pipeline.render.templates.check_recipient`) both call `fit_text_box` and `fit_voice`,
so a name accepted at intake cannot fail at render. A text layer's `overflow` says what
happens when the style's sizes and lines are not enough: `shrink` goes below `min_size`
(down to SHRINK_FLOOR of it), `wrap` allows up to WRAP_EXTRA_LINES more lines (at most
WRAP_MAX_LINES), `reject` refuses the text.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from PIL import ImageFont

from pipeline.render.fonts import FontFace, require_glyphs
from pipeline.render.media import RenderError
from schemas.template import Overflow, TextStyle

if TYPE_CHECKING:
    from pipeline.render.tts import TTS, Speech, SpeechPart

# May not start a line (closing punctuation, small kana, prolonged sound mark...).
NO_LINE_START = frozenset(
    "、。，．,.!！?？:：;；)）]］}｝〕〉》」』】〙〗〟'’\"”»ゝゞーァィゥェォッャュョヮヵヶぁぃぅぇぉっゃゅょゎゕゖ"
    "ㇰㇱㇲㇳㇴㇵㇶㇷㇸㇹㇺㇻㇼㇽㇾㇿ々〻‐゠–〜～・…‥"
)
# May not end a line (opening brackets and quotes).
NO_LINE_END = frozenset("([｛〔〈《「『【〘〖〝‘“«（［")

LINE_PENALTY = 0.12  # a wrapping with k lines scores size / (1 + LINE_PENALTY * (k - 1))
SHRINK_FLOOR = 0.5  # overflow "shrink": down to this fraction of min_size (at least 6 px)
WRAP_EXTRA_LINES = 2  # overflow "wrap": this many lines more than max_lines...
WRAP_MAX_LINES = 6  # ... and never more than this


class TextDoesNotFit(RenderError):
    """The text does not fit its box even at the smallest size and the most lines allowed."""

    def __init__(self, message: str, *, min_size: int, max_lines: int) -> None:
        super().__init__(message)
        self.min_size = min_size
        self.max_lines = max_lines


@dataclass(frozen=True)
class FittedText:
    lines: tuple[str, ...]
    size: int
    line_height: int
    widths: tuple[int, ...]
    ink_top: int  # first ink row, relative to the block's top (anchor) row
    ink_bottom: int  # last ink row + 1, relative to the block's top row

    @property
    def width(self) -> int:
        return max(self.widths)

    @property
    def height(self) -> int:
        return self.ink_bottom - self.ink_top


@lru_cache(maxsize=512)
def _font(path: str, index: int, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size=size, index=index)


def load_font(face: FontFace, size: int) -> ImageFont.FreeTypeFont:
    """The face at a pixel size (loaded once per process and size)."""
    return _font(str(face.path), face.index, size)


def _is_wide(ch: str) -> bool:
    return unicodedata.east_asian_width(ch) in ("W", "F")


def tokens(text: str) -> list[str]:
    """Unbreakable pieces: Latin words (with their trailing space), single CJK characters;
    punctuation glued so that no line starts or ends where kinsoku forbids it."""
    raw: list[str] = []
    word = ""
    for ch in text:
        if ch == " ":
            if word:
                raw.append(word + " ")
            elif raw:
                raw[-1] += " "
            word = ""
        elif _is_wide(ch) or ch in NO_LINE_START or ch in NO_LINE_END:
            if word:
                raw.append(word)
                word = ""
            raw.append(ch)
        else:
            word += ch
    if word:
        raw.append(word)
    out: list[str] = []
    carry = ""
    for tok in raw:
        if out and tok[0] in NO_LINE_START and not carry:
            out[-1] += tok
            continue
        tok = carry + tok
        carry = ""
        if tok.rstrip()[-1:] in NO_LINE_END:
            carry = tok
            continue
        out.append(tok)
    if carry:
        if out:
            out[-1] += carry
        else:
            out.append(carry)
    return out


def _wrap(toks: Sequence[str], widths: Sequence[float], space: float, limit: float) -> list[str]:
    """Greedy wrap at `limit` px; trailing spaces do not count against the limit."""
    lines: list[list[str]] = [[]]
    cur = 0.0
    for tok, w in zip(toks, widths, strict=True):
        trail = space if tok.endswith(" ") else 0.0
        if lines[-1] and cur + w - trail > limit:
            lines.append([])
            cur = 0.0
        lines[-1].append(tok)
        cur += w
    return ["".join(ln).strip() for ln in lines if "".join(ln).strip()]


def balanced_lines(text: str, font: ImageFont.FreeTypeFont, max_lines: int) -> Iterator[list[str]]:
    """For k = 1..max_lines, the narrowest wrapping with at most k lines (deduplicated),
    each computed only when the caller asks for it."""
    paragraphs = [p.strip() for p in text.split("\n") if p.strip()]
    if len(paragraphs) > 1:  # explicit lines are kept as they are
        yield paragraphs
        return
    toks = tokens(paragraphs[0] if paragraphs else text)
    widths = [font.getlength(t) for t in toks]
    space = font.getlength(" ")
    total = sum(widths)
    out: list[list[str]] = []
    for k in range(1, max_lines + 1):
        lo, hi = max(widths) if widths else 0.0, total
        best = _wrap(toks, widths, space, hi)
        for _ in range(24):
            if hi - lo < 0.5:
                break
            mid = (lo + hi) / 2
            lines = _wrap(toks, widths, space, mid)
            if len(lines) <= k:
                best, hi = lines, mid
            else:
                lo = mid
        if len(best) <= k and best not in out:
            out.append(best)
            yield best


def _measure(face: FontFace, lines: Sequence[str], size: int, leading: float) -> FittedText:
    font = load_font(face, size)
    boxes = [font.getbbox(ln, anchor="ma") for ln in lines]
    line_height = round(size * leading)
    return FittedText(
        lines=tuple(lines),
        size=size,
        line_height=line_height,
        widths=tuple(math.ceil(b[2] - b[0]) for b in boxes),
        ink_top=math.floor(min(b[1] + i * line_height for i, b in enumerate(boxes))),
        ink_bottom=math.ceil(max(b[3] + i * line_height for i, b in enumerate(boxes))),
    )


def fit_block(
    text: str,
    face: FontFace,
    *,
    max_width: int,
    max_height: int,
    max_size: int,
    min_size: int,
    leading: float = 1.25,
    max_lines: int = 2,
    check_only: bool = False,
) -> FittedText:
    """The largest, balanced layout of `text` inside max_width x max_height.

    Raises TextDoesNotFit when even min_size does not fit in max_lines lines. With
    `check_only`, the search stops there: a layout at min_size comes back (intake only
    needs to know that the text fits, and fitting is decided by exactly that test).
    """
    require_glyphs(face, text)
    if min_size > max_size:
        min_size = max_size

    def best_at(size: int, *, first: bool = False) -> tuple[float, FittedText] | None:
        """The best-scoring layout at `size` (`first`: the first that fits, in the order of
        balanced_lines: fewest lines first)."""
        font = load_font(face, size)
        best: tuple[float, FittedText] | None = None
        for lines in balanced_lines(text, font, max_lines):
            if len(lines) > max_lines:
                continue
            m = _measure(face, lines, size, leading)
            if m.width <= max_width and m.height <= max_height:
                score = size / (1 + LINE_PENALTY * (len(lines) - 1))
                if first:
                    return score, m
                if best is None or score > best[0]:
                    best = (score, m)
        return best

    # fits(size) is monotone enough for a binary search on the largest size that fits
    smallest = best_at(min_size, first=check_only)
    if smallest is None:
        raise TextDoesNotFit(
            f"text {text!r} does not fit in {max_width}x{max_height} px in {max_lines} lines "
            f"even at {min_size} px",
            min_size=min_size,
            max_lines=max_lines,
        )
    if check_only:
        return smallest[1]
    lo, hi = min_size, max_size
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if best_at(mid) is not None:
            lo = mid
        else:
            hi = mid - 1
    # a smaller size with fewer lines may score better: compare a few candidates
    top = best_at(lo)
    if top is None:  # best_at(min_size) fit, and the search only keeps sizes that fit
        raise RenderError(f"text {text!r} lost its fit at {lo} px")
    for size in range(lo - 1, max(min_size, round(lo / (1 + LINE_PENALTY))) - 1, -1):
        cand = best_at(size)
        if cand is not None and len(cand[1].lines) < len(top[1].lines) and cand[0] > top[0]:
            top = cand
            break
    return top[1]


def fit_text_box(
    text: str,
    face: FontFace,
    *,
    box_width: int,
    box_height: int,
    style: TextStyle,
    scale: float,
    ornament: bool = False,
    pill: bool = False,
    overflow: Overflow = "reject",
    check_only: bool = False,
) -> FittedText:
    """`text` fitted into a text layer's box (frame px) the way the renderer draws it: room
    for the stroke, the ornament under the text or the pill behind it, then the layer's
    overflow rule. Raises TextDoesNotFit. `check_only`: see fit_block."""
    div_h = max(8, round(30 * scale)) if ornament else 0
    gap = round(40 * scale) if ornament else 0
    stroke_room = round(16 * scale) if style.stroke else 0
    max_width = max(8, box_width - stroke_room - (round(60 * scale) if pill else 0))
    max_height = max(8, box_height - div_h - gap - (round(30 * scale) if pill else 0))
    max_size = max(6, round(style.max_size * scale))
    min_size = max(6, round(style.min_size * scale))

    def fit(min_px: int, max_lines: int) -> FittedText:
        return fit_block(
            text,
            face,
            max_width=max_width,
            max_height=max_height,
            max_size=max_size,
            min_size=min_px,
            leading=style.leading,
            max_lines=max_lines,
            check_only=check_only,
        )

    try:
        return fit(min_size, style.max_lines)
    except TextDoesNotFit:
        if overflow == "reject":
            raise
    if overflow == "shrink":
        return fit(max(6, math.floor(min_size * SHRINK_FLOOR)), style.max_lines)
    return fit(min_size, min(WRAP_MAX_LINES, max(style.max_lines, style.max_lines + WRAP_EXTRA_LINES)))


class VoiceDoesNotFit(RenderError):
    """A voice line that is longer than its window even at the template's max_rate."""

    def __init__(self, message: str, *, duration_s: float, room_s: float, rate: float) -> None:
        super().__init__(message)
        self.duration_s = duration_s
        self.room_s = room_s
        self.rate = rate


def fit_voice(tts: TTS, parts: Sequence[SpeechPart], *, room_s: float, max_rate: float) -> Speech:
    """Speak `parts` at normal speed; a line longer than `room_s` is spoken faster (the rate
    that should just fit, then `max_rate`). Raises VoiceDoesNotFit."""
    speech = tts.speak(parts, rate=1.0)
    if speech.duration_s <= room_s:
        return speech
    rate = min(max_rate, speech.duration_s / room_s * 1.04)
    speech = tts.speak(parts, rate=rate)
    if speech.duration_s > room_s and rate < max_rate:
        rate = max_rate
        speech = tts.speak(parts, rate=rate)
    if speech.duration_s > room_s:
        raise VoiceDoesNotFit(
            f"takes {speech.duration_s:.2f} s even at {rate:.2f}x; the template leaves {room_s:.2f} s",
            duration_s=speech.duration_s,
            room_s=room_s,
            rate=rate,
        )
    return speech
