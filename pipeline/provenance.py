"""Provenance written at publish time, and checked by `greetflow verify`.

Three labels, in this order:

1. the visible label ('AI生成 / AI-generated'), drawn by the renderer and checked by
   moderation (pipeline.moderation.labels);
2. the implicit label: GB 45438's `AIGC` JSON metadata entry, written into the MP4 with
   ffmpeg stream copy (`-movflags use_metadata_tags`), no re-encode;
3. a C2PA manifest (c2pa.created, digitalSourceType trainedAlgorithmicMedia, naming the
   template and the model), signed LAST: any remux after signing drops it, and any byte
   change after signing breaks its hash binding.

Signing credentials: production sets GREETFLOW_C2PA_CERT_CHAIN and
GREETFLOW_C2PA_PRIVATE_KEY. Otherwise the project's own dev CA under
`<data_dir>/provenance/` is used, created on first use (or by `greetflow provenance
init-ca`). C2PA refuses a self-signed signing certificate, so the dev CA is a real CA
that issues a separate signing certificate. Validation is offline: no time-stamp
authority unless configured, no remote manifest fetch, no OCSP.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.adapters.storage import sha256_file
from pipeline.errors import ConfigError, GreetflowError
from pipeline.settings import Settings
from schemas.brief import TemplateRef
from schemas.provenance import (
    AIGC_METADATA_KEY,
    TRAINED_ALGORITHMIC_MEDIA,
    AigcLabel,
    C2paReport,
    ProvenanceReport,
    VisibleLabelReport,
)

log = logging.getLogger(__name__)

CA_CERT = "dev-ca.pem"
CA_KEY = "dev-ca.key"
SIGNER_CHAIN = "signer-chain.pem"
SIGNER_KEY = "signer.key"
GENERATION_ASSERTION = "com.greetflow.generation"


class ProvenanceError(GreetflowError):
    """Labelling or signing a clip failed."""


# --------------------------------------------------------------------------- dev CA


def provenance_dir(settings: Settings) -> Path:
    return settings.data_dir / "provenance"


@dataclass(frozen=True)
class DevCa:
    directory: Path

    @property
    def ca_cert(self) -> Path:
        return self.directory / CA_CERT

    @property
    def signer_chain(self) -> Path:
        return self.directory / SIGNER_CHAIN

    @property
    def signer_key(self) -> Path:
        return self.directory / SIGNER_KEY

    def exists(self) -> bool:
        return all(p.is_file() for p in (self.ca_cert, self.signer_chain, self.signer_key))


def _write_dev_ca(directory: Path, organization: str) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{organization} Dev Root CA"),
        ]
    )
    no_usage: dict[str, bool] = dict.fromkeys(
        ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
         "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"),
        False,
    )  # fmt: skip
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(**{**no_usage, "key_cert_sign": True, "crl_sign": True}), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{organization} Dev Content Signer"),
        ]
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(leaf_name)
        .issuer_name(ca_name)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=825))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(**{**no_usage, "digital_signature": True}), critical=True)
        # C2PA accepts signing certificates with the email-protection (or document-signing) EKU.
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    none = serialization.NoEncryption()
    (directory / CA_CERT).write_bytes(ca.public_bytes(pem))
    (directory / SIGNER_CHAIN).write_bytes(leaf.public_bytes(pem) + ca.public_bytes(pem))
    for name, key in ((CA_KEY, ca_key), (SIGNER_KEY, leaf_key)):
        path = directory / name
        path.write_bytes(key.private_bytes(pem, pkcs8, none))
        path.chmod(0o600)


def init_dev_ca(directory: Path, *, organization: str = "Greetflow", force: bool = False) -> DevCa:
    """Create the dev CA and its signing certificate in `directory` (atomically: workers
    that start together end up with one CA). Existing files are kept unless `force`."""
    ca = DevCa(Path(directory))
    if ca.exists() and not force:
        return ca
    ca.directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".provenance-", dir=ca.directory.parent))
    try:
        _write_dev_ca(tmp, organization)
        if force and ca.directory.exists():
            shutil.rmtree(ca.directory)
        try:
            os.rename(tmp, ca.directory)
        except OSError:
            if not ca.exists():  # an empty or partial directory that is not ours
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("dev CA ready in %s", ca.directory)
    return ca


@dataclass(frozen=True)
class SigningMaterial:
    cert_chain_pem: bytes
    private_key_pem: bytes
    alg: str
    tsa_url: str | None
    dev: bool


def signing_material(settings: Settings) -> SigningMaterial:
    """Production credentials from settings, else the dev CA (created when missing)."""
    cert, key = settings.c2pa_cert_chain, settings.c2pa_private_key
    if (cert is None) != (key is None):
        raise ConfigError("set both GREETFLOW_C2PA_CERT_CHAIN and GREETFLOW_C2PA_PRIVATE_KEY, or neither")
    dev = cert is None
    if cert is None or key is None:
        ca = init_dev_ca(provenance_dir(settings), organization=settings.content_producer)
        cert, key = ca.signer_chain, ca.signer_key
    try:
        chain, pkey = Path(cert).read_bytes(), Path(key).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the C2PA signing certificate or key: {exc}") from exc
    return SigningMaterial(chain, pkey, settings.c2pa_signing_alg, settings.c2pa_tsa_url or None, dev)


def trust_anchors(settings: Settings) -> str | None:
    """PEM trust anchors for verification: the configured bundle, else the dev CA."""
    if settings.c2pa_trust_anchors is not None:
        try:
            return Path(settings.c2pa_trust_anchors).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read GREETFLOW_C2PA_TRUST_ANCHORS: {exc}") from exc
    ca = DevCa(provenance_dir(settings))
    return ca.ca_cert.read_text() if ca.ca_cert.is_file() else None


# --------------------------------------------------------------------------- AIGC metadata


def write_aigc_label(src: Path, dst: Path, label: AigcLabel, *, timeout_s: float = 120.0) -> None:
    """Copy `src` to `dst` (stream copy, no re-encode) with the AIGC metadata entry."""
    from pipeline.render.media import RenderError, run_ffmpeg

    try:
        run_ffmpeg(
            ["-y", "-i", src, "-map", "0", "-c", "copy",
             "-movflags", "+faststart+use_metadata_tags",
             "-metadata", f"{AIGC_METADATA_KEY}={label.to_json()}", dst],
            timeout=timeout_s,
        )  # fmt: skip
    except RenderError as exc:
        raise ProvenanceError(f"cannot write the AIGC label into {dst.name}: {exc}") from exc


def _unescape_ffmetadata(value: str) -> str:
    out, esc = [], False
    for ch in value:
        if esc:
            out.append(ch)
            esc = False
        elif ch == "\\":
            esc = True
        else:
            out.append(ch)
    return "".join(out)


def read_metadata(path: Path) -> dict[str, str]:
    """Container-level metadata of a media file (ffmpeg's ffmetadata output)."""
    from pipeline.render.media import RenderError, run_ffmpeg

    try:
        proc = run_ffmpeg(["-i", path, "-f", "ffmetadata", "-"], timeout=60)
    except RenderError as exc:
        raise ProvenanceError(f"cannot read metadata of {path}: {exc}") from exc
    meta: dict[str, str] = {}
    lines = proc.stdout.decode("utf-8", "replace").split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if line.startswith("[") and line.rstrip().endswith("]"):
            break  # stream / chapter sections follow: only the global ones count
        if not line or line.startswith(";") or line.startswith("#"):
            continue
        # A value ending in a backslash continues on the next line (escaped newline).
        while line.endswith("\\") and not line.endswith("\\\\") and i < len(lines):
            line = line[:-1] + "\n" + lines[i]
            i += 1
        key, sep, value = _split_unescaped(line)
        if sep:
            meta[_unescape_ffmetadata(key)] = _unescape_ffmetadata(value)
    return meta


def _split_unescaped(line: str) -> tuple[str, bool, str]:
    esc = False
    for i, ch in enumerate(line):
        if esc:
            esc = False
        elif ch == "\\":
            esc = True
        elif ch == "=":
            return line[:i], True, line[i + 1 :]
    return line, False, ""


def read_aigc_label(path: Path) -> tuple[AigcLabel | None, str | None]:
    """The AIGC entry (parsed, raw); (None, raw) when present but not valid."""
    raw = read_metadata(path).get(AIGC_METADATA_KEY)
    if raw is None:
        return None, None
    try:
        return AigcLabel.model_validate_json(raw), raw
    except ValueError:
        return None, raw


# --------------------------------------------------------------------------- C2PA


@dataclass(frozen=True)
class GenerationInfo:
    """What the manifest says about how the clip was made."""

    title: str
    template: str  # name@version
    model: str
    job_id: str
    campaign_id: str
    producer: str
    # How the visuals were generated (the render step's record: plates with their model
    # fingerprints and parameters, reference assets), and the consent grants relied on.
    generation: Mapping[str, Any] = field(default_factory=dict)
    consent_ids: tuple[str, ...] = ()
    # Reference assets as C2PA ingredients: (title, MIME type, local file).
    ingredients: tuple[tuple[str, str, Path], ...] = ()


def c2pa_manifest(info: GenerationInfo) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("greetflow")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        ours = "0"
    return {
        "claim_generator_info": [{"name": info.producer, "version": ours}],
        "title": info.title,
        "format": "video/mp4",
        "assertions": [
            {
                "label": "c2pa.actions",
                "data": {
                    "actions": [
                        {
                            "action": "c2pa.created",
                            "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
                            "softwareAgent": {"name": f"{info.producer} renderer", "version": ours},
                            "parameters": {
                                "template": info.template,
                                "model": info.model,
                                **({"models": _models_of(info.generation)} if info.generation else {}),
                            },
                        }
                    ]
                },
            },
            {
                "label": GENERATION_ASSERTION,
                "data": {
                    "template": info.template,
                    "model": info.model,
                    "job_id": info.job_id,
                    "campaign_id": info.campaign_id,
                    **({"generation": dict(info.generation)} if info.generation else {}),
                    **({"consent_ids": list(info.consent_ids)} if info.consent_ids else {}),
                },
            },
        ],
    }


def _models_of(generation: Mapping[str, Any]) -> list[str]:
    plates = generation.get("plates") or []
    found = [str(p.get("model")) for p in plates if isinstance(p, dict) and p.get("model")]
    if generation.get("still_generator"):
        found.append(str(generation["still_generator"]))
    return sorted(set(found))


def producer_code(rendered_sha: str, info: GenerationInfo) -> str:
    """ReservedCode1 of the AIGC label (256 characters at most): the rendered clip's hash,
    the models (fingerprints) and a hash of every generation parameter, and the consent
    grants relied on (ids shortened to 8 hex digits when they do not all fit)."""
    models = ",".join(m.rsplit(":", 1)[-1] for m in _models_of(info.generation)) or info.model
    params = hashlib.sha256(json.dumps(dict(info.generation), sort_keys=True).encode()).hexdigest()[:16]
    head = f"sha256:{rendered_sha};model:{models[:60]};params:{params}"
    for ids in (list(info.consent_ids), [c[:8] for c in info.consent_ids]):
        code = head + (f";consent:{','.join(ids)}" if ids else "")
        if len(code) <= 256:
            return code
    return head[:256]


_C2PA_BASE: dict[str, Any] = {
    "verify": {"remote_manifest_fetch": False, "ocsp_fetch": False},
    "builder": {"thumbnail": {"enabled": False}},
}


def sign_c2pa(
    src: Path,
    dst: Path,
    manifest: dict[str, Any],
    material: SigningMaterial,
    ingredients: Sequence[tuple[str, str, Path]] = (),
) -> bytes:
    """Embed and sign a C2PA manifest into `dst` (an MP4). Returns the manifest bytes.

    Must be the last write to the file.
    """
    import c2pa

    alg = c2pa.C2paSigningAlg[material.alg.upper()]
    try:
        verify = {**_C2PA_BASE["verify"], "verify_after_sign": True}
        ctx = c2pa.Context.from_dict({**_C2PA_BASE, "verify": verify})
        signer = c2pa.Signer.from_info(
            c2pa.C2paSignerInfo(alg, material.cert_chain_pem, material.private_key_pem, material.tsa_url)
        )
        try:
            with (
                c2pa.Builder(manifest, context=ctx) as builder,
                src.open("rb") as fin,
                dst.open("w+b") as fout,
            ):
                for title, fmt, path in ingredients:
                    with path.open("rb") as ing:
                        builder.add_ingredient({"title": title, "relationship": "inputTo"}, fmt, ing)
                return bytes(builder.sign(signer, "video/mp4", fin, fout))
        finally:
            signer.close()
            ctx.close()
    except c2pa.C2paError as exc:
        raise ProvenanceError(f"C2PA signing of {src.name} failed: {exc}") from exc


def read_c2pa(path: Path, *, anchors_pem: str | None) -> C2paReport:
    """The active manifest and its validation state, validated offline.

    `Trusted`: signature and hash binding valid and the signer chains to an anchor;
    `Valid`: valid but the chain is not trusted; `Invalid`: tampered or broken.
    """
    import c2pa

    cfg: dict[str, Any] = {"verify": {**_C2PA_BASE["verify"], "verify_trust": anchors_pem is not None}}
    if anchors_pem is not None:
        cfg["trust"] = {"trust_anchors": anchors_pem}
    try:
        ctx = c2pa.Context.from_dict(cfg)
        try:
            with path.open("rb") as fh:
                reader = c2pa.Reader.try_create("video/mp4", fh, context=ctx)
                if reader is None:
                    return C2paReport(present=False, message="no C2PA manifest")
                with reader:
                    state = reader.get_validation_state()
                    results = reader.get_validation_results() or {}
                    active = reader.get_active_manifest() or {}
        finally:
            ctx.close()
    except c2pa.C2paError as exc:
        return C2paReport(present=True, validation_state="Invalid", failures=(str(exc),), message=str(exc))
    actions: list[str] = []
    sources: list[str] = []
    params: dict[str, Any] = {}
    for a in active.get("assertions", []):
        label = str(a.get("label", ""))
        data = a.get("data") or {}
        if label.startswith("c2pa.actions"):
            for act in data.get("actions", []):
                actions.append(str(act.get("action")))
                if act.get("digitalSourceType"):
                    sources.append(str(act["digitalSourceType"]))
                params.update(act.get("parameters") or {})
        elif label == GENERATION_ASSERTION:
            params.update(data)
    failures = tuple(
        f"{f.get('code')}: {f.get('explanation', '')}"
        for f in ((results.get("activeManifest") or {}).get("failure") or [])
    )
    ingredients = tuple(str(i.get("title", "")) for i in active.get("ingredients", []) or [])
    sig = active.get("signature_info") or {}
    gen = (active.get("claim_generator_info") or [{}])[0]
    return C2paReport(
        present=True,
        validation_state=state,
        trusted=state == "Trusted",
        active_manifest=active.get("label"),
        title=active.get("title"),
        claim_generator=f"{gen.get('name', '')} {gen.get('version', '')}".strip() or None,
        signer=sig.get("common_name"),
        issuer=sig.get("issuer"),
        actions=tuple(actions),
        digital_source_types=tuple(sources),
        parameters=params,
        ingredients=ingredients,
        failures=failures,
        message=f"manifest {state}" + (f" ({'; '.join(failures)})" if failures else ""),
    )


# --------------------------------------------------------------------------- publish / verify


def label_and_sign(
    src: Path,
    dst: Path,
    *,
    label: AigcLabel,
    info: GenerationInfo,
    material: SigningMaterial,
) -> None:
    """The publish-time labelling: AIGC metadata (stream copy), then C2PA, signed last."""
    with tempfile.TemporaryDirectory(prefix=".label-", dir=dst.parent) as tmp:
        labelled = Path(tmp) / "aigc.mp4"
        write_aigc_label(src, labelled, label)
        sign_c2pa(labelled, dst, c2pa_manifest(info), material, info.ingredients)


def verify_clip(path: Path, settings: Settings, *, check_visible_label: bool = True) -> ProvenanceReport:
    """Everything `greetflow verify` reports about one clip."""
    path = Path(path)
    if not path.is_file():
        raise ProvenanceError(f"{path} is not a file")
    aigc, raw = read_aigc_label(path)
    c2 = read_c2pa(path, anchors_pem=trust_anchors(settings))
    visible: VisibleLabelReport | None = None
    if check_visible_label:
        from pipeline.moderation.labels import check_visible_label as check
        from pipeline.moderation.labels import expected_label_text

        # The label must read what the clip's template declares (named in the manifest).
        name, _, version = str(c2.parameters.get("template", "")).partition("@")
        try:
            template = TemplateRef(name=name, version=version or "1") if name else None
        except ValueError:
            template = None
        visible = check(path, settings, label_text=expected_label_text(template, settings.templates_dir))
    ok = (
        (visible is None or visible.ok)
        and aigc is not None
        and aigc.label == "1"
        and c2.trusted
        and TRAINED_ALGORITHMIC_MEDIA in c2.digital_source_types
    )
    return ProvenanceReport(
        path=str(path),
        sha256=sha256_file(path),
        visible_label=visible,
        aigc=aigc,
        aigc_raw=raw,
        c2pa=c2,
        ok=ok,
    )


def report_lines(report: ProvenanceReport) -> list[str]:
    """A human summary of a ProvenanceReport, one check per line."""
    lines = [f"clip: {report.path} (sha256 {report.sha256[:16]}...)"]
    v = report.visible_label
    if v is None:
        lines.append("visible label: not checked")
    else:
        lines.append(f"visible label: {'OK' if v.ok else 'FAIL'} - {v.message}")
    if report.aigc is not None:
        a = report.aigc
        lines.append(
            f"AIGC metadata: OK - Label={a.label} ContentProducer={a.content_producer} "
            f"ProduceID={a.produce_id} ContentPropagator={a.content_propagator} "
            f"PropagateID={a.propagate_id}"
        )
    elif report.aigc_raw is not None:
        lines.append(f"AIGC metadata: FAIL - present but invalid: {report.aigc_raw[:200]}")
    else:
        lines.append("AIGC metadata: FAIL - missing")
    c = report.c2pa
    if not c.present:
        lines.append("C2PA: FAIL - no manifest")
    else:
        status = "OK" if c.trusted else "FAIL"
        sources = ", ".join(s.rsplit("/", 1)[-1] for s in c.digital_source_types) or "-"
        lines.append(
            f"C2PA: {status} - {c.validation_state}; signer {c.signer} ({c.issuer}); "
            f"actions {', '.join(c.actions)}; digitalSourceType {sources}; "
            f"template {c.parameters.get('template', '-')}; model {c.parameters.get('model', '-')}"
        )
        if c.parameters.get("models"):
            lines.append(f"  generated with {', '.join(map(str, c.parameters['models']))}")
        if c.ingredients:
            lines.append(f"  ingredients: {', '.join(c.ingredients)}")
        lines.extend(f"  failure: {f}" for f in c.failures)
        if c.validation_state == "Valid":
            lines.append(
                "  the signature is intact but its signer chains to no trusted CA: pass "
                "--trust-anchors PEM (or set GREETFLOW_C2PA_TRUST_ANCHORS), or use the "
                "GREETFLOW_DATA_DIR whose dev CA signed it"
            )
    lines.append("result: " + ("OK" if report.ok else "FAIL"))
    return lines


def dump_json(report: ProvenanceReport) -> str:
    return json.dumps(report.model_dump(mode="json", by_alias=True), indent=2, ensure_ascii=False)


__all__ = [
    "DevCa",
    "GenerationInfo",
    "ProvenanceError",
    "SigningMaterial",
    "c2pa_manifest",
    "dump_json",
    "init_dev_ca",
    "label_and_sign",
    "read_aigc_label",
    "read_c2pa",
    "report_lines",
    "sign_c2pa",
    "signing_material",
    "trust_anchors",
    "verify_clip",
    "write_aigc_label",
]
