"""Labels and provenance: the AIGC metadata label, the dev CA, C2PA signing and checking."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from pipeline.provenance import (
    GenerationInfo,
    ProvenanceError,
    SigningMaterial,
    c2pa_manifest,
    init_dev_ca,
    label_and_sign,
    read_aigc_label,
    read_c2pa,
    report_lines,
    sign_c2pa,
    signing_material,
    verify_clip,
    write_aigc_label,
)
from pipeline.render.media import run_ffmpeg
from pipeline.settings import Settings
from schemas.provenance import TRAINED_ALGORITHMIC_MEDIA, AigcLabel
from tests.clips import frame, still_clip

INFO = GenerationInfo(
    title="clip.mp4",
    template="lunar-new-year@1",
    model="greetflow-procedural",
    job_id="job-1",
    campaign_id="lny",
    producer="Greetflow",
)
LABEL = AigcLabel(
    content_producer="Greetflow",
    produce_id="job-1",
    reserved_code1="sha256:abc",
    content_propagator="Greetflow",
    propagate_id="lny/r-1/job-1.mp4",
)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return still_clip(tmp_path_factory.mktemp("clip") / "in.mp4", frame(), 2.5)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data")


def video_md5(path: Path) -> str:
    out = run_ffmpeg(["-i", path, "-map", "0:v", "-c", "copy", "-f", "md5", "-"], timeout=60)
    return out.stdout.decode().strip()


def test_aigc_label_is_written_by_stream_copy_and_read_back(clip: Path, tmp_path: Path) -> None:
    out = tmp_path / "labelled.mp4"
    tricky = LABEL.model_copy(update={"propagate_id": "a=b;c#d\\e"})  # ffmetadata escapes these
    write_aigc_label(clip, out, tricky)
    parsed, raw = read_aigc_label(out)
    assert parsed == tricky
    assert raw is not None and '"Label":"1"' in raw and '"ContentProducer":"Greetflow"' in raw
    assert set(__import__("json").loads(raw)) == {
        "Label",
        "ContentProducer",
        "ProduceID",
        "ReservedCode1",
        "ContentPropagator",
        "PropagateID",
        "ReservedCode2",
    }
    assert video_md5(out) == video_md5(clip)  # the video stream was copied, not re-encoded
    assert read_aigc_label(clip) == (None, None)


def test_dev_ca_is_created_once_then_reused(tmp_path: Path) -> None:
    from cryptography import x509

    ca = init_dev_ca(tmp_path / "prov")
    first = ca.signer_chain.read_bytes()
    assert init_dev_ca(tmp_path / "prov").signer_chain.read_bytes() == first
    assert oct(ca.signer_key.stat().st_mode & 0o777) == "0o600"
    leaf, root = x509.load_pem_x509_certificates(first)
    assert leaf.issuer == root.subject and leaf.subject != root.subject  # not self-signed
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert init_dev_ca(tmp_path / "prov", force=True).signer_chain.read_bytes() != first


def test_signed_clip_is_trusted_against_the_dev_ca_and_declares_ai_media(
    clip: Path, tmp_path: Path, settings: Settings
) -> None:
    out = tmp_path / "signed.mp4"
    label_and_sign(clip, out, label=LABEL, info=INFO, material=signing_material(settings))
    report = verify_clip(out, settings)
    assert report.ok, report_lines(report)
    c = report.c2pa
    assert c.validation_state == "Trusted" and c.trusted
    assert c.actions == ("c2pa.created",)
    assert c.digital_source_types == (TRAINED_ALGORITHMIC_MEDIA,)
    assert c.parameters["template"] == "lunar-new-year@1" and c.parameters["model"] == "greetflow-procedural"
    assert report.aigc == LABEL  # the AIGC label survived signing (it was written first)
    assert report.visible_label is not None and report.visible_label.ok
    lines = report_lines(report)
    assert lines[-1] == "result: OK"
    assert any(ln.startswith("C2PA: OK - Trusted") and "trainedAlgorithmicMedia" in ln for ln in lines)


def test_without_the_anchor_or_with_another_ca_it_is_not_trusted(
    clip: Path, tmp_path: Path, settings: Settings
) -> None:
    out = tmp_path / "signed.mp4"
    sign_c2pa(clip, out, c2pa_manifest(INFO), signing_material(settings))
    assert read_c2pa(out, anchors_pem=None).validation_state == "Valid"  # signature fine, chain unchecked
    other = init_dev_ca(tmp_path / "other-ca")
    report = read_c2pa(out, anchors_pem=other.ca_cert.read_text())
    assert report.present and not report.trusted
    assert any("untrusted" in f.lower() for f in report.failures), report.failures


def test_tampering_after_signing_is_detected(clip: Path, tmp_path: Path, settings: Settings) -> None:
    out = tmp_path / "signed.mp4"
    sign_c2pa(clip, out, c2pa_manifest(INFO), signing_material(settings))
    data = bytearray(out.read_bytes())
    data[-2000] ^= 0xFF  # a byte of the media data
    bad = tmp_path / "tampered.mp4"
    bad.write_bytes(bytes(data))
    report = read_c2pa(bad, anchors_pem=init_dev_ca(settings.data_dir / "provenance").ca_cert.read_text())
    assert report.validation_state == "Invalid" and not report.trusted
    assert any("mismatch" in f.lower() or "hash" in f.lower() for f in report.failures), report.failures


def test_remuxing_after_signing_drops_the_manifest(clip: Path, tmp_path: Path, settings: Settings) -> None:
    """Why signing must be the last step."""
    out = tmp_path / "signed.mp4"
    sign_c2pa(clip, out, c2pa_manifest(INFO), signing_material(settings))
    remuxed = tmp_path / "remuxed.mp4"
    run_ffmpeg(["-y", "-i", out, "-map", "0", "-c", "copy", remuxed], timeout=60)
    assert read_c2pa(remuxed, anchors_pem=None).present is False


def test_a_self_signed_signing_certificate_is_refused(clip: Path, tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "self")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    material = SigningMaterial(
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        "es256",
        None,
        dev=False,
    )
    with pytest.raises(ProvenanceError):
        sign_c2pa(clip, tmp_path / "x.mp4", c2pa_manifest(INFO), material)


def test_production_credentials_come_from_settings(tmp_path: Path) -> None:
    ca = init_dev_ca(tmp_path / "prod")
    s = Settings(data_dir=tmp_path / "d", c2pa_cert_chain=ca.signer_chain, c2pa_private_key=ca.signer_key)
    m = signing_material(s)
    assert not m.dev and m.cert_chain_pem == ca.signer_chain.read_bytes()
    assert not (tmp_path / "d" / "provenance").exists()  # no dev CA made
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError):
        signing_material(Settings(data_dir=tmp_path / "d", c2pa_cert_chain=ca.signer_chain))
