"""The one settings class. Every knob is an environment variable with prefix GREETFLOW_.

Defaults point at the embedded local stack (`greetflow dev up`): the Tansu broker,
moto's S3 server and a SQLite file, all on loopback.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GREETFLOW_", extra="ignore")

    # --- where local state lives (SQLite file, dev-stack pid files, caches) ---
    data_dir: Path = Path(".greetflow")

    # --- event bus ---
    kafka_bootstrap: str = "127.0.0.1:19092"
    kafka_client_id: str = "greetflow"
    topic_partitions: int = Field(default=3, ge=1)
    # Keep the rebalance timeout modest: the embedded broker waits that long before a new
    # group's first assignment (300 s gave nothing for over 20 s; 5-30 s assigns in ~3 s).
    consumer_max_poll_interval_ms: int = Field(default=30_000, ge=5_000)
    consumer_session_timeout_ms: int = Field(default=10_000, ge=3_000)
    consumer_poll_timeout_ms: int = Field(default=500, ge=10)
    # A failing message is retried this many times (with backoff) before it goes to the DLQ.
    handler_max_attempts: int = Field(default=3, ge=1)
    handler_retry_backoff_s: float = Field(default=0.5, ge=0)

    # --- message sizes, dead letters and outages (docs/operations.md, "Message sizes,
    # dead letters and outages") ---
    # Largest record the producer sends (kafka-python max_request_size). Keep it at or below
    # the broker's message.max.bytes (Apache Kafka default 1048588) and each topic's
    # max.message.bytes; a larger dead letter is spilled to the object store instead.
    kafka_max_request_bytes: int = Field(default=1_048_576, ge=1024)
    # Bytes fetched per partition / per fetch request. A single record larger than either is
    # still returned (alone), so these bound memory, not the largest message.
    kafka_max_partition_fetch_bytes: int = Field(default=1_048_576, ge=1024)
    kafka_fetch_max_bytes: int = Field(default=52_428_800, ge=1024)
    # A dead letter is offered to `<topic>.dlq` this many times, within this long, before it
    # is spilled to the object store (and a small pointer record goes to the DLQ).
    dlq_send_max_attempts: int = Field(default=3, ge=1)
    dlq_send_max_wait_s: float = Field(default=30.0, gt=0)
    # Spilled dead letters: <bucket>/<prefix>/<topic>/<partition>-<offset>.bin plus a .json
    # sidecar with the headers and the error. Empty bucket: bucket_staging.
    dead_letter_bucket: str = ""
    dead_letter_prefix: str = Field(default="dead-letters", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
    # A worker that cannot reach the database, the broker or the object store keeps its
    # message and retries (backoff doubling from outage_backoff_initial_s up to
    # retry_backoff_max_s) for at most outage_max_wait_s; then it exits non-zero, uncommitted.
    outage_max_wait_s: float = Field(default=300.0, gt=0)
    outage_backoff_initial_s: float = Field(default=0.5, gt=0)
    retry_backoff_max_s: float = Field(default=15.0, gt=0)

    # --- leases and the job sweeper (docs/architecture.md, "Every accepted job ends") ---
    # A step's claim on a job lasts this long and is renewed every third of it while the
    # step works, so a dead worker's job can be taken over within one lease period.
    step_lease_s: float = Field(default=30.0, gt=0)
    # `greetflow worker sweep`: seconds between two sweeps.
    sweep_interval_s: float = Field(default=30.0, gt=0)
    # A job in a non-final, non-human state is stuck when its lease expired or when it made
    # no progress (updated_at) for this long; a stuck job is swept again only after as long.
    sweep_stale_after_s: float = Field(default=180.0, gt=0)
    # After this many sweeps without progress the job is failed with the reason.
    sweep_max_attempts: int = Field(default=5, ge=1)
    # The sweeper's database lock lasts this long (renewed per job and per pass).
    sweep_lock_s: float = Field(default=120.0, gt=0)
    # Most jobs handled per sweep.
    sweep_batch_size: int = Field(default=500, ge=1)

    # --- object store (MinIO in production, moto's S3 server locally) ---
    s3_endpoint: str = "http://127.0.0.1:19000"
    s3_access_key: str = "greetflow"
    s3_secret_key: SecretStr = SecretStr("greetflow-secret")
    s3_region: str = "us-east-1"
    bucket_assets: str = "greetflow-assets"
    bucket_staging: str = "greetflow-staging"
    bucket_distribution: str = "greetflow-distribution"
    bucket_reports: str = "greetflow-reports"
    # Public base URL of the distribution bucket (CDN). Empty: derived from s3_endpoint.
    distribution_base_url: str = ""

    # --- database ---
    database_url: str = ""  # empty: sqlite file under data_dir

    # --- local dev stack ---
    dev_host: str = "127.0.0.1"
    dev_broker_port: int = Field(default=19092, ge=1, le=65535)
    dev_s3_port: int = Field(default=19000, ge=1, le=65535)
    dev_start_timeout_s: float = Field(default=30.0, gt=0)

    # --- rendering ---
    render_device: Literal["auto", "cpu", "cuda"] = "auto"
    render_width: int = 1080
    render_height: int = 1920
    render_fps: int = 30
    render_work_dir: Path | None = None  # empty: data_dir / "render"
    ffmpeg_threads: int = Field(default=0, ge=0)  # 0: let ffmpeg decide

    # --- template engine (docs/templates.md) ---
    # Extra folder of template files (*.yaml); they win over the shipped ones. None: shipped only.
    templates_dir: Path | None = None
    # Shared segments and generated stills are cached here. None: data_dir / "render-cache".
    render_cache_dir: Path | None = None
    render_cache_max_gb: float = Field(default=20.0, gt=0)
    # Template variant (9x16, 1x1, 16x9). Empty: the size render_width x render_height.
    render_variant: str = ""
    # Extra font folders searched before the system ones (colon-separated in the env var).
    font_dirs: list[Path] = Field(default_factory=list)
    generator_backend: Literal["procedural", "diffusers"] = "procedural"
    # Local diffusers pipeline folder (save_pretrained layout); never a hub id.
    generator_model_dir: Path | None = None
    generator_dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    tts_backend: Literal["espeak"] = "espeak"

    # --- provenance / labels ---
    content_producer: str = "Greetflow"
    content_propagator: str = "Greetflow"

    # --- consent, likeness, text, labels, provenance (docs/consent-and-provenance.md) ---
    # A consent challenge code lives this long; the subject says or writes it in the artifact.
    consent_challenge_ttl_s: int = Field(default=1800, ge=60, le=7 * 86_400)
    # A grant without an explicit expiry expires after this many days (0: never).
    consent_default_ttl_days: int = Field(default=365, ge=0)
    # Consent artifacts are stored in the assets bucket under this prefix.
    consent_evidence_prefix: str = Field(
        default="consent-evidence", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
    )
    # dlib face matching: same person below this Euclidean distance (LFW: 0.6).
    likeness_threshold: float = Field(default=0.6, gt=0, lt=2)
    # HOG detections scoring below this are ignored (printed patches score ~0.1, faces > 0.8).
    likeness_min_detection_score: float = 0.3
    # Frames are scaled to this width before detection (faces from ~80 px at this width).
    likeness_analysis_width: int = Field(default=1080, ge=160, le=4096)
    likeness_sample_interval_s: float = Field(default=1.0, gt=0, le=1.0)
    likeness_scene_threshold: float = Field(default=0.3, gt=0, lt=1)
    likeness_max_frames: int = Field(default=120, ge=1)
    # Directory holding the dlib model files; empty: the face-recognition-models package.
    likeness_models_dir: Path | None = None
    # Extra abuse lists: <dir>/<language>.txt, one term per line ('#' comments).
    text_abuse_lists_dir: Path | None = None
    text_max_chars: int = Field(default=500, ge=1)
    text_name_max_chars: int = Field(default=40, ge=1)
    # The visible AI label must show from the first frame for at least this long.
    label_min_seconds: float = Field(default=2.0, ge=0)
    label_match_threshold: float = Field(default=0.5, gt=0, lt=1)
    # Per-finding-kind severity overrides, JSON: {"unknown_face": "block", "text_abuse": "warn"}.
    moderation_rules: str = ""
    # C2PA signing. Empty cert/key: the project's dev CA under data_dir/provenance (created
    # on first use, or by `greetflow provenance init-ca`). Production sets both paths.
    c2pa_cert_chain: Path | None = None  # PEM: signing certificate first, then intermediates
    c2pa_private_key: Path | None = None  # PEM (PKCS#8)
    c2pa_signing_alg: Literal["es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519"] = "es256"
    c2pa_tsa_url: str = ""  # RFC 3161 time-stamp authority; empty: none (offline)
    # PEM bundle of trust anchors for `greetflow verify`; empty: the dev CA, when present.
    c2pa_trust_anchors: Path | None = None
    # Named in the C2PA manifest as the generator when the staging object does not say.
    generator_model: str = "greetflow-procedural"

    # --- scheduled campaigns (Airflow `campaign_<id>` DAGs, docs/airflow.md) ---
    # Folder of brief files (*.yaml, *.yml, *.json), one DAG each. None: dags/campaigns/.
    campaigns_dir: Path | None = None
    # Recipients per audience chunk (one mapped publish task per chunk).
    campaign_chunk_size: int = Field(default=2_000, ge=1, le=100_000)
    # Render requests per Kafka batch within a chunk.
    campaign_batch_size: int = Field(default=500, ge=1)
    # A run waits at most this long after its requests were published; then it reports and fails.
    campaign_deadline_s: float = Field(default=6 * 3600, gt=0)
    # Seconds between two checks of the job states (reschedule-mode sensor).
    campaign_poll_interval_s: float = Field(default=30.0, ge=1)
    # False: a job in needs_review counts as settled (a human decides later; the report
    # lists it as pending review). True: the run waits for the review decisions too.
    campaign_wait_for_review: bool = False
    # Database that an audience `.sql` object is run against. Empty: the Greetflow database.
    # Use a read-only user: the query runs in a read-only transaction where the backend allows.
    audience_database_url: SecretStr = SecretStr("")

    # --- review queue web app (docs/review-queue.md) ---
    review_host: str = "127.0.0.1"
    review_port: int = Field(default=8088, ge=1, le=65535)
    # A case waiting longer than this (since it entered needs_review) is escalated.
    review_sla_hours: float = Field(default=24.0, gt=0)
    # A reviewer holds a case this long after claiming it (renewed on each claim).
    review_lease_s: int = Field(default=900, ge=30, le=86_400)
    review_session_ttl_s: int = Field(default=8 * 3600, ge=60, le=7 * 86_400)
    # Secure flag of the session cookie. Turn off only for plain-http local use.
    review_cookie_secure: bool = True
    # Presigned media URLs (clip, poster, face crops, consent evidence) live this long.
    review_media_url_ttl_s: int = Field(default=900, ge=60, le=86_400)
    review_queue_limit: int = Field(default=200, ge=1, le=5_000)
    # Approving a case with one of these finding kinds needs a second approval by a lead.
    review_four_eyes_kinds: list[str] = Field(default_factory=lambda: ["unknown_face", "protected_person"])

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'greetflow.db').resolve()}"

    @property
    def resolved_render_cache_dir(self) -> Path:
        return self.render_cache_dir or (self.data_dir / "render-cache")

    @property
    def resolved_render_dir(self) -> Path:
        return self.render_work_dir or (self.data_dir / "render")

    @property
    def resolved_distribution_base_url(self) -> str:
        base = self.distribution_base_url or f"{self.s3_endpoint.rstrip('/')}/{self.bucket_distribution}"
        return base.rstrip("/")

    @property
    def buckets(self) -> list[str]:
        return [self.bucket_assets, self.bucket_staging, self.bucket_distribution, self.bucket_reports]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
