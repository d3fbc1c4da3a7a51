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


def _reject_template(tmp_path: Path) -> None:
    from pipeline.render.templates import shipped_templates_dir

    shipped = (shipped_templates_dir() / "lunar-new-year.yaml").read_text(encoding="utf-8")
    variant = shipped.replace('version: "1"', 'version: "reject"').replace(
        "overflow: shrink", "overflow: reject"
    )
    (tmp_path / "lny-reject.yaml").write_text(variant, encoding="utf-8")


def test_the_fit_worker_refuses_a_name_as_the_plain_check_does(tmp_path: Path) -> None:
    """Chunks after the first are measured in a worker process; a name that does not fit
    fails `drain` with the error the in-process check gives."""
    from pipeline.campaigns import TemplateFit, parse_brief
    from pipeline.settings import get_settings
    from schemas.brief import Recipient

    _reject_template(tmp_path)
    settings = get_settings().model_copy(update={"templates_dir": tmp_path})
    brief = parse_brief(
        {
            "campaign_id": "fit-workers",
            "title": "fit",
            "template": {"name": "lunar-new-year", "version": "reject"},
            "default_locale": "en",
            "audience_key": "a.csv",
        }
    )
    wolf = "WOLFESCHLEGELSTEINHAUSENBERG"  # 28 characters: refused by overflow reject
    chunks = [
        [Recipient(id=f"a-{i}", name=n, locale="en") for i, n in enumerate(["Amy Lee", "Ben Chan"])],
        [Recipient(id=f"b-{i}", name=n, locale="en") for i, n in enumerate(["Chloe Wong", "Amy Lee"])],
        [
            Recipient(id="c-1", name=wolf, locale="en"),
            Recipient(id="c-2", name="Dan Ho", locale="en"),
            Recipient(id="c-3", name=wolf, locale="en"),
        ],
    ]

    def refusal(workers: int) -> str:
        fit = TemplateFit(brief, workers=workers, settings=settings)
        try:
            with pytest.raises(BriefError) as err:
                for chunk in chunks:
                    fit.check(chunk)
                fit.drain()
        finally:
            fit.close()
        return str(err.value)

    parallel = refusal(1)
    assert "recipient c-1: name 'WOLFESCHLEGELSTEINHAUSENBERG'" in parallel
    assert "overflow: reject" in parallel
    assert parallel == refusal(0)

    # the same audience without the long name passes, the worker's shapes remembered
    fit = TemplateFit(brief, workers=1, settings=settings)
    for chunk in chunks[:2]:
        fit.check(chunk)
    fit.drain()
    fit.check([Recipient(id="d-1", name="Chloe Wong", locale="en")])  # known: nothing measured
