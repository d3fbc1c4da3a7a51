"""`greetflow stack init` and `greetflow stack check`: the topics (and their `.dlq` twins),
the buckets with their policies, and the database schema a deployment needs.

`init` creates what is missing and migrates (under the migration lock), then checks;
running it again creates nothing. `check` changes nothing and reports one line per thing
that is missing or misconfigured.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pipeline.adapters.db import Database, MigrationOutcome, head_revision, known_revisions
from pipeline.adapters.kafka import admin_client, ensure_topics
from pipeline.adapters.storage import bucket_access, ensure_buckets, public_read_policy, s3_client
from pipeline.settings import Settings
from pipeline.topics import ALL_TOPICS

ADMIN_TIMEOUT_S = 15.0


def _why(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:160]}"


@dataclass(frozen=True)
class Problem:
    """One thing missing or misconfigured, e.g. ("topic", "render.requests", "missing")."""

    kind: str  # topic | bucket | schema | broker | object store | database
    name: str
    detail: str

    def render(self) -> str:
        return f"{self.kind} {self.name}: {self.detail}"


@dataclass
class InitReport:
    topics_created: list[str] = field(default_factory=list)
    buckets_created: list[str] = field(default_factory=list)
    migration: MigrationOutcome | None = None
    problems: list[Problem] = field(default_factory=list)

    @property
    def created_nothing(self) -> bool:
        return (
            not self.topics_created
            and not self.buckets_created
            and not (self.migration is not None and self.migration.applied)
        )

    def lines(self) -> list[str]:
        out: list[str] = []
        if self.topics_created:
            out.append(f"created {len(self.topics_created)} topics: {', '.join(self.topics_created)}")
        if self.buckets_created:
            out.append(f"created {len(self.buckets_created)} buckets: {', '.join(self.buckets_created)}")
        if self.migration is not None:
            out.append(f"database: {self.migration.describe()}")
        if self.created_nothing and not self.problems:
            out.append("nothing created: every topic, bucket and migration was already there")
        out.extend(p.render() for p in self.problems)
        return out


def expected_partitions(settings: Settings, topic: str) -> int:
    return settings.dlq_topic_partitions if topic.endswith(".dlq") else settings.topic_partitions


def topic_problems(settings: Settings, described: Iterable[dict[str, Any]]) -> list[Problem]:
    """Compare the broker's topic metadata (kafka-python `describe_topics`) with the settings."""
    by_name = {str(t.get("topic") or t.get("name")): t for t in described}
    problems: list[Problem] = []
    for topic in ALL_TOPICS:
        meta = by_name.get(topic)
        if meta is None or int(meta.get("error_code", 0) or 0) != 0:
            problems.append(Problem("topic", topic, "missing"))
            continue
        partitions = list(meta.get("partitions") or [])
        want = expected_partitions(settings, topic)
        if len(partitions) < want:
            problems.append(
                Problem(
                    "topic",
                    topic,
                    f"{len(partitions)} partitions, below the setting's {want} "
                    f"(GREETFLOW_{'DLQ_' if topic.endswith('.dlq') else ''}TOPIC_PARTITIONS)",
                )
            )
        replicas = min(
            (len(p.get("replica_nodes") or p.get("replicas") or []) for p in partitions), default=0
        )
        if partitions and replicas < settings.topic_replication_factor:
            problems.append(
                Problem(
                    "topic",
                    topic,
                    f"replication factor {replicas}, below GREETFLOW_TOPIC_REPLICATION_FACTOR="
                    f"{settings.topic_replication_factor}",
                )
            )
    return problems


def _anonymous(principal: Any) -> bool:
    if principal == "*":
        return True
    if isinstance(principal, dict):
        aws = principal.get("AWS")
        values = aws if isinstance(aws, list) else [aws]
        return "*" in values
    return False


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def policy_problem(bucket: str, access: str, policy: str | None) -> str | None:
    """Why `policy` (the bucket's policy JSON, None when it has none) is not what `access`
    ("public-read" or "private") wants; None when it is."""
    statements: list[dict[str, Any]] = []
    if policy:
        try:
            doc = json.loads(policy)
        except ValueError:
            return "policy is not valid JSON"
        statements = [s for s in _as_list(doc.get("Statement", [])) if isinstance(s, dict)]
    public = [s for s in statements if s.get("Effect") == "Allow" and _anonymous(s.get("Principal"))]
    if access == "private":
        if public:
            allowed = sorted({str(a) for s in public for a in _as_list(s.get("Action"))})
            return f"should be private, but its policy allows anonymous {', '.join(allowed)}"
        return None
    expected = public_read_policy(bucket)["Statement"][0]
    want_actions = {str(a) for a in _as_list(expected["Action"])}
    want_resources = {str(r) for r in _as_list(expected["Resource"])}
    if not public:
        return "should be public-read (anonymous s3:GetObject on its objects), but has no such policy"
    actions = {str(a) for s in public for a in _as_list(s.get("Action"))}
    resources = {str(r) for s in public for r in _as_list(s.get("Resource"))}
    if actions != want_actions or resources != want_resources:
        return (
            f"should allow anonymous s3:GetObject on {bucket}/* only, but allows "
            f"{', '.join(sorted(actions))} on {', '.join(sorted(resources))}"
        )
    return None


class StackService:
    """Sets up and checks one deployment's broker topics, buckets and database schema."""

    def __init__(self, settings: Settings, database: Callable[[], Database]) -> None:
        self.settings = settings
        self._database = database

    # --------------------------------------------------------------------- init

    def init(self) -> InitReport:
        report = InitReport()
        s = self.settings
        failed: list[Problem] = []
        try:
            report.topics_created = ensure_topics(s, timeout_s=ADMIN_TIMEOUT_S)
        except Exception as exc:
            failed.append(Problem("broker", s.kafka_bootstrap, f"could not create topics ({_why(exc)})"))
        try:
            report.buckets_created = ensure_buckets(s)
        except Exception as exc:
            failed.append(Problem("object store", s.s3_endpoint, f"could not set up buckets ({_why(exc)})"))
        try:
            report.migration = self._database().migrate(lock_timeout_s=s.migration_wait_s)
        except Exception as exc:
            failed.append(Problem("database", "schema", f"could not migrate ({_why(exc)})"))
        # What is still wrong afterwards; a step that failed is reported once, by its error.
        kinds = {p.kind for p in failed}
        remaining = [p for p in self.check() if p.kind not in kinds]
        report.problems = failed + remaining
        return report

    # --------------------------------------------------------------------- check

    def check(self) -> list[Problem]:
        return self.check_topics() + self.check_buckets() + self.check_schema()

    def check_topics(self) -> list[Problem]:
        s = self.settings
        try:
            admin = admin_client(s.kafka_bootstrap, s.kafka_client_id, ADMIN_TIMEOUT_S, s)
        except Exception as exc:
            return [Problem("broker", s.kafka_bootstrap, f"unreachable ({_why(exc)})")]
        try:
            existing = set(admin.list_topics())
            present = [t for t in ALL_TOPICS if t in existing]
            described = admin.describe_topics(present) if present else []
        except Exception as exc:
            return [Problem("broker", s.kafka_bootstrap, f"metadata request failed ({_why(exc)})")]
        finally:
            admin.close()
        return topic_problems(s, described)

    def check_buckets(self) -> list[Problem]:
        from minio.error import S3Error

        s = self.settings
        try:
            access = bucket_access(s)
        except Exception as exc:
            return [Problem("bucket", s.bucket_distribution, str(exc))]
        client = s3_client(s, timeout_s=ADMIN_TIMEOUT_S)
        problems: list[Problem] = []
        for bucket, mode in access.items():
            try:
                if not client.bucket_exists(bucket):
                    problems.append(Problem("bucket", bucket, "missing"))
                    continue
                try:
                    policy: str | None = client.get_bucket_policy(bucket)
                except S3Error as exc:
                    if exc.code != "NoSuchBucketPolicy":
                        raise
                    policy = None
            except S3Error as exc:
                problems.append(Problem("bucket", bucket, f"cannot be read ({exc.code}: {exc.message})"))
                continue
            except Exception as exc:
                return [Problem("object store", s.s3_endpoint, f"unreachable ({_why(exc)})")]
            detail = policy_problem(bucket, mode, policy)
            if detail is not None:
                problems.append(Problem("bucket", bucket, detail))
        return problems

    def check_schema(self) -> list[Problem]:
        head = head_revision()
        try:
            db = self._database()
            current = db.current_revision()
        except Exception as exc:
            return [Problem("database", "schema", f"unreachable ({_why(exc)})")]
        if current == head:
            return []
        shown = f"at {current}" if current else "not migrated (no alembic_version)"
        if current and current not in known_revisions():
            shown = f"at {current}, which this release does not know (migrated by a newer one)"
        return [Problem("schema", "database", f"{shown}, head is {head}")]
