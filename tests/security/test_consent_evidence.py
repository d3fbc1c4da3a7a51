"""Consent evidence is checked by its content, on the real stack (moto S3, Tansu, SQLite)
through the real ConsentService and the `greetflow consent grant` command: a text file
holding the challenge code is refused (one line, no traceback), so is anything that only
looks like an accepted type, a face consent whose artifact shows somebody else or is the
consented photo itself, and an audio artifact for a face consent; a matching face photo is
accepted, and after every refusal the next valid grant works."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.bootstrap import Container
from pipeline.consent.service import ConsentError, ConsentService
from pipeline.dev.stack import DevStack
from pipeline.render.media import run_ffmpeg
from tests import faces
from tests.integration.pipeline_fixtures import stack_settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    settings = stack_settings(tmp_path_factory.mktemp("consent-evidence") / "data")
    with DevStack(settings, log=lambda _m: None):
        c = Container(settings)
        _ = c.db
        try:
            yield c
        finally:
            c.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("evidence")
    grace, selfie, astronaut = faces.grace(d), faces.grace_selfie(d / "s"), faces.astronaut(d)
    text = d / "consent.txt"
    text.write_text("I, Grace, consent to my likeness in greeting videos.\n", encoding="utf-8")
    fake = d / "form.jpg"  # a JPEG's first bytes, then text
    fake.write_bytes(b"\xff\xd8\xff\xe0" + b"I consent " * 50)
    renamed = d / "selfie.txt"  # a real JPEG under a text name
    renamed.write_bytes(selfie.read_bytes())
    wav = d / "consent.wav"
    run_ffmpeg(["-y", "-f", "lavfi", "-i", "sine=frequency=440:duration=1", wav], timeout=60)
    return {
        "grace": grace,
        "selfie": selfie,
        "astronaut": astronaut,
        "text": text,
        "fake": fake,
        "renamed": renamed,
        "wav": wav,
    }


def grant(
    svc: ConsentService, subject: str, evidence: Path, *, scopes: str = "face", photo: Path | None = None
) -> None:
    code = svc.challenge(subject, issued_by="op").code
    svc.grant(
        subject,
        scopes=scopes.split(","),
        purpose="*",
        evidence=evidence,
        challenge_code=code,
        recorded_by="op",
        photo=photo,
    )


def refused(svc: ConsentService, subject: str, evidence: Path, pattern: str, **kw: object) -> str:
    with pytest.raises(ConsentError) as err:
        grant(svc, subject, evidence, **kw)  # type: ignore[arg-type]
    message = str(err.value)
    assert re.search(pattern, message), message
    assert "\n" not in message
    assert svc.show(subject).records == ()  # nothing recorded
    return message


def test_text_evidence_is_refused_by_the_cli_in_one_line(world: Container, files: dict[str, Path]) -> None:
    s = world.settings
    env = dict(os.environ)
    env.update(
        {
            "GREETFLOW_DATA_DIR": str(s.data_dir),
            "GREETFLOW_KAFKA_BOOTSTRAP": s.kafka_bootstrap,
            "GREETFLOW_S3_ENDPOINT": s.s3_endpoint,
            "GREETFLOW_DATABASE_URL": "",
        }
    )
    svc = world.consent_service()
    code = svc.challenge("cli-grace", issued_by="op").code
    files["text"].write_text(f"I, Grace, consent. Code: {code}\n", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "--log-level", "WARNING", "consent", "grant", "cli-grace",
         "--scopes", "name", "--purpose", "*", "--evidence", str(files["text"]), "--code", code],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("error: evidence consent.txt is not an accepted consent artifact")
    assert "this file is text" in lines[0]
    assert svc.show("cli-grace").records == ()
    # The code is not spent by the refusal: the same subject's next, valid grant works.
    rec = svc.grant(
        "cli-grace",
        scopes=["name"],
        purpose="*",
        evidence=files["selfie"],
        challenge_code=code,
        recorded_by="op",
    )
    assert rec.evidence_key is not None and rec.evidence_key.endswith(".jpg")


def test_evidence_is_judged_by_content_not_by_name(world: Container, files: dict[str, Path]) -> None:
    svc = world.consent_service()
    refused(
        svc, "s-text", files["text"], r"not an accepted consent artifact.*this file is text", scopes="name"
    )
    refused(svc, "s-fake", files["fake"], r"form\.jpg is not a decodable JPEG image", scopes="name")
    # A real JPEG named .txt is an image: accepted, stored as image/jpeg under .jpg.
    code = svc.challenge("s-renamed", issued_by="op").code
    rec = svc.grant(
        "s-renamed",
        scopes=["name"],
        purpose="*",
        evidence=files["renamed"],
        challenge_code=code,
        recorded_by="op",
    )
    assert rec.evidence_key is not None and rec.evidence_key.endswith(".jpg")
    stat = world.store.client.stat_object(world.settings.bucket_assets, rec.evidence_key)
    assert stat.content_type == "image/jpeg"
    # Audio is evidence for a voice or name consent.
    grant(svc, "s-voice", files["wav"], scopes="voice,name")
    assert svc.show("s-voice").records[0].evidence_key.endswith(".wav")  # type: ignore[union-attr]


def test_face_consent_evidence_must_show_the_granted_face(world: Container, files: dict[str, Path]) -> None:
    svc = world.consent_service()
    photo = files["grace"]
    msg = refused(svc, "s-other", files["astronaut"], r"does not match the consented photo", photo=photo)
    print(msg)
    refused(svc, "s-same", photo, r"is the consented photo itself", photo=photo)
    refused(svc, "s-audio", files["wav"], r"is audio \(WAV\): a consent with scope face needs", photo=photo)
    refused(svc, "s-text2", files["text"], r"not an accepted consent artifact", photo=photo)
    # A matching photo of the subject (another picture of her) is accepted.
    grant(svc, "s-grace", files["selfie"], photo=photo)
    view = svc.show("s-grace")
    assert view.reference_faces == 1 and [r.action for r in view.records] == ["grant"]
