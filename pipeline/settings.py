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
    # Longest a fetch waits at the broker for new records: bounds each step's hand-off delay
    # (Tansu sometimes holds a fetch this long although records arrived meanwhile).
    consumer_fetch_max_wait_ms: int = Field(default=100, ge=1, le=5_000)
    # A failing message is retried this many times (with backoff) before it goes to the DLQ.
    handler_max_attempts: int = Field(default=3, ge=1)
    handler_retry_backoff_s: float = Field(default=0.5, ge=0)

    # --- trust: deployment kind, job id key, producer keys, Kafka SASL/TLS (docs/security.md) ---
    # "production": nothing is generated (a process that creates jobs refuses to start
    # without job_id_key; without producer_keys only jobs with a row are rendered) and Kafka
    # needs TLS. "dev": a missing job id key or producer key is generated once under
    # data_dir/secrets (mode 0600) and kept there.
    environment: Literal["dev", "production"] = "dev"
    # HMAC key of the job ids (`schemas.common.job_id_for`). Changing it changes every new
    # job id: re-running an old campaign then makes new jobs.
    job_id_key: SecretStr = SecretStr("")
    # Trusted producers' HMAC keys, "key-id:secret,key-id:secret" (secrets >= 32 chars).
    # Envelopes are signed with producer_key_id (empty: the first listed) and verified
    # against every listed key, so a rotation lists the new key and the old one for a while.
    producer_keys: SecretStr = SecretStr("")
    producer_key_id: str = ""
    # Every producer, consumer and admin client gets these (pipeline.adapters.kafka.kafka_client_config).
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "SCRAM-SHA-512"
    kafka_sasl_username: str = ""
    kafka_sasl_password: SecretStr = SecretStr("")
    kafka_ssl_cafile: Path | None = None  # PEM bundle of the brokers' CA; None: the system's
    kafka_ssl_certfile: Path | None = None  # PEM client certificate (mutual TLS)
    kafka_ssl_keyfile: Path | None = None  # PEM key of kafka_ssl_certfile
    kafka_ssl_key_password: SecretStr = SecretStr("")
    kafka_ssl_check_hostname: bool = True

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
    # Producer batching (campaign fan-out sends thousands of requests at once): a batch waits
    # up to kafka_linger_ms to fill kafka_batch_bytes; single publishes are flushed at once.
    kafka_linger_ms: int = Field(default=20, ge=0, le=1000)
    kafka_batch_bytes: int = Field(default=262_144, ge=1024)
    # Producer batch compression; auto: lz4 when the lz4 package is installed, else gzip.
    kafka_compression: Literal["auto", "lz4", "gzip", "snappy", "zstd", "none"] = "auto"
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

    # --- metrics, health/readiness endpoints, logs (docs/operations.md, "Metrics, logs and traces") ---
    # /metrics, /healthz and /readyz of a worker process on this port; 0: off. Two workers
    # in one pod need two ports: set it per container, or per role in metrics_role_ports.
    metrics_port: int = Field(default=0, ge=0, le=65535)
    metrics_host: str = "0.0.0.0"
    # Per-role ports, JSON: {"render": 9101, "moderate": 9102}; a role listed wins over metrics_port.
    metrics_role_ports: dict[str, int] = Field(default_factory=dict)
    # Readiness probes of the broker, the object store and the database: every this many
    # seconds, each with this timeout (a stopped dependency shows within about their sum).
    readiness_interval_s: float = Field(default=1.0, gt=0, le=60)
    readiness_timeout_s: float = Field(default=1.0, gt=0, le=30)
    # greetflow_consumer_lag and greetflow_jobs are refreshed in the background this often.
    metrics_lag_interval_s: float = Field(default=15.0, gt=0)
    metrics_jobs_interval_s: float = Field(default=5.0, gt=0)
    # greetflow_jobs counts non-final jobs, and final ones that changed within this window.
    metrics_jobs_window_s: float = Field(default=86_400.0, gt=0)
    # "json": one JSON object per line; "console": the one-line human format; "auto":
    # console on a terminal, JSON otherwise.
    log_format: Literal["auto", "json", "console"] = "auto"

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

    # --- bucket policies (docs/security.md, "Buckets") ---
    # Who can read published clips: "public-read" (anonymous GetObject on the distribution
    # bucket, URLs under distribution_base_url) or "presigned" (the bucket stays private and
    # each recorded URL is presigned for distribution_url_ttl_s; SigV4 allows at most 7 days).
    distribution_access: Literal["public-read", "presigned"] = "public-read"
    distribution_url_ttl_s: int = Field(default=7 * 86_400, ge=60, le=7 * 86_400)

    # --- database ---
    database_url: str = ""  # empty: sqlite file under data_dir

    # --- stack init / check and migrations (docs/operations.md, "Stack init and check") ---
    # Replication factor of the topics `greetflow stack init` creates, and the partitions of
    # each `.dlq` twin (main topics get topic_partitions).
    topic_replication_factor: int = Field(default=1, ge=1)
    dlq_topic_partitions: int = Field(default=1, ge=1)
    # True: a worker applies pending migrations itself, under the migration lock. False: it
    # waits for `greetflow stack init` (the stack-init Job) to bring the schema to head.
    migrate_on_start: bool = True
    # Longest wait for the migration lock, or for the schema to reach head.
    migration_wait_s: float = Field(default=300.0, gt=0)

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
    # x264 processes a personal segment is split over (at most one per keyframe interval). 0: one per CPU.
    render_encode_jobs: int = Field(default=0, ge=0)
    # Reuse the encoded personal segment of an identical recipient (same name, locale, photo, template).
    render_dedup: bool = True
    # Size limit of that personal-segment cache (<render_cache_dir>/personal, least recently used go first).
    render_dedup_max_gb: float = Field(default=2.0, gt=0)
    # Template variant (9x16, 1x1, 16x9). Empty: the size render_width x render_height.
    render_variant: str = ""
    # Extra font folders searched before the system ones (colon-separated in the env var).
    font_dirs: list[Path] = Field(default_factory=list)
    generator_backend: Literal["procedural", "diffusers"] = "procedural"
    # Local diffusers pipeline folder (save_pretrained layout); never a hub id.
    generator_model_dir: Path | None = None
    generator_dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    tts_backend: Literal["espeak"] = "espeak"

    # --- generated motion: video plates and living photos (docs/generation.md) ---
    # Local diffusers pipeline folders (save_pretrained layout; the class comes from their
    # model_index.json): text-to-video for shared plates, image-to-video for living photos.
    video_model_dir: Path | None = None
    video_i2v_model_dir: Path | None = None
    video_device: Literal["auto", "cpu", "cuda"] = "auto"
    video_dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # auto: bf16 on GPU
    video_vae_tiling: bool = True
    video_vae_slicing: bool = True
    video_cpu_offload: bool = False
    video_compile: bool = False  # torch.compile the transformer (GPU only)
    # Generation size (portrait); each backend rounds it to its VAE/patch multiple.
    video_width: int = Field(default=480, ge=16, le=2048)
    video_height: int = Field(default=832, ge=16, le=2048)
    # What a generated_video / living_photo layer gets for a field it leaves out.
    video_frames: int = Field(default=49, ge=9, le=257)
    video_fps: int = Field(default=24, ge=8, le=60)
    video_steps: int = Field(default=30, ge=1, le=200)
    video_guidance: float = Field(default=5.0, ge=0.0, le=30.0)
    video_seed: int = Field(default=0, ge=0)
    # Shared plates live in the assets bucket under this prefix; a claim older than
    # video_claim_ttl_s with no plate is taken over; a waiter gives up after video_wait_s.
    video_plate_prefix: str = "generated/plates"
    video_claim_ttl_s: float = Field(default=1800.0, gt=0)
    video_wait_s: float = Field(default=3600.0, gt=0)
    video_queue_max: int = Field(default=8, ge=1)  # pending generations per worker process
    # Encoder of stored plates; h264_nvenc falls back to libx264 where the GPU has no NVENC.
    video_encoder: Literal["libx264", "h264_nvenc"] = "libx264"

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
    # Sampled frames a moderator searches for faces at once (threads; dlib runs without the GIL).
    likeness_detect_threads: int = Field(default=2, ge=1, le=16)
    # Directory holding the dlib model files; empty: the face-recognition-models package.
    likeness_models_dir: Path | None = None
    # --- likeness: small faces (pipeline/faces.py, moderation/clip.py) ---
    # Smallest face moderation must find where a clip shows the subject photo, in pixels of
    # a 1920-px-high frame (scaled to the clip's height: 20 px at 960); that region of each
    # sampled frame is upscaled until such a face is 80 px (at most 4x).
    likeness_min_face_px: int = Field(default=40, ge=10, le=400)
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
    # Recipients per audience chunk: one batched insert and produce at intake, one mapped
    # publish task per chunk in a DAG run (1M recipients: 200 chunks).
    campaign_chunk_size: int = Field(default=5_000, ge=1, le=100_000)
    # `greetflow submit`: worker processes that measure the template fit of an audience's
    # names while the intake reads on (0: measured in the intake process).
    intake_fit_workers: int = Field(default=1, ge=0, le=16)
    # Jobs per batched insert and produce when a DAG task submits its chunk.
    campaign_batch_size: int = Field(default=5_000, ge=1)
    # A run waits at most this long after its requests were published; then it reports and fails.
    campaign_deadline_s: float = Field(default=6 * 3600, gt=0)
    # Seconds between two checks of the job states (reschedule-mode sensor).
    campaign_poll_interval_s: float = Field(default=30.0, ge=1)
    # False: a job in needs_review counts as settled (a human decides later; the report
    # lists it as pending review). True: the run waits for the review decisions too.
    campaign_wait_for_review: bool = False
    # Database that an audience `.sql` object is run against: never the Greetflow database
    # (refused when empty, equal to database_url, or holding Greetflow's tables). Use a
    # read-only user; the query also runs in a read-only transaction.
    audience_database_url: SecretStr = SecretStr("")

    # --- intake: brief and template files, audiences (docs/security.md, "Intake and audiences") ---
    # Largest brief / template file read; nesting deeper than intake_max_depth is refused.
    intake_max_brief_bytes: int = Field(default=16 * 2**20, ge=1024)
    intake_max_template_bytes: int = Field(default=2**20, ge=1024)
    intake_max_depth: int = Field(default=32, ge=4, le=1000)
    # Development only: accept http webhook URLs on loopback (127.0.0.0/8, ::1, localhost).
    intake_allow_loopback_webhooks: bool = False
    # A SQL audience returning more rows than this is refused (the campaign is not sent).
    audience_max_rows: int = Field(default=10_000_000, ge=1)
    # A SQL audience query running longer than this is cancelled.
    audience_statement_timeout_s: float = Field(default=30.0, gt=0, le=3600)

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

    # --- review app login: throttling, lockout, password hashing (docs/security.md, "Review app") ---
    # Per account: this many failures are free; each further one blocks the account for
    # review_login_backoff_s, doubling per failure up to review_login_backoff_max_s.
    review_login_free_failures: int = Field(default=5, ge=1)
    review_login_backoff_s: float = Field(default=5.0, gt=0)
    review_login_backoff_max_s: float = Field(default=300.0, gt=0)
    # Per account: after this many failures the account is locked for review_login_lockout_s.
    review_login_lockout_failures: int = Field(default=10, ge=1)
    review_login_lockout_s: float = Field(default=900.0, gt=0)
    # Per client IP (shared by offices behind one NAT, so higher), same backoff and lockout.
    review_login_ip_free_failures: int = Field(default=20, ge=1)
    review_login_ip_lockout_failures: int = Field(default=100, ge=1)
    # A failure older than this (and no block pending) no longer counts.
    review_login_failure_window_s: float = Field(default=3600.0, gt=0)
    # argon2id cost of new hashes (existing ones are rehashed on their next login).
    review_argon2_memory_kib: int = Field(default=65_536, ge=8, le=4 * 2**20)
    review_argon2_time_cost: int = Field(default=3, ge=1, le=20)
    review_argon2_parallelism: int = Field(default=4, ge=1, le=64)
    # At most this many password verifications run at once per process (each holds
    # review_argon2_memory_kib); a login waits at most review_hash_wait_s for a slot, at
    # most review_hash_max_waiting logins wait, and any other gets 503 with Retry-After.
    review_hash_concurrency: int = Field(default=2, ge=1, le=64)
    review_hash_wait_s: float = Field(default=5.0, ge=0)
    review_hash_max_waiting: int = Field(default=16, ge=0)

    # --- render API (docs/api.md): listen address, per-key rate limit, upload caps ---
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8090, ge=1, le=65535)
    # Token bucket per key, in this process: this many requests per minute, bursts up to
    # api_rate_burst. A key row's own rate_limit_per_min wins over the default.
    api_rate_limit_per_min: int = Field(default=120, ge=1)
    api_rate_burst: int = Field(default=30, ge=1)
    # Uploads (POST /v1/assets, consent evidence): at most this many bytes and pixels.
    api_upload_max_bytes: int = Field(default=15 * 2**20, ge=1024)
    api_upload_max_pixels: int = Field(default=40_000_000, ge=1)
    # An Idempotency-Key is remembered this long per tenant.
    api_idempotency_ttl_s: int = Field(default=86_400, ge=60)

    # --- webhooks (docs/api.md, "Webhooks"): retries, timeouts, signing, the SSRF guard ---
    # A delivery is retried (exponential backoff with full jitter, base..max) until it is
    # this old, then it is dead (and written to the dead-letter bucket).
    webhook_max_age_s: float = Field(default=86_400.0, gt=0)
    webhook_backoff_base_s: float = Field(default=10.0, gt=0)
    webhook_backoff_max_s: float = Field(default=3_600.0, gt=0)
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    # Development and tests only: let webhooks reach loopback (127.0.0.0/8, ::1), over http too.
    webhook_allow_loopback: bool = False
    # After a rotation the previous secret keeps signing (a second v1=) this long.
    webhook_secret_grace_s: float = Field(default=86_400.0, ge=0)
    # Receivers (verify_signature) refuse a signature timestamp further off than this.
    webhook_tolerance_s: int = Field(default=300, ge=1)
    # The delivery loop: how often it looks for due deliveries, how many it claims at
    # once, and how long a claim holds a delivery against other webhook workers.
    webhook_poll_s: float = Field(default=1.0, gt=0)
    webhook_batch: int = Field(default=20, ge=1)
    webhook_lease_s: float = Field(default=60.0, gt=0)
    webhook_max_redirects: int = Field(default=3, ge=0, le=10)

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
