"""Review queue units: password hashing, escaping in every template, age formatting, roles."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.review.app import _age, _templates
from pipeline.review.repository import parse_role
from pipeline.review.service import InvalidInput, hash_password, token_digest, validate_reviewer_name


def test_passwords_are_argon2id_and_salted() -> None:
    a, b = hash_password("correct horse battery staple"), hash_password("correct horse battery staple")
    assert a.startswith("$argon2id$") and a != b
    assert "correct horse" not in a


def test_session_tokens_are_stored_as_digests() -> None:
    assert len(token_digest("x")) == 64 and token_digest("x") != token_digest("y")


@pytest.mark.parametrize("name", ["", "a b", "<script>", "x" * 65, "-lead"])
def test_bad_reviewer_names(name: str) -> None:
    with pytest.raises(InvalidInput):
        validate_reviewer_name(name)


def test_roles() -> None:
    assert parse_role("lead") == "lead"
    with pytest.raises(ValueError):
        parse_role("admin")


def test_age() -> None:
    assert _age(59) == "0 min" and _age(3 * 3600 + 12 * 60) == "3 h 12 min" and _age(90_000) == "1 d 1 h"


def test_every_template_autoescapes() -> None:
    env = _templates().env
    names = [p.name for p in (Path(__file__).parents[2] / "pipeline/review/templates").glob("*.html")]
    assert {"base.html", "queue.html", "case.html", "login.html", "error.html"} <= set(names)
    for name in names:
        assert env.autoescape is True or env.autoescape(name)  # type: ignore[operator]
    html = env.get_template("error.html").render(who=None, message="<script>alert(1)</script>", notice=None)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>alert" not in html
