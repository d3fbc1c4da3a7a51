"""Who may create work and what counts as the truth about a job.

- Job ids are keyed: `schemas.common.job_id_for` under `job_id_key`, so nobody without the
  key can compute the id of a job ahead of its campaign (and squat or shadow it).
- Trusted producers sign their envelopes: an HMAC-SHA256 over the canonical envelope
  content (`Envelope.signed_content`) under one of `producer_keys`. A render request for a
  job that has no row yet is accepted only with a valid signature.
- The job row, written at intake, is the truth: every step works from what the row holds,
  and a message that disagrees with its row is refused (`UntrustedMessage`: dead-lettered
  with the field named, the job itself untouched).

On the dev stack (`environment=dev`) a missing key is generated once under
`data_dir/secrets` (mode 0600) and kept; in production a process that needs a missing key
refuses to start.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pipeline.errors import ConfigError, PermanentError
from pipeline.settings import Settings
from schemas.common import job_id_for
from schemas.events import Envelope, EnvelopeSignature, RenderRequested, _Payload

log = logging.getLogger(__name__)

P = TypeVar("P", bound=_Payload)

SECRETS_DIR = "secrets"
MIN_SECRET_CHARS = 32
_KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")

# Request fields that may differ between two copies of one job's request.
_VOLATILE_REQUEST_FIELDS = frozenset({"requested_at"})


class UntrustedMessage(PermanentError):
    """A message that disagrees with its job row, or that would create a job without a
    trusted producer's signature. It is dead-lettered at once and its job is left alone:
    a forged message must never change (or fail) a real job."""


# --------------------------------------------------------------------------- secrets


def dev_secret(settings: Settings, name: str) -> bytes:
    """The dev stack's secret `name`: read from data_dir/secrets/<name>.key, or generated
    there once (mode 0600; concurrent first uses agree on one winner)."""
    folder = settings.data_dir / SECRETS_DIR
    path = folder / f"{name}.key"
    existing = _read_secret(path)
    if existing is not None:
        return existing
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = folder / f".{name}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(secrets.token_hex(32) + "\n")
        try:
            os.link(tmp, path)  # atomic and never replaces: the first writer wins
            log.info("generated the dev secret %s (set it in production)", path)
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)
    created = _read_secret(path)
    if created is None:
        raise ConfigError(f"the dev secret {path} is empty; delete it to have a new one generated")
    return created


def _read_secret(path: Path) -> bytes | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the dev secret {path}: {exc}") from exc
    return text.encode() if text else None


def _setting_secret(value: str, env_name: str) -> bytes:
    if len(value) < MIN_SECRET_CHARS:
        raise ConfigError(f"{env_name} must be at least {MIN_SECRET_CHARS} characters long")
    return value.encode()


# --------------------------------------------------------------------------- job ids


@dataclass(frozen=True)
class JobIds:
    """The keyed job ids of this deployment."""

    key: bytes

    @classmethod
    def from_settings(cls, settings: Settings) -> JobIds:
        value = settings.job_id_key.get_secret_value()
        if value:
            return cls(_setting_secret(value, "GREETFLOW_JOB_ID_KEY"))
        if settings.environment == "production":
            raise ConfigError(
                "GREETFLOW_JOB_ID_KEY is not set: production needs a secret job id key "
                f"(at least {MIN_SECRET_CHARS} random characters, the same for every intake process)"
            )
        return cls(dev_secret(settings, "job-id"))

    def job_id(
        self, campaign_id: str, recipient_id: str, template_name: str, template_version: str
    ) -> uuid.UUID:
        return job_id_for(self.key, campaign_id, recipient_id, template_name, template_version)


# --------------------------------------------------------------------------- producers


def parse_producer_keys(text: str) -> dict[str, bytes]:
    """'id:secret,id:secret' -> {id: secret}; ConfigError naming what is wrong (never a secret)."""
    keys: dict[str, bytes] = {}
    for n, item in enumerate(p.strip() for p in text.split(",")):
        if not item:
            continue
        key_id, sep, secret = item.partition(":")
        key_id = key_id.strip()
        if not sep or not _KEY_ID.match(key_id):
            raise ConfigError(
                f"GREETFLOW_PRODUCER_KEYS entry {n + 1} is not 'key-id:secret' with a key id of "
                "letters, digits, '-' and '_'"
            )
        if key_id in keys:
            raise ConfigError(f"GREETFLOW_PRODUCER_KEYS lists key id {key_id!r} twice")
        keys[key_id] = _setting_secret(secret.strip(), f"GREETFLOW_PRODUCER_KEYS key {key_id!r}")
    return keys


def _hmac(secret: bytes, content: bytes) -> str:
    return hmac.new(secret, content, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class ProducerKeys:
    """The keys trusted producers sign envelopes with. `signing_key_id` None: this process
    signs nothing (its envelopes only count where a job row backs them)."""

    keys: Mapping[str, bytes]
    signing_key_id: str | None

    @classmethod
    def from_settings(cls, settings: Settings) -> ProducerKeys:
        text = settings.producer_keys.get_secret_value()
        if text.strip():
            keys = parse_producer_keys(text)
        elif settings.environment == "production":
            keys = {}
        else:
            keys = {"dev": dev_secret(settings, "producer")}
        chosen = settings.producer_key_id.strip()
        if chosen and chosen not in keys:
            raise ConfigError(
                f"GREETFLOW_PRODUCER_KEY_ID {chosen!r} is not one of the GREETFLOW_PRODUCER_KEYS "
                f"key ids ({', '.join(keys) or 'none set'})"
            )
        return cls(keys=keys, signing_key_id=chosen or next(iter(keys), None))

    def sign(self, env: Envelope[P]) -> Envelope[P]:
        """The envelope with this process's signature (unchanged when it has no key)."""
        if self.signing_key_id is None:
            return env
        sig = EnvelopeSignature(
            key_id=self.signing_key_id,
            hmac_sha256=_hmac(self.keys[self.signing_key_id], env.signed_content()),
        )
        signed: Envelope[P] = env.model_copy(update={"signature": sig})
        return signed

    def sign_content(self, content: bytes) -> dict[str, str] | None:
        """`sign`'s signature from an envelope's canonical bytes (`Envelope.signed_content`)."""
        if self.signing_key_id is None:
            return None
        return {"key_id": self.signing_key_id, "hmac_sha256": _hmac(self.keys[self.signing_key_id], content)}

    def verify(self, env: Envelope[Any], *, what: str) -> str:
        """The key id of a valid signature; UntrustedMessage saying why not otherwise.
        `what` names the message in the error ("render request for job ...")."""
        sig = env.signature
        if sig is None:
            raise UntrustedMessage(f"{what} is not signed by a trusted producer")
        secret = self.keys.get(sig.key_id)
        if secret is None:
            raise UntrustedMessage(f"{what} is signed with unknown producer key {sig.key_id!r}")
        if not hmac.compare_digest(_hmac(secret, env.signed_content()), sig.hmac_sha256):
            raise UntrustedMessage(f"{what} has a bad signature (producer key {sig.key_id!r})")
        return sig.key_id


# --------------------------------------------------------------------------- the row is the truth


def differing_fields(message: Mapping[str, Any], row: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of the fields whose values differ (nested mappings are walked)."""
    out: list[str] = []
    for name in sorted(set(message) | set(row)):
        path = f"{prefix}.{name}" if prefix else str(name)
        a, b = message.get(name), row.get(name)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out.extend(differing_fields(a, b, path))
        elif a != b:
            out.append(path)
    return out


def refuse_differences(what: str, fields: list[str]) -> None:
    """UntrustedMessage naming the first fields that differ from the job row."""
    if fields:
        shown = ", ".join(fields[:5]) + (f" and {len(fields) - 5} more" if len(fields) > 5 else "")
        verb = "differs" if len(fields) == 1 else "differ"
        raise UntrustedMessage(f"{what}: {shown} {verb} from job row")


def check_request_matches_row(message: RenderRequested, row: RenderRequested) -> None:
    """A render request for an existing job must say exactly what its row says (the time
    it was requested aside)."""
    exclude = set(_VOLATILE_REQUEST_FIELDS)
    refuse_differences(
        f"render request for job {message.job_id}",
        differing_fields(
            message.model_dump(mode="python", exclude=exclude), row.model_dump(mode="python", exclude=exclude)
        ),
    )


def check_matches_row(what: str, pairs: Mapping[str, tuple[object, object]]) -> None:
    """`pairs`: field -> (the message's value, the row's value)."""
    refuse_differences(what, [name for name, (got, want) in pairs.items() if got != want])
