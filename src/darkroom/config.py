"""Settings: one object, built once and passed down. No module-level globals.

Where a value comes from, strongest first: CLI flags, env `DARKROOM_*`, `./darkroom.toml`,
`~/.config/darkroom/darkroom.toml` (`$XDG_CONFIG_HOME`), the defaults here. `DARKROOM_CONFIG=FILE` names the one
file to read instead (empty: none). Paths are absolute once read: a relative path in a TOML file is taken from the
file's folder, any other from the current folder, so every `darkroom` command run anywhere means the same data dir."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

CONFIG_ENV = "DARKROOM_CONFIG"
CONFIG_NAME = "darkroom.toml"
_PATH_KEYS = ("data_dir", "models_dir")


class ConfigFileError(ValueError):
    """A darkroom.toml that cannot be read: the message names the file and the place."""


def config_files() -> list[Path]:
    """The TOML files that exist, weakest first: the user's, then the current folder's (or `$DARKROOM_CONFIG`)."""
    explicit = os.environ.get(CONFIG_ENV)
    if explicit is not None:
        return [Path(explicit).expanduser().absolute()] if explicit.strip() else []
    user = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "darkroom" / CONFIG_NAME
    return [p.absolute() for p in (user, Path.cwd() / CONFIG_NAME) if p.is_file()]


def read_config_file(path: Path) -> dict[str, Any]:
    """One file's settings, its relative paths made absolute against the file's folder."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigFileError(f"{path}: {exc}") from None
    for key in _PATH_KEYS:
        if isinstance(data.get(key), str):
            data[key] = str(path.parent / Path(data[key]).expanduser())
    return data


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        old = merged.get(key)
        merged[key] = _merge(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
    return merged


class TomlFilesSource(PydanticBaseSettingsSource):
    """pydantic-settings source for the darkroom.toml files (tomllib, stdlib); tables set the nested settings."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # __call__ reads whole files instead

    def __call__(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for path in config_files():
            merged = _merge(merged, read_config_file(path))
        return merged


def state_file() -> Path:
    """Where `darkroom serve` records the data dir it uses, for commands run later from other folders."""
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return base / "darkroom" / "serve.json"


def record_data_dir(settings: Settings) -> None:
    """Best effort: a read-only home must not stop a server from starting."""
    path = state_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"data_dir": str(settings.data_dir), "port": settings.port}) + "\n")
    except OSError:
        pass


def recorded_data_dir() -> Path | None:
    """The data dir the last `darkroom serve` on this account used, if it still exists."""
    try:
        path = Path(json.loads(state_file().read_text())["data_dir"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return path if path.is_absolute() and path.is_dir() else None


def command_settings(**flags: Any) -> tuple[Settings, str]:
    """Settings for a command other than `serve`, and where its data dir came from. With nothing configured and no
    `./darkroom-data` here, the data dir `darkroom serve` recorded is used: the one a user means from another folder."""
    given = {k: v for k, v in flags.items() if v is not None}
    settings = Settings(**given)
    origin = data_dir_origin(flag="data_dir" in given)
    if origin == "default" and not settings.data_dir.exists() and (recorded := recorded_data_dir()) is not None:
        settings = Settings(**{**given, "data_dir": recorded})
        origin = f"recorded by `darkroom serve` in {state_file()}"
    return settings, origin


def data_dir_origin(flag: bool = False) -> str:
    """Which source set the data dir, for the start-up line: a flag, the env, a TOML file, or the default."""
    if flag:
        return "--data-dir"
    if os.environ.get("DARKROOM_DATA_DIR"):
        return "DARKROOM_DATA_DIR"
    for path in reversed(config_files()):
        if "data_dir" in read_config_file(path):
            return str(path)
    return "default"


class Limits(BaseModel):
    """Every request limit in one place; each violation is a 4xx naming the field."""

    max_width: int = 2048
    max_height: int = 2048
    max_pixels: int = 2048 * 2048
    min_side: int = 64
    max_steps: int = 150
    max_n: int = 8
    max_prompt_chars: int = 4000
    max_upload_bytes: int = 16 * 1024 * 1024
    max_upload_pixels: int = 4096 * 4096
    max_guidance: float = 30.0
    max_queue_depth: int = 10_000
    max_tenant_queue_depth: int | None = 2_000


class StorageSettings(BaseModel):
    """Where image bytes live. `local`: a folder in the data dir (one node). `s3`: any S3-compatible bucket (MinIO,
    AWS S3, R2, …) that every API and worker node reaches. Env: `DARKROOM_STORAGE__S3_BUCKET` and so on."""

    blob_backend: Literal["local", "s3"] = "local"
    s3_bucket: str | None = None
    s3_prefix: str = Field(default="", description="key prefix inside the bucket, e.g. `darkroom/prod`")
    s3_endpoint_url: str | None = Field(default=None, description="MinIO/R2/…; unset for AWS S3")
    s3_region: str | None = None
    s3_access_key_id: str | None = Field(default=None, description="unset: boto3's chain (env, profile, IAM role)")
    s3_secret_access_key: SecretStr | None = None
    s3_presign_seconds: int = Field(default=3600, ge=1, le=7 * 24 * 3600)
    s3_max_attempts: int = Field(default=5, ge=1, description="botocore retries (standard mode) per request")
    s3_create_bucket: bool = Field(default=False, description="create the bucket at start (development, MinIO)")
    png_compress_level: int = Field(
        default=6,
        ge=0,
        le=9,
        description="zlib level of the PNGs workers store (Pillow's default, 6). At 512x512 and 1024x1024 level 1 "
        "writes about a third faster for files about 11 % larger: PNG encoding is most of a large image's "
        "post-processing CPU",
    )


class WebhookSettings(BaseModel):
    """Webhook delivery (darkroom/webhooks). Env: `DARKROOM_WEBHOOKS__SECRET`, `DARKROOM_WEBHOOKS__ALLOW_HOSTS`, …

    `allow_hosts` opens the SSRF guard for named hosts or CIDRs (`hooks.internal`, `10.0.0.0/8`, `127.0.0.1`):
    by default private, loopback, link-local and other non-public addresses are never called."""

    secret: SecretStr | None = Field(default=None, description="HMAC-SHA256 key; without it nothing is delivered")
    allow_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated (or JSON list) hosts and CIDRs the SSRF guard lets through"
    )
    max_attempts: int = Field(default=8, ge=1)
    backoff_seconds: float = Field(default=2.0, gt=0, description="first retry delay; doubles each time, jittered")
    max_backoff_seconds: float = Field(default=600.0, gt=0)
    timeout_seconds: float = Field(default=10.0, gt=0)
    poll_seconds: float = Field(default=0.5, gt=0)
    enabled: bool = Field(default=True, description="run the dispatcher in API processes")

    @field_validator("allow_hosts", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value


class SecuritySettings(BaseModel):
    """Access control and content safety (darkroom/auth, darkroom/safety). Env: `DARKROOM_SECURITY__INSECURE`, …

    Secure by default: without API keys the API answers only on a loopback address; `insecure` (the `--insecure`
    flag) lets it answer unauthenticated requests on any address, which is for a closed network only."""

    insecure: bool = False
    bootstrap_admin_key: SecretStr | None = Field(
        default=None,
        description="a `dk_…` key (from `darkroom keys token`) registered as an admin key at start if it is not yet:"
        " how a container platform hands the first key over as a secret",
    )
    bootstrap_metrics_key: SecretStr | None = Field(
        default=None,
        description="a `dk_…` key registered at start as a `metrics` key (reads /metrics and nothing else): the"
        " scrape token a Prometheus beside the service holds (deploy/docker-compose.yml)",
    )
    allow_pickle_models: bool = Field(
        default=False,
        description="load pickled checkpoints (.ckpt/.pt/.bin), which can run code; only an admin turns this on",
    )
    auto_approve_models: bool = Field(
        default=False,
        description="serve a model file that changed (or, with approve_first_seen_models off, appeared) at once, "
        "recording it as a new approved version, instead of holding it until an operator approves it",
    )
    approve_first_seen_models: bool = Field(
        default=False,
        description="a model name never seen before is approved with the first file found for it; off (the default): "
        "a new model waits for an operator's approval like a changed file (models darkroom writes itself, the "
        "smoke-test and demo models, are approved by the process that writes them)",
    )
    keep_model_versions: bool = Field(
        default=True,
        description="copy each approved version into <data_dir>/model-versions/ so `models rollback` can restore it",
    )

    @field_validator("bootstrap_admin_key", "bootstrap_metrics_key", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    prompt_classifier: str | None = Field(
        default=None, description="`module:callable` checked after the tenant's rules; see darkroom.safety.policy"
    )
    output_checker: str | None = Field(
        default=None, description="`module:callable` that flags images for review; see darkroom.safety.checker"
    )
    watermark: bool = Field(default=True, description="embed the invisible watermark in every output")
    c2pa: bool = Field(default=True, description="embed a C2PA manifest when c2pa-python is installed")
    retention_sweep_seconds: float = Field(
        default=300.0, gt=0, description="how often an API process runs the retention sweeper"
    )
    default_requests_per_minute: int | None = Field(default=None, ge=1, description="per tenant, unless it sets one")
    default_images_per_day: int | None = Field(default=None, ge=1)
    default_gpu_seconds_per_month: float | None = Field(default=None, gt=0)


class ServerSettings(BaseModel):
    """The API process's edge (darkroom/api/edge.py): request threads, backpressure, the body cap and the auth
    caches. Env: `DARKROOM_SERVER__MAX_IN_FLIGHT`, …"""

    request_threads: int = Field(default=40, ge=1, description="threads that run sync handlers (anyio's limiter)")
    max_in_flight: int = Field(
        default_factory=lambda: max(64, 32 * (os.cpu_count() or 1)),
        ge=1,
        description="requests handled at once; beyond it an immediate 429 `overloaded` (health probes exempt)",
    )
    admission_target_ms: float = Field(
        default=40.0,
        gt=0,
        description="while admitted requests take longer than this (90th percentile), fewer are let in "
        "(darkroom.api.admission)",
    )
    api_processes: int = Field(
        default=1,
        ge=1,
        description="processes answering the API on one socket (`serve --api-processes`); the first also runs the "
        "workers and background loops (darkroom.api.processes)",
    )
    admission_floor: int = Field(
        default=4,
        ge=1,
        description="the admission limit never shrinks below this (nor below max_in_flight, if lower); it starts at "
        "16 (darkroom.api.admission)",
    )
    overloaded_retry_after: int = Field(default=1, ge=1, description="Retry-After (s) of an `overloaded` 429")
    max_body_bytes: int | None = Field(
        default=None, ge=1, description="request body cap, counted as it streams; default: the upload limit in base64"
    )
    auth_cache_seconds: float = Field(
        default=5.0, ge=0, description="API keys and tenant policies are re-read after this (0: never cached)"
    )
    auth_failures_per_minute: int = Field(
        default=20, ge=1, description="bad API keys one client address may send a minute before it gets 429"
    )
    audited_failures_per_minute: int = Field(
        default=5, ge=1, description="failed logins audited one by one per address a minute; the rest as a summary"
    )
    ready_cache_seconds: float = Field(default=1.0, ge=0, description="how long /readyz reuses its last check")
    ready_timeout_seconds: float = Field(default=2.0, gt=0, description="/readyz gives up on the database after")
    database_retry_after: int = Field(default=5, ge=1, description="Retry-After (s) while the database is down")
    ui_session_hours: float = Field(
        default=12.0, gt=0, le=24 * 90, description="a web UI sign-in lasts this long (absolute, from sign-in)"
    )


class RecoverySettings(BaseModel):
    """How a worker rides out failures that are not the job's fault (darkroom/worker/health.py) and when a job that
    keeps breaking workers is given up. Env: `DARKROOM_RECOVERY__STORAGE_BACKOFF_SECONDS`, …"""

    fatal_backoff_seconds: float = Field(default=5.0, gt=0, description="first pause after a device failure")
    storage_backoff_seconds: float = Field(default=30.0, gt=0, description="first pause while the blob store fails")
    max_backoff_seconds: float = Field(default=600.0, gt=0, description="pauses double up to this")
    poison_after: int = Field(default=3, ge=1, description="device failures one job may cause before it is given up")
    restart_backoff_seconds: float = Field(
        default=1.0, gt=0, description="first delay before a crashed worker thread restarts; doubles per crash in a row"
    )


class PruneSettings(BaseModel):
    """What the retention sweeper deletes besides expired images (darkroom/jobs/prune.py), in bounded batches.
    `None` keeps rows forever. Env: `DARKROOM_PRUNE__FINISHED_JOBS_DAYS`, …"""

    finished_jobs_days: float | None = Field(default=90.0, gt=0, description="finished jobs (with images rows) older")
    deliveries_days: float | None = Field(default=30.0, gt=0, description="finished webhook deliveries older than")
    workers_days: float | None = Field(default=7.0, gt=0, description="stopped or lost worker rows silent longer")
    batch_size: int = Field(default=500, ge=1, description="rows per delete: one short transaction each")


class ObservabilitySettings(BaseModel):
    """Health sweeps, cost prices and tracing (darkroom/observability/). Env: `DARKROOM_OBSERVABILITY__…`."""

    health_sweep_seconds: float = Field(
        default=10.0, gt=0, description="the API process looks for lost workers, stuck jobs and low disk this often"
    )
    stuck_grace_seconds: float = Field(
        default=60.0, ge=0, description="a running job this long past its time limit (it stopped stepping) is stuck"
    )
    disk_low_bytes: int = Field(default=1 << 30, ge=0, description="free bytes in the data dir below which disk is low")
    expect_workers: bool = Field(
        default=False, description="/readyz needs a live worker in the fleet (API nodes whose workers run elsewhere)"
    )
    worker_class: str | None = Field(
        default=None, description="this worker's price class (a key of device_hour_prices); default: cpu or gpu"
    )
    device_hour_prices: dict[str, float] = Field(
        default_factory=lambda: {"cpu": 0.0, "gpu": 0.0},
        description='price of one device-hour per worker class, e.g. {"cpu": 0.0, "h100": 2.5}',
    )
    storage_gb_month_price: float = Field(default=0.0, ge=0, description="price of one stored GB for a month")
    currency: str = Field(default="USD", max_length=8)
    otlp_endpoint: str | None = Field(
        default=None, description="OTLP/HTTP traces endpoint (needs the `tracing` extra); none: no spans exported"
    )


class RemoteEngineSettings(BaseModel):
    """The backend a worker drives when `engine` is a remote one (darkroom/engines/remote_*.py). The service key (or
    password, or cloud secret) comes from the environment or a file, read when the engine starts, and is never written
    to the database. Env: `DARKROOM_REMOTE__URL`, `DARKROOM_REMOTE__API_KEY_ENV`, …"""

    url: str | None = Field(
        default=None,
        description="the remote's base URL, e.g. `https://gpu-pool.internal:8000` (openai: `https://api.openai.com/v1`)",
    )
    api_key_env: str | None = Field(default=None, description="name of the environment variable holding its key")
    api_key_file: Path | None = Field(default=None, description="a file holding its key (a mounted secret)")
    username: str | None = Field(
        default=None, description="a1111 and comfyui: Basic auth with this user name and the key as password"
    )
    model: str | None = Field(default=None, description="openai: the cloud's model name (default: the job's model)")
    price_per_image: float | None = Field(
        default=None, ge=0, description="what the remote charges per image: a job's cost in the usage report"
    )
    external: bool = Field(
        default=False,
        description="the remote runs outside this deployment (another operator's): confidential work must not reach it",
    )
    timeout_seconds: float = Field(default=30.0, gt=0, description="connect and per-request limit of each call")
    poll_seconds: float = Field(
        default=1.0,
        gt=0,
        description="how long the event stream may stay silent before cancel and time limits are checked again",
    )


DTYPE_NAMES = ("auto", "float32", "fp32", "float16", "fp16", "half", "bfloat16", "bf16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class GpuSettings(BaseModel):
    """How the local engine runs its models on the device (darkroom/engines/acceleration.py). Every switch has a safe
    default: what is on by default changes pixels by rounding at most, except VAE tiling, which only images above
    `vae_tiling_pixels` get (where decoding whole would need more memory than most GPUs have); compiling is off until
    asked for (it costs minutes at load). The weight dtype is the top-level `dtype`. Env: `DARKROOM_GPU__COMPILE`, …"""

    sdpa: bool = Field(True, description="attention through torch's scaled_dot_product_attention (AttnProcessor2_0)")
    channels_last: Literal["auto", "on", "off"] = Field(
        "auto", description="UNet and VAE in channels-last memory layout; auto: on CUDA and CPUs (not MPS)"
    )
    compile: bool = Field(False, description="torch.compile the UNet and the VAE decoder, warmed up at load")
    compile_mode: str = Field("default", description="torch.compile mode: " + ", ".join(COMPILE_MODES))
    cuda_graphs: bool = Field(False, description="with compile: replay CUDA graphs (compile mode reduce-overhead)")
    compile_sizes: list[str] = Field(
        default_factory=lambda: ["512x512", "1024x1024"],
        description="WIDTHxHEIGHT sizes that run compiled (warmed up at load); other sizes run eagerly",
    )
    compile_max_recompiles: int = Field(8, ge=1, description="shapes compiled per module before it runs eagerly")
    compile_cache_dir: Path | None = Field(None, description="inductor's on-disk cache; default <data_dir>/inductor")
    vae_slicing: bool = Field(True, description="decode a batch one image at a time (less memory, same pixels)")
    vae_tiling_pixels: int | None = Field(
        1536 * 1536, ge=1, description="decode in overlapping tiles above this many pixels per image; unset: never"
    )
    pinned_transfers: bool = Field(True, description="CUDA: copy finished images to the host through pinned memory")
    memory_headroom: float = Field(
        0.85, gt=0, le=1, description="share of free device memory a batch may fill (the batch limit per size)"
    )
    prepare_ahead: bool = Field(
        True,
        description="encode the next pass's prompts and draw its first latents while the current batch decodes "
        "(claiming the next batch at the current one's last step)",
    )
    preview_decoders: dict[str, str] = Field(
        default_factory=dict,
        description="live previews through a TAESD-style tiny autoencoder per architecture (sd1, sd2, sdxl): a "
        "diffusers AutoencoderTiny folder or one .safetensors, relative to the models folder; others approximate",
    )

    @field_validator("compile_mode")
    @classmethod
    def _mode(cls, value: str) -> str:
        if value not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {value!r}: use one of {', '.join(COMPILE_MODES)}")
        return value

    @field_validator("compile_sizes")
    @classmethod
    def _sizes(cls, value: list[str]) -> list[str]:
        for size in value:
            width, _, height = size.lower().partition("x")
            if not (width.isdigit() and height.isdigit() and int(width) % 8 == 0 and int(height) % 8 == 0):
                raise ValueError(f"{size!r} is not WIDTHxHEIGHT in multiples of 8, e.g. 512x512")
        return [size.lower() for size in value]

    @field_validator("preview_decoders")
    @classmethod
    def _preview_arches(cls, value: dict[str, str]) -> dict[str, str]:
        for arch in value:
            if arch not in ("sd1", "sd2", "sdxl"):
                raise ValueError(f"unknown architecture {arch!r} for a preview decoder: use sd1, sd2 or sdxl")
        return value

    @model_validator(mode="after")
    def _graphs_need_compile(self) -> GpuSettings:
        if self.cuda_graphs and not self.compile:
            raise ValueError("gpu.cuda_graphs needs gpu.compile (CUDA graphs are recorded by torch.compile)")
        return self

    def compile_size_set(self) -> frozenset[tuple[int, int]]:
        """`compile_sizes` as (width, height) pairs."""
        pairs = (size.split("x") for size in self.compile_sizes)
        return frozenset((int(width), int(height)) for width, height in pairs)


DataLabel = Literal["confidential", "internal", "public"]  # who may see a job's data (engines/routing.py)


class RoutingSettings(BaseModel):
    """Which jobs a worker's engine may take, and when (darkroom/engines/routing.py). Env: `DARKROOM_ROUTING__…`."""

    default_label: DataLabel = Field(
        "internal", description="a job's data label when neither its request nor its tenant's policy gives one"
    )
    external_labels: list[Literal["internal", "public"]] = Field(
        default=["public"],
        description="labels an external engine's workers may claim (confidential work never leaves the deployment)",
    )
    overflow_queue_depth: int | None = Field(
        None, ge=1, description="a remote engine's worker claims only while at least this many jobs are queued"
    )
    overflow_wait_seconds: float | None = Field(
        None, ge=0, description="… or while the next job in the queue has waited this long (either rule suffices)"
    )
    max_concurrency: int | None = Field(None, ge=1, description="jobs a process's workers run on its engine at once")
    circuit_failures: int = Field(3, ge=1, description="failed runs in a row that open the engine's circuit")
    circuit_cooldown_seconds: float = Field(30.0, gt=0, description="how long an open circuit claims nothing")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DARKROOM_", env_nested_delimiter="__", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path("darkroom-data")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default: SQLite in the data dir")
    models_dir: Path | None = Field(default=None, description="default: <data_dir>/models")
    public_url: str | None = Field(default=None, description="base URL clients use to fetch images")

    workers: int = 1
    worker_id: str | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    cpu_worker_nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="a worker process whose device is the CPU lowers its scheduling priority by this much (nice), so "
        "the API's answers on the same cores come first; 0 leaves it. A GPU's worker is left as it is: its CPU work "
        "is what keeps the device fed",
    )
    devices: list[str] = Field(
        default_factory=list,
        description="`serve`: one worker process per device (`cuda:0`, `cuda:1`, or `all` for every GPU); more "
        "workers than devices run as threads of those processes, sharing the device's engine. Empty: `workers` "
        "processes on `device`",
    )
    dtype: str = Field("auto", description="weights: auto (float16 on CUDA, else float32), float32, float16, bfloat16")
    engine: Literal["diffusers", "darkroom", "a1111", "comfyui", "openai"] = Field(
        "diffusers",
        description="what this process's workers run jobs on: `diffusers` (the local device), or a remote configured "
        "under `remote`: `darkroom` (another darkroom's API), `a1111`, `comfyui`, `openai` (an OpenAI-compatible "
        "images API)",
    )
    remote: RemoteEngineSettings = Field(default_factory=RemoteEngineSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    gpu: GpuSettings = Field(default_factory=GpuSettings)
    pipeline_cache_size: int = Field(2, description="most pipelines a worker keeps loaded")
    pipeline_cache_bytes: int | None = Field(None, description="memory budget for them; default 80% VRAM / 50% RAM")
    preload_models: list[str] = Field(default_factory=list, description="model ids a worker loads before claiming")

    lease_seconds: float = 30.0
    heartbeat_seconds: float = 5.0
    poll_seconds: float = 0.5
    idle_poll_seconds: float = Field(
        2.0, description="an idle worker's fallback tick (retry backoffs ending, expired leases); new work wakes it"
    )
    feed_check_seconds: float = Field(
        0.25,
        gt=0,
        description="SQLite: how often the change feed checks for commits that rang no doorbell (other processes "
        "ring it after each commit; where the doorbell is unavailable, the check runs at least every 15 ms)",
    )
    postprocess_workers: int = Field(
        2, ge=0, description="threads per worker for safety check, watermark, PNG, upload (0: on the device thread)"
    )
    preload_default_model: bool = Field(True, description="with no preload_models, load the default model at start")
    progress_interval: float = Field(
        0.25,
        ge=0,
        description="seconds between a running job's progress writes (0: every step); a job shorter than this "
        "writes none, its completion says the rest",
    )
    max_attempts: int = 3
    retry_backoff_seconds: float = 1.0
    job_timeout_seconds: float | None = 900.0
    drain_seconds: float = 30.0
    worker_processes: bool = Field(
        True,
        description="`darkroom serve --workers N` runs its workers as child processes (False: threads of the API "
        "process, whose denoising then holds the API's GIL)",
    )
    max_batch: int = Field(8, ge=1, description="most jobs claimed together; their images run as one tensor batch")
    batch_window_seconds: float = Field(
        0.0, ge=0, description="a worker coming straight from a batch waits this long to fill the next; never idle"
    )
    preview_every_seconds: float = 1.0
    model_check_seconds: float = 30.0
    batch_invariant: bool = Field(
        False,
        description="denoise each image alone, so pixels never depend on batching (bit-exact, slower); the default "
        "runs a batch's images as one tensor batch, each within rounding (1/255 per pixel measured) of its solo run",
    )
    tenant_weights: dict[str, float] = Field(default_factory=dict, description="fair-share weight per tenant")
    sync_timeout_seconds: float = 600.0
    create_default_model: bool = True

    limits: Limits = Field(default_factory=Limits)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)
    recovery: RecoverySettings = Field(default_factory=RecoverySettings)
    prune: PruneSettings = Field(default_factory=PruneSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    observability: ObservabilitySettings = Field(default_factory=ObservabilitySettings)
    log_format: Literal["text", "json"] = Field(
        default="text", description="text, or JSON lines with request_id, job_id, tenant, worker_id (log pipelines)"
    )

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str) -> str:
        if value.lower() not in DTYPE_NAMES:
            raise ValueError(f"unknown dtype {value!r}: use auto, float32, float16 or bfloat16")
        return value.lower()

    @property
    def inductor_cache_dir(self) -> Path:
        """Where torch.compile keeps its artefacts, so a restarted worker reuses them instead of compiling again."""
        return self.gpu.compile_cache_dir or self.data_dir / "inductor"

    @field_validator("data_dir", "models_dir", mode="after")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        """Resolved once, here: the same folder whichever folder a later step runs from."""
        return value.expanduser().resolve() if value is not None else None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, dotenv_settings, TomlFilesSource(settings_cls), file_secret_settings

    @property
    def resolved_models_dir(self) -> Path:
        return (self.models_dir or self.data_dir / "models").resolve()

    @property
    def blobs_dir(self) -> Path:
        return (self.data_dir / "blobs").resolve()

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'darkroom.db').resolve()}"
