"""`greetflow consent | likeness | verify | provenance | moderation`: thin wrappers over the
service functions (pipeline.consent, pipeline.moderation.gallery, pipeline.provenance)."""

from __future__ import annotations

import argparse
import getpass
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.settings import get_settings

if TYPE_CHECKING:
    from pipeline.bootstrap import Container


def _who(args: argparse.Namespace) -> str:
    if getattr(args, "by", None):
        return str(args.by)
    try:
        return f"{getpass.getuser()}@cli"
    except (KeyError, OSError):
        return "cli"


@contextmanager
def _container() -> Iterator[Container]:
    from pipeline.bootstrap import Container

    c = Container(get_settings())
    try:
        yield c
    finally:
        c.close()


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def _table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for col in columns:
        t.add_column(col, overflow="fold")
    for row in rows:
        t.add_row(*row)
    Console().print(t)


def _scopes(value: str | None) -> list[str] | None:
    if not value:
        return None
    return [s.strip() for s in value.split(",") if s.strip()]


def _iso(d: datetime | None) -> str:
    return d.isoformat(timespec="seconds") if d is not None else "never"


def _when(value: str) -> datetime:
    d = datetime.fromisoformat(value)
    return d if d.tzinfo is not None else d.replace(tzinfo=UTC)


# --------------------------------------------------------------------------- consent


def cmd_consent(args: argparse.Namespace) -> int:
    with _container() as c:
        svc = c.consent_service()
        action = args.consent_command
        if action == "challenge":
            ch = svc.challenge(args.subject, issued_by=_who(args), ttl_s=args.ttl)
            if args.json:
                _print_json(ch.model_dump(mode="json"))
            else:
                minutes = (ch.expires_at - ch.issued_at).total_seconds() / 60
                print(
                    f"challenge for {ch.subject_id}: code {ch.code}, valid until "
                    f"{ch.expires_at.isoformat(timespec='seconds')} ({minutes:.0f} min). The subject says it "
                    "in the consent video or writes it on the signed form."
                )
            return 0
        if action == "grant":
            expires = _when(args.expires) if args.expires else None
            if args.days is not None:
                expires = datetime.now(UTC) + timedelta(days=args.days)
            rec = svc.grant(
                args.subject,
                scopes=_scopes(args.scopes) or [],
                purpose=args.purpose,
                evidence=Path(args.evidence),
                challenge_code=args.code,
                recorded_by=_who(args),
                photo=Path(args.photo) if args.photo else None,
                expires_at=expires,
            )
            view = svc.show(rec.subject_id)
            if args.json:
                _print_json(
                    {
                        "record": view.records[-1].model_dump(mode="json"),
                        "subject": view.model_dump(mode="json"),
                    }
                )
            else:
                print(
                    f"granted: record {rec.record_id} subject {rec.subject_id} scopes "
                    f"{','.join(sorted(s.value for s in rec.scopes))} purpose {rec.purpose} expires "
                    f"{_iso(rec.expires_at)}; evidence "
                    f"sha256 {rec.evidence_sha256} at {rec.evidence_key}; {view.reference_faces} reference "
                    "face(s); emitted on consent.events"
                )
            return 0
        if action == "revoke":
            rec = svc.revoke(
                args.subject, recorded_by=_who(args), scopes=_scopes(args.scopes), record_id=args.record
            )
            if args.json:
                _print_json(svc.show(rec.subject_id).records[-1].model_dump(mode="json"))
            else:
                what = (
                    f"grant {rec.supersedes}"
                    if rec.supersedes
                    else ",".join(sorted(s.value for s in rec.scopes))
                )
                print(
                    f"revoked: record {rec.record_id} subject {rec.subject_id} ({what}); "
                    "emitted on consent.events: "
                    "the takedown worker removes the subject's published clips"
                )
            return 0
        if action == "show":
            view = svc.show(args.subject)
            if args.json:
                _print_json(view.model_dump(mode="json"))
                return 0
            rows = [
                [str(r.record_id)[:8], r.action, ",".join(sorted(s.value for s in r.scopes)), r.purpose,
                 r.granted_at.isoformat(timespec="seconds"),
                 r.expires_at.isoformat(timespec="seconds") if r.expires_at else "-",
                 r.recorded_by, (r.evidence_sha256 or "-")[:12], str(r.supersedes or "")[:8]]
                for r in view.records
            ]  # fmt: skip
            _table(
                f"consent ledger of {view.subject_id}",
                ["record", "action", "scopes", "purpose", "at", "expires", "by", "evidence", "ends"],
                rows,
            )
            live = "; ".join(
                f"{','.join(sorted(s.value for s in g.scopes))} for {g.purpose}" for g in view.effective
            )
            print(f"in force now: {live or 'nothing'}; reference faces stored: {view.reference_faces}")
            return 0
        if action == "list":
            subjects = svc.list_subjects()
            if args.json:
                _print_json(
                    [
                        {"subject_id": s.subject_id, "records": s.records,
                         "effective_scopes": sorted(x.value for x in s.effective_scopes),
                         "purposes": list(s.purposes), "last_change": s.last_change.isoformat()}
                        for s in subjects
                    ]
                )  # fmt: skip
                return 0
            _table(
                "subjects",
                ["subject", "records", "in force", "purposes", "last change"],
                [
                    [s.subject_id, str(s.records),
                     ",".join(sorted(x.value for x in s.effective_scopes)) or "-",
                     ", ".join(s.purposes) or "-", s.last_change.isoformat(timespec="seconds")]
                    for s in subjects
                ],
            )  # fmt: skip
            return 0
        if action == "expire":
            report = c.consent_expiry()
            print(f"consent expiry: {report.summary()}")
            return 0
    raise AssertionError(action)


# --------------------------------------------------------------------------- likeness


def cmd_likeness(args: argparse.Namespace) -> int:
    with _container() as c:
        svc = c.gallery_service()
        if args.likeness_command == "protect":
            added = svc.protect(
                args.name, [Path(p) for p in args.photos], enrolled_by=_who(args), subject_id=args.subject
            )
            print(f"protected: {args.name}: {added} new face(s) from {len(args.photos)} photo(s)")
        elif args.likeness_command == "unprotect":
            print(f"unprotected: {args.name}: {svc.unprotect(args.name)} face(s) removed")
        else:
            people = svc.people()
            if args.json:
                _print_json([p.model_dump(mode="json") for p in people])
            else:
                _table(
                    "protected persons",
                    ["name", "faces", "linked subject", "enrolled by", "since"],
                    [[p.name, str(p.faces), p.subject_id or "-", p.enrolled_by,
                      p.enrolled_at.isoformat(timespec="seconds")] for p in people],
                )  # fmt: skip
    return 0


# --------------------------------------------------------------------------- verify / provenance


def cmd_verify(args: argparse.Namespace) -> int:
    from pipeline.provenance import dump_json, report_lines, verify_clip

    settings = get_settings()
    if args.trust_anchors:
        settings = settings.model_copy(update={"c2pa_trust_anchors": Path(args.trust_anchors)})
    report = verify_clip(Path(args.clip), settings, check_visible_label=not args.no_visible_label)
    if args.json:
        print(dump_json(report))
    else:
        for line in report_lines(report):
            print(line)
    return 0 if report.ok else 1


def cmd_provenance(args: argparse.Namespace) -> int:
    from pipeline.provenance import init_dev_ca, provenance_dir

    settings = get_settings()
    directory = Path(args.dir) if args.dir else provenance_dir(settings)
    existed = (directory / "signer-chain.pem").is_file()
    ca = init_dev_ca(directory, organization=settings.content_producer, force=args.force)
    state = "kept existing" if existed and not args.force else "created"
    print(
        f"dev CA {state} in {ca.directory}: CA {ca.ca_cert}, signing chain {ca.signer_chain}, "
        f"key {ca.signer_key}"
    )
    print(
        "use it for development only; production sets GREETFLOW_C2PA_CERT_CHAIN and "
        "GREETFLOW_C2PA_PRIVATE_KEY"
    )
    return 0


# --------------------------------------------------------------------------- moderation


def cmd_moderation(args: argparse.Namespace) -> int:
    with _container() as c:
        if args.moderation_command == "findings":
            results = c.moderation_results.history(args.job)
            if args.json:
                from schemas.consent import ModerationRecordView

                views = [
                    ModerationRecordView(
                        id=r.id, job_id=r.job_id, decision=r.decision, findings=r.findings,
                        decided_by=r.decided_by, reason=r.reason, created_at=r.created_at,
                    ).model_dump(mode="json")
                    for r in results
                ]  # fmt: skip
                _print_json(views)
                return 0
            if not results:
                print(f"no moderation results for job {args.job}")
                return 1
            for r in results:
                print(f"{r.created_at.isoformat(timespec='seconds')} {r.decision.value} by {r.decided_by}")
                for f in r.findings:
                    print(f"  [{f.severity.value}] {f.kind}: {f.message}")
            return 0
        queue = c.moderation_results.review_queue(limit=args.limit)
        _table(
            "review queue (oldest first)",
            ["job", "campaign", "recipient", "waiting since", "reason"],
            [[str(j.job_id), j.campaign_id, j.recipient_id, _iso(m.created_at), m.reason]
             for j, m in queue],
        )  # fmt: skip
        return 0


def register(sub: Any) -> None:
    """Add the subcommands to the `greetflow` parser (pipeline.cli.COMMAND_MODULES)."""
    consent = sub.add_parser(
        "consent", help="the consent ledger: challenge, grant, revoke, show, list, expire"
    )
    csub = consent.add_subparsers(dest="consent_command", required=True)
    p = csub.add_parser("challenge", help="issue a short-lived code for the subject's consent artifact")
    p.add_argument("subject")
    p.add_argument("--ttl", type=float, default=None, metavar="SECONDS")
    p.add_argument("--by", default=None, help="who issues it (default: the OS user)")
    p.add_argument("--json", action="store_true")
    p = csub.add_parser("grant", help="record a consent (needs evidence and the challenge code)")
    p.add_argument("subject")
    p.add_argument("--scopes", required=True, help="comma-separated: face,voice,name")
    p.add_argument(
        "--purpose", required=True, help="'campaign:<id>' (or a bare campaign id), 'personal:<id>' or '*'"
    )
    p.add_argument(
        "--evidence",
        required=True,
        help="the consent artifact, judged by its content: an image (JPEG, PNG, WebP), audio (WAV, MP3, "
        "OGG, M4A) or video (MP4, WebM, MOV); for scope face it must show the subject",
    )
    p.add_argument("--code", required=True, help="the challenge code the artifact carries")
    p.add_argument("--photo", default=None, help="the consented photo (required for scope face)")
    p.add_argument(
        "--expires", default=None, help="ISO 8601 expiry (default: GREETFLOW_CONSENT_DEFAULT_TTL_DAYS)"
    )
    p.add_argument("--days", type=float, default=None, help="expire after this many days")
    p.add_argument("--by", default=None, help="who records it (default: the OS user)")
    p.add_argument("--json", action="store_true")
    p = csub.add_parser("revoke", help="withdraw consent (all scopes unless --scopes / --record)")
    p.add_argument("subject")
    p.add_argument("--scopes", default=None, help="comma-separated scopes to withdraw (default: all)")
    p.add_argument("--record", default=None, help="withdraw one grant by record id")
    p.add_argument("--by", default=None)
    p.add_argument("--json", action="store_true")
    p = csub.add_parser("show", help="a subject's ledger and what is in force")
    p.add_argument("subject")
    p.add_argument("--json", action="store_true")
    p = csub.add_parser("list", help="every subject with consent records")
    p.add_argument("--json", action="store_true")
    csub.add_parser("expire", help="expire due grants and take their clips down (the daily sweep)")
    consent.set_defaults(func=cmd_consent)

    likeness = sub.add_parser("likeness", help="the protected-persons gallery")
    lsub = likeness.add_subparsers(dest="likeness_command", required=True)
    p = lsub.add_parser("protect", help="enrol a protected person: NAME PHOTO...")
    p.add_argument("name")
    p.add_argument("photos", nargs="+")
    p.add_argument("--subject", default=None, help="the subject id under which this person may consent")
    p.add_argument("--by", default=None)
    p = lsub.add_parser("unprotect", help="remove a protected person")
    p.add_argument("name")
    p = lsub.add_parser("list", help="protected persons")
    p.add_argument("--json", action="store_true")
    likeness.set_defaults(func=cmd_likeness)

    verify = sub.add_parser("verify", help="check a clip's visible label, AIGC metadata and C2PA manifest")
    verify.add_argument("clip")
    verify.add_argument("--json", action="store_true")
    verify.add_argument(
        "--trust-anchors", default=None, help="PEM bundle (default: settings, else the dev CA)"
    )
    verify.add_argument("--no-visible-label", action="store_true", help="skip the visible-label check")
    verify.set_defaults(func=cmd_verify)

    prov = sub.add_parser("provenance", help="C2PA signing credentials")
    psub = prov.add_subparsers(dest="provenance_command", required=True)
    p = psub.add_parser("init-ca", help="create the dev CA and signing certificate (done on first use too)")
    p.add_argument("--dir", default=None, help="default: <data_dir>/provenance")
    p.add_argument("--force", action="store_true", help="replace an existing dev CA")
    prov.set_defaults(func=cmd_provenance)

    mod = sub.add_parser("moderation", help="stored moderation results")
    msub = mod.add_subparsers(dest="moderation_command", required=True)
    p = msub.add_parser("findings", help="a job's moderation results and findings")
    p.add_argument("job")
    p.add_argument("--json", action="store_true")
    p = msub.add_parser("queue", help="jobs waiting for human review, oldest first")
    p.add_argument("--limit", type=int, default=50)
    mod.set_defaults(func=cmd_moderation)
