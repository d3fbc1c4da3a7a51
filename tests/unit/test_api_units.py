"""Pure logic of the render API: key hashing, scopes, the rate limiter, idempotency hashes,
image checks."""

from __future__ import annotations

import hashlib
import io

import pytest
from PIL import Image

from pipeline.api.auth import RateLimiter, parse_scopes, require_scope
from pipeline.api.repository import TOKEN_PREFIX, hash_token, new_token
from pipeline.api.service import ApiError, check_idempotency_key, inspect_image, request_hash


def test_tokens_are_random_and_only_their_sha256_is_kept() -> None:
    a, b = new_token(), new_token()
    assert a != b and a.startswith(TOKEN_PREFIX) and len(a) >= 40
    assert hash_token(a) == hashlib.sha256(a.encode()).hexdigest()
    assert hash_token(a) != hash_token(b) and a not in hash_token(a)


def test_scopes_are_checked() -> None:
    assert parse_scopes(" renders:write, jobs:read ") == frozenset({"renders:write", "jobs:read"})
    with pytest.raises(ValueError, match=r"unknown scope.*admin"):
        parse_scopes("jobs:read,admin")
    with pytest.raises(ValueError, match="at least one"):
        parse_scopes(" , ")
    with pytest.raises(ValueError, match="unknown scope"):
        require_scope("everything")


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_token_bucket_allows_bursts_then_refills_at_the_rate() -> None:
    clock = Clock()
    limiter = RateLimiter(per_min=60, burst=3, clock=clock)
    assert [limiter.take("k") for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.take("k")
    assert 0.9 < wait <= 1.0  # one token a second
    assert limiter.take("other") == 0.0  # per key
    clock.t += 1.0
    assert limiter.take("k") == 0.0
    assert limiter.take("k") > 0
    # A key's own limit: 6 a minute, bursts no larger than that.
    assert [limiter.take("slow", 6) == 0.0 for _ in range(4)] == [True, True, True, False]
    assert limiter.take("slow", 6) == pytest.approx(10.0, abs=0.01)


def test_request_hash_ignores_key_order_but_not_values() -> None:
    a = {"recipient": {"id": "r", "name": "A"}, "template": {"name": "t"}}
    b = {"template": {"name": "t"}, "recipient": {"name": "A", "id": "r"}}
    assert request_hash(a) == request_hash(b)
    assert request_hash(a) != request_hash({**a, "locale": "en"})


def test_idempotency_keys_are_bounded() -> None:
    assert check_idempotency_key(" order-1 ") == "order-1"
    for bad in ("", " ", "x" * 256, "a\nb"):
        with pytest.raises(ApiError) as exc:
            check_idempotency_key(bad)
        assert exc.value.status == 400


def _encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def test_images_are_judged_by_content_and_size_before_decoding() -> None:
    rgb = Image.effect_noise((120, 80), 40).convert("RGB")
    for fmt in ("JPEG", "PNG", "WEBP"):
        checked = inspect_image(_encoded(rgb, fmt), max_pixels=10_000)
        assert (checked.format, checked.width, checked.height) == (fmt, 120, 80)
    with pytest.raises(ApiError) as exc:
        inspect_image(_encoded(rgb, "GIF"), max_pixels=10_000)
    assert exc.value.status == 415
    with pytest.raises(ApiError) as exc:
        inspect_image(_encoded(rgb, "PNG"), max_pixels=9_000)
    assert exc.value.status == 413
    jpeg = _encoded(Image.effect_noise((400, 300), 40).convert("RGB"), "JPEG")
    with pytest.raises(ApiError) as exc:
        inspect_image(jpeg[: len(jpeg) * 2 // 3], max_pixels=1_000_000)
    assert exc.value.status == 422 and "truncated" in exc.value.detail
    with pytest.raises(ApiError) as exc:
        inspect_image(b"", max_pixels=1_000_000)
    assert exc.value.status == 415
