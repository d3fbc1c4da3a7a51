"""Keyed job ids, producer signatures (rotation, tampering), dev secrets, the row check,
the drawn-text check and the Kafka security options: pure logic, no services."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from pydantic import SecretStr

from pipeline.adapters.kafka import kafka_client_config
from pipeline.errors import ConfigError
from pipeline.moderation.text import AbuseLists, ExpectedTexts, drawn_text_findings
from pipeline.settings import Settings
from pipeline.trust import (
    JobIds,
    ProducerKeys,
    UntrustedMessage,
    check_request_matches_row,
    dev_secret,
    parse_producer_keys,
)
from schemas.brief import Recipient, SubjectUse, TemplateRef
from schemas.common import Scope, job_id_for
from schemas.events import DrawnText, DrawnTexts, Envelope, RenderRequested, parse_envelope

K1 = "k1-" + "a" * 40
K2 = "k2-" + "b" * 40


def _settings(tmp_path: Path, **kw: object) -> Settings:
    return Settings(data_dir=tmp_path / "data", **kw)  # type: ignore[arg-type]


def _req(name: str = "陳大文", scopes: frozenset[Scope] | None = None) -> RenderRequested:
    subjects = (
        SubjectUse(subject_id="s1", scopes=scopes or frozenset([Scope.FACE, Scope.NAME, Scope.VOICE])),
    )
    return RenderRequested(
        job_id=job_id_for(b"x" * 32, "c1", "r1", "lunar-new-year", "1"),
        campaign_id="c1",
        recipient=Recipient(id="r1", name=name, locale="zh-Hant-HK", subjects=subjects),
        template=TemplateRef(name="lunar-new-year"),
        locale="zh-Hant-HK",
    )


# --------------------------------------------------------------------------- job ids


def test_job_id_is_an_hmac_of_the_parts_formatted_as_a_uuid() -> None:
    key = b"s" * 32
    a = job_id_for(key, "c1", "r1", "lny", "1")
    assert a == job_id_for(key, "c1", "r1", "lny", "1")  # re-runs map to the same job
    assert a.version == 8 and a.variant == uuid.RFC_4122
    assert a != uuid.uuid5(uuid.UUID("6f1d7c3e-2b7a-5c1e-9a4e-6b1f0c9d2e11"), "job:c1/r1/lny@1")
    assert a != job_id_for(b"t" * 32, "c1", "r1", "lny", "1")
    # the separator cannot be forged by shifting text between parts
    assert job_id_for(key, "c1", "r1x", "lny", "1") != job_id_for(key, "c1r", "1x", "lny", "1")
    with pytest.raises(ValueError):
        job_id_for(b"", "c1", "r1", "lny", "1")


def test_dev_job_id_key_is_generated_once_with_mode_0600_and_kept(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    first = JobIds.from_settings(s)
    path = s.data_dir / "secrets" / "job-id.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert JobIds.from_settings(s) == first
    assert first.job_id("c", "r", "t", "1") == JobIds.from_settings(s).job_id("c", "r", "t", "1")
    assert dev_secret(s, "producer") != first.key  # one secret per purpose


def test_production_refuses_a_missing_or_short_job_id_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="GREETFLOW_JOB_ID_KEY is not set"):
        JobIds.from_settings(_settings(tmp_path, environment="production"))
    assert not (tmp_path / "data" / "secrets").exists()
    with pytest.raises(ConfigError, match="at least 32"):
        JobIds.from_settings(_settings(tmp_path, environment="production", job_id_key=SecretStr("short")))
    keyed = JobIds.from_settings(_settings(tmp_path, environment="production", job_id_key=SecretStr(K1)))
    assert keyed.key == K1.encode()


# --------------------------------------------------------------------------- signatures


def _keys(tmp_path: Path, keys: str, key_id: str = "") -> ProducerKeys:
    return ProducerKeys.from_settings(
        _settings(tmp_path, producer_keys=SecretStr(keys), producer_key_id=key_id)
    )


def test_signed_envelope_verifies_after_a_round_trip_through_json(tmp_path: Path) -> None:
    keys = _keys(tmp_path, f"old:{K1}")
    env = keys.sign(Envelope.wrap(_req()))
    assert env.signature is not None and env.signature.key_id == "old"
    back = parse_envelope(env.model_dump_json(), RenderRequested)
    assert keys.verify(back, what="request") == "old"


def test_signature_survives_another_hash_seed(tmp_path: Path) -> None:
    """Sets have no order in JSON: a producer process with another PYTHONHASHSEED must sign
    the same canonical bytes as this one reads."""
    code = (
        "import sys; from pydantic import SecretStr; from pipeline.settings import Settings;"
        "from pipeline.trust import ProducerKeys; from tests.unit.test_trust import _req, K1;"
        "from schemas.events import Envelope;"
        "k = ProducerKeys.from_settings(Settings(producer_keys=SecretStr('old:' + K1)));"
        "sys.stdout.write(k.sign(Envelope.wrap(_req())).model_dump_json())"
    )
    root = Path(__file__).resolve().parents[2]
    for seed in ("1", "2", "3"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            check=True,
            cwd=root,
        ).stdout
        assert _keys(tmp_path, f"old:{K1}").verify(parse_envelope(out, RenderRequested), what="r") == "old"


def test_rotation_accepts_every_listed_key_and_signs_with_the_chosen_one(tmp_path: Path) -> None:
    old = _keys(tmp_path, f"old:{K1}")
    during = _keys(tmp_path, f"old:{K1},new:{K2}", key_id="new")
    after = _keys(tmp_path, f"new:{K2}")
    by_old = parse_envelope(old.sign(Envelope.wrap(_req())).model_dump_json(), RenderRequested)
    by_new = parse_envelope(during.sign(Envelope.wrap(_req())).model_dump_json(), RenderRequested)
    assert by_new.signature is not None and by_new.signature.key_id == "new"
    assert during.verify(by_old, what="r") == "old"
    assert during.verify(by_new, what="r") == "new"
    assert after.verify(by_new, what="r") == "new"
    with pytest.raises(UntrustedMessage, match="unknown producer key 'old'"):
        after.verify(by_old, what="r")


def test_tampered_unsigned_or_forged_signatures_are_refused(tmp_path: Path) -> None:
    keys = _keys(tmp_path, f"k:{K1}")
    env = keys.sign(Envelope.wrap(_req()))
    raw = env.model_dump_json()
    tampered = parse_envelope(raw.replace("陳大文", "Go die"), RenderRequested)
    with pytest.raises(UntrustedMessage, match="bad signature"):
        keys.verify(tampered, what="render request")
    moved = parse_envelope(raw.replace(env.trace_id, "f" * 32), RenderRequested)  # any field counts
    with pytest.raises(UntrustedMessage, match="bad signature"):
        keys.verify(moved, what="render request")
    with pytest.raises(UntrustedMessage, match="not signed by a trusted producer"):
        keys.verify(Envelope.wrap(_req()), what="render request")
    other = _keys(tmp_path, f"k:{K2}").sign(Envelope.wrap(_req()))  # same key id, other secret
    with pytest.raises(UntrustedMessage, match="bad signature"):
        keys.verify(other, what="render request")


def test_production_without_producer_keys_signs_nothing_and_trusts_nothing(tmp_path: Path) -> None:
    keys = ProducerKeys.from_settings(_settings(tmp_path, environment="production"))
    env = Envelope.wrap(_req())
    assert keys.sign(env).signature is None
    with pytest.raises(UntrustedMessage):
        keys.verify(env, what="r")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nocolon", "not 'key-id:secret'"),
        (f"bad id:{K1}", "not 'key-id:secret'"),
        ("k:short", "at least 32"),
        (f"k:{K1},k:{K2}", "twice"),
    ],
)
def test_bad_producer_keys_are_one_line_config_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        parse_producer_keys(text)
    assert K1 not in str(err.value) and "\n" not in str(err.value)


def test_unknown_signing_key_id_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="GREETFLOW_PRODUCER_KEY_ID 'nope'"):
        _keys(tmp_path, f"k:{K1}", key_id="nope")


# --------------------------------------------------------------------------- the row is the truth


def test_request_differing_from_its_row_names_the_field() -> None:
    row = _req()
    check_request_matches_row(
        row.model_copy(update={"requested_at": row.requested_at.replace(year=2020)}), row
    )
    check_request_matches_row(_req(scopes=frozenset([Scope.VOICE, Scope.FACE, Scope.NAME])), row)  # set order
    with pytest.raises(UntrustedMessage, match=r"recipient\.name differs from job row"):
        check_request_matches_row(_req(name="Not Your Name"), row)
    photo = row.recipient.model_copy(update={"photo_key": "p/missing.jpg"})
    with pytest.raises(UntrustedMessage, match=r"recipient\.photo_key differs from job row"):
        check_request_matches_row(row.model_copy(update={"recipient": photo}), row)


def test_drawn_texts_are_compared_with_the_row() -> None:
    req = _req(name="陳大文")
    expected = ExpectedTexts({"name": "陳大文 新年快樂"}, ("captions",), "陳大文，新年快樂！")
    good = DrawnTexts(
        job_id=req.job_id,
        sha256="a" * 64,
        merge_values={"recipient.name": "陳大文"},
        texts=(
            DrawnText(layer="name", text="陳大文 新年快樂"),
            DrawnText(layer="captions-0", text="陳大文，"),
            DrawnText(layer="captions-1", text="新年快樂！"),
        ),
    )
    lists = AbuseLists.load()
    kinds = [
        f.kind for f in drawn_text_findings(good, req, clip_sha256="a" * 64, expected=expected, lists=lists)
    ]
    assert kinds == ["drawn_texts_checked"]

    swapped = good.model_copy(
        update={
            "merge_values": {"recipient.name": "Go die"},
            "texts": (DrawnText(layer="name", text="Go die"),),
        }
    )
    found = drawn_text_findings(swapped, req, clip_sha256="a" * 64, expected=expected, lists=lists)
    blocking = {f.message for f in found if f.severity == "block"}
    assert "recipient.name differs from job row (drawn on the clip)" in blocking
    assert "text layer name differs from job row" in blocking
    assert "the captions differ from job row" in blocking
    assert any(f.kind == "text_abuse" for f in found)

    other = drawn_text_findings(good, req, clip_sha256="b" * 64, expected=expected, lists=lists)
    assert [f.evidence.get("field") for f in other] == ["sha256"]
    missing = drawn_text_findings(None, req, clip_sha256="a" * 64, expected=expected, lists=lists)
    assert [(f.kind, f.severity) for f in missing] == [("drawn_texts_missing", "block")]


# --------------------------------------------------------------------------- Kafka security


def test_kafka_security_defaults_to_plaintext_for_the_embedded_stack(tmp_path: Path) -> None:
    assert kafka_client_config(_settings(tmp_path)) == {"security_protocol": "PLAINTEXT"}


def test_kafka_sasl_ssl_options(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    s = _settings(
        tmp_path,
        environment="production",
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_username="greetflow-render",
        kafka_sasl_password=SecretStr("pw"),
        kafka_ssl_cafile=ca,
    )
    assert kafka_client_config(s) == {
        "security_protocol": "SASL_SSL",
        "ssl_check_hostname": True,
        "ssl_cafile": str(ca),
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "greetflow-render",
        "sasl_plain_password": "pw",
    }


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"environment": "production"}, "production needs SASL_SSL"),
        ({"environment": "production", "kafka_security_protocol": "SASL_PLAINTEXT"}, "production needs"),
        ({"kafka_security_protocol": "SASL_SSL"}, "needs GREETFLOW_KAFKA_SASL_USERNAME"),
        (
            {"kafka_security_protocol": "SSL", "kafka_ssl_cafile": "/nonexistent/ca.pem"},
            "not a readable file",
        ),
        ({"environment": "production", "kafka_security_protocol": "SSL"}, "authenticates nobody"),
    ],
)
def test_kafka_security_misconfigurations_are_one_line_errors(
    tmp_path: Path, overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        kafka_client_config(_settings(tmp_path, **overrides))
    assert "\n" not in str(err.value)
