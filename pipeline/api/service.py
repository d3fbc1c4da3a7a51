"""What the render API does, behind its routes: renders through the trusted intake path,
job and campaign views scoped to the caller's tenant, checked uploads, consent."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tempfile
import threading
import uuid
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

from PIL import Image, UnidentifiedImageError

from pipeline.adapters.storage import ObjectStore, validate_key
from pipeline.api.auth import ApiPrincipal
from pipeline.api.models import (
    AssetOut,
    CampaignAccepted,
    CampaignOut,
    JobEventOut,
    JobOut,
    RenderAccepted,
    RenderIn,
)
from pipeline.api.repository import ApiKeyRepository, CampaignOwners, IdempotencyRepository
from pipeline.briefs import BriefError, DocumentError, decode_utf8, parse_text
from pipeline.campaigns import CampaignService, check_template_fields, parse_brief
from pipeline.consent.service import ConsentError, ConsentService
from pipeline.errors import GreetflowError, PermanentError
from pipeline.keys import sidecar_of
from pipeline.reports import REPORTS_PREFIX
from pipeline.repositories import JobRecord, JobRepository
from pipeline.settings import Settings
from schemas.consent import ConsentChallengeView, SubjectConsentView
from schemas.jobs import FINAL_STATES

log = logging.getLogger(__name__)

IMAGE_TYPES: dict[str, tuple[str, str]] = {
    "JPEG": ("image/jpeg", "jpg"),
    "PNG": ("image/png", "png"),
    "WEBP": ("image/webp", "webp"),
}
MAX_IDEMPOTENCY_KEY = 255
DECODE_SLOTS = 2
T = TypeVar("T")


class ApiError(GreetflowError):
    """A refused request: its HTTP status, a short title, and a one-line detail."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail


def _not_found(what: str) -> ApiError:
    return ApiError(404, "Not Found", f"{what} not found")


def tenant_prefix(tenant: str) -> str:
    return f"tenants/{tenant}/"


def request_hash(body: Any) -> str:
    """SHA-256 of the canonical JSON of a request body (what an Idempotency-Key is bound to)."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def check_idempotency_key(key: str) -> str:
    key = key.strip()
    if not key or len(key) > MAX_IDEMPOTENCY_KEY or not key.isprintable():
        raise ApiError(
            400, "Bad Request", f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable characters"
        )
    return key


@dataclass(frozen=True)
class CheckedImage:
    format: str
    content_type: str
    ext: str
    width: int
    height: int


def inspect_image(data: bytes, *, max_pixels: int) -> CheckedImage:
    """The upload's real type (by content), its size from the header before any decoding,
    then a full decode (a truncated or corrupt file is refused). ApiError 415/413/422."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=list(IMAGE_TYPES))
    except UnidentifiedImageError:
        raise ApiError(415, "Unsupported Media Type", "the upload is not a JPEG, PNG or WebP image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ApiError(413, "Content Too Large", "the image has too many pixels") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ApiError(422, "Unprocessable Content", f"the image cannot be read: {exc}") from None
    with img:
        fmt = str(img.format)
        if fmt not in IMAGE_TYPES:
            raise ApiError(415, "Unsupported Media Type", "the upload is not a JPEG, PNG or WebP image")
        width, height = img.size
        if width < 1 or height < 1:
            raise ApiError(422, "Unprocessable Content", "the image has no pixels")
        if width * height > max_pixels:
            raise ApiError(
                413,
                "Content Too Large",
                f"the image is {width}x{height} ({width * height / 1e6:.1f} MP); at most "
                f"{max_pixels / 1e6:.1f} MP are accepted",
            )
        try:
            img.load()  # decodes: only now, after the pixel count is known to be bounded
        except (OSError, ValueError, SyntaxError) as exc:
            raise ApiError(
                422, "Unprocessable Content", f"the {fmt} image is truncated or corrupt: {exc}"
            ) from None
    content_type, ext = IMAGE_TYPES[fmt]
    return CheckedImage(fmt, content_type, ext, width, height)


class ApiService:
    def __init__(
        self,
        settings: Settings,
        *,
        jobs: JobRepository,
        campaigns: Callable[[], CampaignService],
        keys: ApiKeyRepository,
        idempotency: IdempotencyRepository,
        owners: CampaignOwners,
        store: ObjectStore,
        consent: Callable[[], ConsentService],
    ) -> None:
        self.settings = settings
        self.jobs = jobs
        self._campaigns = campaigns
        self.keys = keys
        self.idempotency = idempotency
        self.owners = owners
        self.store = store
        self._consent = consent
        # At most this many uploads are decoded at once: each may hold up to
        # api_upload_max_pixels x 4 bytes while it is checked.
        self._decode_slots = threading.BoundedSemaphore(DECODE_SLOTS)
        # Image.open refuses (DecompressionBombError) images over twice this on its own.
        Image.MAX_IMAGE_PIXELS = max(int(Image.MAX_IMAGE_PIXELS or 0), settings.api_upload_max_pixels)

    # ----------------------------------------------------------------- keys

    def lookup_key(self, token: str) -> tuple[ApiPrincipal, int | None] | None:
        key = self.keys.by_token(token)
        if key is None:
            return None
        return ApiPrincipal(key.key_id, key.tenant, key.scopes), key.rate_limit_per_min

    # ----------------------------------------------------------------- campaigns ownership

    def _claim_campaign(self, tenant: str, campaign_id: str) -> None:
        known, owner = self.owners.owner(campaign_id)
        if known and owner == tenant:
            return
        # A campaign id the CLI or a DAG used (jobs without a campaigns row) is not free.
        if (
            not known
            and not self.jobs.list_jobs(campaign_id=campaign_id, limit=1)
            and self.owners.claim(campaign_id, tenant)
        ):
            return
        raise ApiError(409, "Conflict", f"campaign id {campaign_id} is taken: choose another campaign_id")

    def _owned_campaign(self, tenant: str, campaign_id: str) -> None:
        known, owner = self.owners.owner(campaign_id)
        if not known or owner != tenant:
            raise _not_found(f"campaign {campaign_id}")

    # ----------------------------------------------------------------- renders

    def request_render(
        self, who: ApiPrincipal, body: RenderIn, *, idempotency_key: str | None, base_url: str
    ) -> RenderAccepted:
        digest = request_hash(body.model_dump(mode="json"))
        key = check_idempotency_key(idempotency_key) if idempotency_key is not None else None
        hit = None
        if key is not None:
            hit = self.idempotency.get(who.tenant, key)
            if hit is not None and (hit.request_hash != digest or self.jobs.get(hit.job_id) is not None):
                return self._replay(who, key, hit.request_hash, digest, hit.job_id, base_url)
        campaign_id = body.campaign_id or f"api-{who.tenant}"
        recipient: dict[str, Any] = {
            "id": body.recipient.id,
            "name": body.recipient.name,
            "locale": str(body.recipient.locale or body.locale or "en"),
            "subjects": [s.model_dump(mode="json") for s in body.subjects],
        }
        if body.recipient.photo_key is not None:
            recipient["photo_key"] = self._own_asset(who.tenant, body.recipient.photo_key)
        data = {
            "campaign_id": campaign_id,
            "title": f"API render for {who.tenant}",
            "template": body.template.model_dump(mode="json"),
            "recipients": [recipient],
        }
        try:
            brief = parse_brief(data, source="render request", settings=self.settings)
            check_template_fields(brief, list(brief.recipients))
        except BriefError as exc:
            raise ApiError(422, "Unprocessable Content", str(exc)) from None
        self._claim_campaign(who.tenant, campaign_id)
        svc = self._campaigns()
        (rcp,) = brief.recipients
        job_id = svc.job_id(campaign_id, rcp.id, brief.template)
        existing = self.jobs.get(job_id)
        if existing is not None and existing.owner != who.tenant:
            raise ApiError(409, "Conflict", f"recipient {rcp.id} of campaign {campaign_id} is taken")
        if key is not None:
            # Reserved before the job is written, so two racing requests with one key and two
            # bodies cannot both create a job. The same body means the same (keyed) job id.
            stored = self.idempotency.remember(who.tenant, key, digest, job_id)
            if stored.request_hash != digest:
                return self._replay(who, key, stored.request_hash, digest, stored.job_id, base_url)
        try:
            job = svc.request_render(campaign_id, rcp, brief.template, owner=who.tenant)
        except BriefError as exc:
            self._release(who.tenant, key if hit is None else None)
            status = 409 if "already exists" in str(exc) else 422
            raise ApiError(
                status, "Conflict" if status == 409 else "Unprocessable Content", str(exc)
            ) from None
        except BaseException:
            self._release(who.tenant, key if hit is None else None)
            raise
        return self._accepted(job, base_url)

    def _release(self, tenant: str, key: str | None) -> None:
        """An Idempotency-Key this request reserved is free again when the request failed."""
        if key is not None:
            self.idempotency.forget(tenant, key)

    def _replay(
        self, who: ApiPrincipal, key: str, stored: str, digest: str, job_id: uuid.UUID, base_url: str
    ) -> RenderAccepted:
        if stored != digest:
            raise ApiError(409, "Conflict", f"Idempotency-Key {key!r} was used with a different request body")
        job = self.jobs.get(job_id)
        if job is None or job.owner != who.tenant:
            raise _not_found(f"job {job_id}")
        return self._accepted(job, base_url)

    @staticmethod
    def _accepted(job: JobRecord, base_url: str) -> RenderAccepted:
        return RenderAccepted(
            job_id=job.job_id,
            campaign_id=job.campaign_id,
            state=job.state.value,
            status_url=f"{base_url.rstrip('/')}/v1/jobs/{job.job_id}",
        )

    def _own_asset(self, tenant: str, key: str) -> str:
        if not key.startswith(tenant_prefix(tenant)):
            raise ApiError(
                422, "Unprocessable Content", f"asset {key} is not one of your uploads (POST /v1/assets)"
            )
        try:
            validate_key(key)
        except PermanentError as exc:
            raise ApiError(422, "Unprocessable Content", str(exc)) from None
        if not self.store.exists(self.settings.bucket_assets, key):
            raise ApiError(422, "Unprocessable Content", f"asset {key} does not exist: upload it first")
        return key

    # ----------------------------------------------------------------- jobs

    def job(self, who: ApiPrincipal, job_id: str) -> JobOut:
        try:
            jid = uuid.UUID(job_id)
        except ValueError:
            raise _not_found(f"job {job_id}") from None
        job = self.jobs.get(jid)
        if job is None or job.owner != who.tenant:
            raise _not_found(f"job {job_id}")
        captions_url = None
        if job.published_key:
            vtt = sidecar_of(job.published_key, "vtt")
            if self.store.exists(self.settings.bucket_distribution, vtt):
                captions_url = self.store.distribution_url(vtt)
        return JobOut(
            job_id=job.job_id,
            campaign_id=job.campaign_id,
            recipient_id=job.recipient_id,
            template=f"{job.template_name}@{job.template_version}",
            locale=str(job.locale),
            state=job.state.value,
            final=job.state in FINAL_STATES,
            failure_reason=job.reason if job.state.value == "failed" else None,
            created_at=job.created_at,
            updated_at=job.updated_at,
            url=job.url,
            captions_url=captions_url,
            history=[
                JobEventOut(
                    from_state=e.from_state.value if e.from_state is not None else None,
                    to_state=e.to_state.value,
                    reason=e.reason,
                    actor=e.actor,
                    at=e.at,
                )
                for e in self.jobs.history(jid)
            ],
        )

    # ----------------------------------------------------------------- campaigns

    def submit_campaign(self, who: ApiPrincipal, raw: bytes, base_url: str) -> CampaignAccepted:
        try:
            text = decode_utf8(raw, "brief")
            data = parse_text(
                text, source="brief", json_format=True, max_depth=self.settings.intake_max_depth
            )
            brief = parse_brief(data, source="brief", settings=self.settings)
        except DocumentError as exc:
            raise ApiError(422, "Unprocessable Content", str(exc)) from None
        if brief.audience_key is not None:
            self._own_asset(who.tenant, brief.audience_key)
        for r in brief.recipients:
            if r.photo_key is not None:
                self._own_asset(who.tenant, r.photo_key)
        for ref in brief.references:
            self._own_asset(who.tenant, ref.key)
        self._claim_campaign(who.tenant, brief.campaign_id)
        try:
            res = self._campaigns().submit_brief(brief, owner=who.tenant)
        except BriefError as exc:
            raise ApiError(422, "Unprocessable Content", str(exc)) from None
        return CampaignAccepted(
            campaign_id=res.campaign_id,
            jobs=res.total,
            created=res.created,
            requested=res.requested,
            already_final=res.already_final,
            status_url=f"{base_url.rstrip('/')}/v1/campaigns/{res.campaign_id}",
            webhook_secret=res.webhook_secret,
        )

    def campaign(self, who: ApiPrincipal, campaign_id: str) -> CampaignOut:
        self._owned_campaign(who.tenant, campaign_id)
        counts = {state.value: n for state, n in self.jobs.counts_by_state(campaign_id).items() if n}
        final = {s.value for s in FINAL_STATES}
        report_key = self._latest_report(campaign_id)
        return CampaignOut(
            campaign_id=campaign_id,
            total=sum(counts.values()),
            counts=counts,
            unfinished=sum(n for s, n in counts.items() if s not in final),
            report_key=report_key,
            report_url=(
                self.store.presigned_get(self.settings.bucket_reports, report_key, expires_s=900)
                if report_key is not None
                else None
            ),
        )

    def _latest_report(self, campaign_id: str) -> str | None:
        keys = self.store.list_keys(self.settings.bucket_reports, f"{REPORTS_PREFIX}/{campaign_id}/")
        reports = [k for k in keys if k.endswith("/report.json")]
        if not reports:
            return None

        def modified(key: str) -> datetime:
            st = self.store.client.stat_object(self.settings.bucket_reports, key)
            at = st.last_modified
            return at if at is not None else datetime.min.replace(tzinfo=UTC)

        return max(reports, key=modified)

    # ----------------------------------------------------------------- assets

    def _inspect(self, data: bytes) -> CheckedImage:
        with self._decode_slots:
            return inspect_image(data, max_pixels=self.settings.api_upload_max_pixels)

    def upload_asset(self, who: ApiPrincipal, kind: Literal["photo", "reference"], data: bytes) -> AssetOut:
        checked = self._inspect(data)
        sha = hashlib.sha256(data).hexdigest()
        key = validate_key(f"{tenant_prefix(who.tenant)}{kind}s/{sha}.{checked.ext}")
        self.store.put_bytes(self.settings.bucket_assets, key, data, content_type=checked.content_type)
        log.info("api: tenant %s uploaded %s %s (%d bytes)", who.tenant, kind, key, len(data))
        return AssetOut(
            key=key,
            kind=kind,
            content_type=checked.content_type,
            sha256=sha,
            bytes=len(data),
            width=checked.width,
            height=checked.height,
        )

    # ----------------------------------------------------------------- consent

    @staticmethod
    def _actor(who: ApiPrincipal) -> str:
        return f"api:{who.tenant}:{who.key_id}"

    def consent_challenge(
        self, who: ApiPrincipal, subject_id: str, ttl_s: float | None
    ) -> ConsentChallengeView:
        return self._consent_call(
            lambda svc: svc.challenge(subject_id, issued_by=self._actor(who), ttl_s=ttl_s)
        )

    def consent_grant(
        self,
        who: ApiPrincipal,
        subject_id: str,
        *,
        scopes: Sequence[str],
        purpose: str,
        code: str,
        evidence: bytes,
        evidence_name: str,
        photo: bytes | None,
        expires_at: datetime | None,
    ) -> SubjectConsentView:
        if photo is not None:
            self._inspect(photo)
        with tempfile.TemporaryDirectory(prefix="api-consent-") as tmp:
            ev = Path(tmp) / ("evidence" + Path(evidence_name).suffix.lower()[:8])
            ev.write_bytes(evidence)
            ph = None
            if photo is not None:
                ph = Path(tmp) / "photo"
                ph.write_bytes(photo)

            def grant(svc: ConsentService) -> SubjectConsentView:
                rec = svc.grant(
                    subject_id,
                    scopes=scopes,
                    purpose=purpose,
                    evidence=ev,
                    challenge_code=code,
                    recorded_by=self._actor(who),
                    photo=ph,
                    expires_at=expires_at,
                )
                return svc.show(rec.subject_id)

            return self._consent_call(grant)

    def consent_revoke(
        self, who: ApiPrincipal, subject_id: str, scopes: Iterable[str] | None, record_id: uuid.UUID | None
    ) -> SubjectConsentView:
        def revoke(svc: ConsentService) -> SubjectConsentView:
            rec = svc.revoke(subject_id, recorded_by=self._actor(who), scopes=scopes, record_id=record_id)
            return svc.show(rec.subject_id)

        return self._consent_call(revoke)

    def consent_show(self, subject_id: str) -> SubjectConsentView:
        return self._consent_call(lambda svc: svc.show(subject_id))

    def _consent_call(self, call: Callable[[ConsentService], T]) -> T:
        try:
            return call(self._consent())
        except ConsentError as exc:
            raise ApiError(422, "Unprocessable Content", str(exc)) from None
