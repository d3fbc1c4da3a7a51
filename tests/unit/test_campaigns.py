from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.campaigns import BriefError, load_brief, render_request_for, sample_brief
from pipeline.moderation.service import decide
from schemas import Decision, Finding, Severity


def test_sample_brief_extends_with_unique_ids() -> None:
    brief = sample_brief(20)
    ids = [r.id for r in brief.recipients]
    assert len(ids) == 20 and len(set(ids)) == 20
    locales = {r.locale.value for r in brief.recipients}
    assert {"zh-Hant-HK", "zh-Hans-CN", "en"} <= locales


def test_render_request_job_id_is_stable_across_runs() -> None:
    a, b = sample_brief(1), sample_brief(1)
    assert render_request_for(a, a.recipients[0]).job_id == render_request_for(b, b.recipients[0]).job_id


def test_load_brief_reports_every_bad_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "campaign_id: '../x'\ntitle: ok\ntemplate: {name: lny}\nrecipients: [{id: r1, name: ''}]\n"
    )
    with pytest.raises(BriefError) as err:
        load_brief(path)
    text = str(err.value)
    assert "campaign_id" in text and "recipients.0.name" in text


def test_load_brief_rejects_broken_yaml(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("campaign_id: [unclosed\n")
    with pytest.raises(BriefError, match="not valid YAML"):
        load_brief(path)


def _f(sev: Severity) -> Any:
    return Finding(kind="k", severity=sev, message="m")


@pytest.mark.parametrize(
    ("findings", "expected"),
    [
        ([], Decision.APPROVED),
        ([_f(Severity.INFO)], Decision.APPROVED),
        ([_f(Severity.INFO), _f(Severity.WARN)], Decision.NEEDS_REVIEW),
        ([_f(Severity.WARN), _f(Severity.BLOCK)], Decision.REJECTED),
    ],
)
def test_decision_policy(findings: list[Finding], expected: Decision) -> None:
    assert decide(findings) == expected
