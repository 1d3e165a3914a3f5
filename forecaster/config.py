"""Typed configuration: a TOML file plus environment variables, built once at the edge.

Precedence, highest first: keyword overrides, environment (`FORECASTER_` prefix, `__` for
nesting, e.g. `FORECASTER_SERIES__FREQ=15m`), the TOML file, the defaults below.
"""

from __future__ import annotations

import contextvars
import os
import tomllib
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from forecaster.config_light import (
    DEFAULT_DATABASE_URL,
    DEFAULT_LOG_FORMAT,
    DEFAULT_LOG_LEVEL,
    ENV_PREFIX,
    config_path,
    format_duration,
    parse_duration,
)
from forecaster.errors import ConfigError
from forecaster.masking import SecretUrl, mask_secrets, mask_url, remember_secrets, url_secrets

Duration = Annotated[timedelta, BeforeValidator(parse_duration)]


Url = Annotated[str, AfterValidator(SecretUrl)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SeriesDefaults(_Model):
    """How raw points become a regular series cut into windows."""

    freq: Duration = Field(timedelta(hours=1), description="spacing of the regular series")
    window: Duration = Field(
        timedelta(days=1), description="length of a window; a multiple of freq"
    )
    gap_policy: Literal["null", "ffill", "interpolate"] = Field(
        "null", description="what fills a missing point: nothing (null), the last value, or a line"
    )
    aggregate: Literal["mean", "sum", "last", "min", "max"] = Field(
        "mean", description="how several points in one freq bucket become one"
    )
    allowed_lateness: Duration = Field(
        timedelta(days=7), description="points older than the watermark minus this are quarantined"
    )
    auto_create: bool = Field(True, description="create unknown series on first sight")
    seasons: tuple[int, int] | None = Field(
        None,
        description="(daily, weekly) seasonal periods in steps, for series whose clock is "
        "not the calendar's: [8, 40] for eight open hours a day, five days a week; default "
        "a day and a week of freq",
    )
    max_backfill: Duration | None = Field(
        timedelta(days=731),
        description="a new series' first points older than its newest by more than this are "
        "quarantined too_late (a stray early timestamp would otherwise be gap-filled up to "
        "the rest); None = no bound",
    )

    @model_validator(mode="after")
    def _window_is_multiple_of_freq(self) -> SeriesDefaults:
        if self.freq <= timedelta(0):
            raise ValueError("freq must be positive, e.g. '1h'")
        ratio = self.window / self.freq
        if ratio < 1 or ratio != int(ratio):
            raise ValueError(
                f"window ({format_duration(self.window)}) must be a whole multiple of "
                f"freq ({format_duration(self.freq)}), e.g. window='1d' with freq='1h'"
            )
        return self

    @model_validator(mode="after")
    def _seasons_are_short_then_long(self) -> SeriesDefaults:
        if self.seasons is not None and not 1 <= self.seasons[0] <= self.seasons[1]:
            raise ValueError(
                "seasons must be [daily, weekly] periods in steps with 1 <= daily <= weekly, "
                "e.g. [8, 40]"
            )
        return self

    @property
    def points_per_window(self) -> int:
        return int(self.window / self.freq)


class _SourceBase(_Model):
    series: SeriesDefaults | None = Field(
        None, description="overrides of the [series] defaults for this source's series"
    )
    interval: Duration = Field(timedelta(minutes=5), description="how often the daemon polls it")
    batch_rows: int = Field(50_000, gt=0, description="rows per transaction")


class FileSource(_SourceBase):
    kind: Literal["file"] = "file"
    path: str = Field(description="a path or glob; CSV (.csv, .csv.gz) or Parquet (.parquet)")
    format: Literal["auto", "csv", "parquet"] = Field(
        "auto", description="file format; auto = from the file name's suffix"
    )
    ts_column: str = Field("ts", description="column holding the timestamp")
    value_column: str = Field("value", description="column holding the value")
    series_column: str | None = Field("series", description="column naming the series, if any")
    series_name: str | None = Field(None, description="series name when there is no such column")


class HttpJsonSource(_SourceBase):
    kind: Literal["http"] = "http"
    url: Url = Field(description="URL answering a JSON document of records")
    records_path: str = Field("", description="dotted path to the list of records, '' = top level")
    ts_field: str = Field("ts", description="record field holding the timestamp")
    value_field: str = Field("value", description="record field holding the value")
    series_field: str | None = Field("series", description="record field naming the series")
    series_name: str | None = Field(None, description="series name when there is no such field")
    since_param: str | None = Field(
        "since", description="query parameter carrying the watermark (ISO 8601), None to omit"
    )
    auth_header: str = Field(
        "Authorization", description="request header carrying auth_env's value"
    )
    auth_env: str | None = Field(
        None, description="name of the environment variable holding the auth header's value"
    )
    timeout: Duration = Field(
        timedelta(seconds=30),
        description="for the whole answer of a request (at most 128 MiB after decompression)",
    )


class SqlSource(_SourceBase):
    kind: Literal["sql"] = "sql"
    url: Url = Field(description="SQLAlchemy URL of the database to read")
    query: str = Field(description="SELECT with a bound :since parameter")
    ts_column: str = Field("ts", description="column holding the timestamp")
    value_column: str = Field("value", description="column holding the value")
    series_column: str | None = Field("series", description="column naming the series")
    series_name: str | None = Field(None, description="series name when there is no such column")
    start: datetime = Field(
        datetime(1970, 1, 1, tzinfo=UTC), description=":since on the very first read"
    )


class PrometheusSource(_SourceBase):
    kind: Literal["prometheus"] = "prometheus"
    url: Url = Field(description="base URL of the Prometheus server, e.g. http://127.0.0.1:9090")
    query: str = Field(description="PromQL expression; one series per label set")
    step: Duration = Field(timedelta(minutes=1), description="resolution of the range queries")
    series_label: str | None = Field(
        None, description="label whose value names the series; None = the whole label set"
    )
    lookback: Duration = Field(timedelta(hours=1), description="range read on the first query")
    max_points: int = Field(
        10_000, gt=0, description="points per range query (Prometheus caps 11k)"
    )
    timeout: Duration = Field(
        timedelta(seconds=30),
        description="for the whole answer of a request (at most 128 MiB after decompression)",
    )


class Disruption(_Model):
    """A fault injected into a replay, for a game day or an alerting test: the values of the
    matching series inside [start, end] become value * scale + offset."""

    series: list[str] = Field(description="glob patterns of the series disrupted")
    start: datetime = Field(description="first data time disrupted")
    end: datetime = Field(description="last data time disrupted (inclusive)")
    scale: float = Field(1.0, description="values are multiplied by this")
    offset: float = Field(0.0, description="then this is added")

    @model_validator(mode="after")
    def _check(self) -> Disruption:
        if self.end < self.start:
            raise ValueError("a disruption's end comes before its start")
        if self.scale == 1.0 and self.offset == 0.0:
            raise ValueError("a disruption with scale 1 and offset 0 changes nothing")
        if not self.series:
            raise ValueError('a disruption names no series (use ["*"] for all)')
        return self


class ReplaySource(_SourceBase):
    kind: Literal["replay"] = "replay"
    dataset: Literal["nycflights13"] = Field(
        "nycflights13", description="bundled dataset (pipelines/datasets/PROVENANCE.md)"
    )
    speed: float = Field(
        0.0, ge=0, description="simulated seconds per wall second; 0 = no pacing (all at once)"
    )
    series_filter: list[str] | None = Field(None, description="only these series")
    start: datetime | None = Field(None, description="first point to replay (default: all)")
    end: datetime | None = Field(None, description="last point to replay (default: all)")
    disruptions: list[Disruption] = Field(
        [], description="faults injected into the replayed values: [[sources.<name>.disruptions]]"
    )


SourceConfig = Annotated[
    FileSource | HttpJsonSource | SqlSource | PrometheusSource | ReplaySource,
    Field(discriminator="kind"),
]


def _default_sources() -> dict[str, Any]:
    return {"nycflights": ReplaySource(speed=0.0)}


class TrainingSettings(_Model):
    """Defaults of `forecaster train` (its options override them)."""

    kind: Literal["lstm", "gru", "rnn", "seq2seq"] = Field("lstm", description="model kind")
    hidden: int = Field(64, gt=0, description="hidden units per recurrent layer")
    layers: int = Field(1, gt=0, description="stacked recurrent layers")
    dropout: float = Field(0.0, ge=0, lt=1, description="between stacked layers")
    horizon: int = Field(24, gt=0, description="forecast steps")
    quantiles: tuple[float, ...] = Field(
        (0.1, 0.5, 0.9), description="quantiles forecast; the outer two make the band"
    )
    window: int | None = Field(
        None,
        gt=0,
        description="TBPTT window in steps; default a quarter of the training span, "
        "between a day and a week",
    )
    epochs: int | None = Field(
        None,
        gt=0,
        description="most epochs; default enough for about 600 gradient steps (30 to 300), "
        "so a short history still trains",
    )
    lr: float = Field(2e-3, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay")
    patience: int | None = Field(
        None,
        gt=0,
        description="epochs without validation gain before stopping; default an eighth of "
        "the epochs (at least 4)",
    )
    val_steps: int | None = Field(
        None,
        gt=0,
        description="held-out test tail per series, scored once; default 15% of each "
        "series' history (at least a horizon, at most four weeks)",
    )
    stop_steps: int | None = Field(
        None,
        gt=0,
        description="early-stopping tail before the test tail; default 10% of each "
        "series' history (at least a horizon, at most two weeks)",
    )
    refit_epochs: int | None = Field(
        None,
        ge=0,
        description="passes over the whole history, newest points included, after early "
        "stopping, so the model that serves has learnt from them; default a quarter of "
        "the chosen epochs (at least 1); 0 serves the early-stopped model",
    )
    bidirectional: bool = Field(False, description="seq2seq: within-window backward encoder")
    origin_stride: int = Field(
        8,
        gt=0,
        description="lstm/gru/rnn: take the loss from every k-th origin of a window (a "
        "random phase per window), the recurrence still over every step; 8 trains the LSTM "
        "about 4x faster than 1 (every origin), with the same accuracy on the accuracy "
        "bench's datasets",
    )
    challenger: Literal["mstl", "none"] = Field(
        "mstl",
        description="statistical challenger fitted with each version and kept as a state "
        "(MSTL: two fits, about 1 s a series, once per version), a member of each series' served "
        "blend; none: the network and the seasonal naives only",
    )
    seed: int = Field(0, description="seed of weights and batch order")

    @model_validator(mode="after")
    def _quantiles_make_a_band(self) -> TrainingSettings:
        q = list(self.quantiles)
        if q != sorted(q) or len(q) < 3 or not all(0 < x < 1 for x in q) or 0.5 not in q:
            raise ValueError(
                "quantiles must be increasing, inside (0, 1), at least 3, and include 0.5"
            )
        return self


class HttpSettings(_Model):
    """The daemon's HTTP app: /metrics, /healthz, /readyz."""

    host: str = Field("127.0.0.1", description="address to bind; 0.0.0.0 exposes it to the network")
    port: int = Field(9464, ge=0, le=65535, description="TCP port; 0 picks a free one")
    token: SecretStr | None = Field(
        None,
        description="bearer token every endpoint but /healthz then requires; set it through "
        "FORECASTER_HTTP__TOKEN rather than the file",
    )


class MetricsSettings(_Model):
    """What /metrics exposes from SQL at scrape time (bounded: series x steps x quantiles)."""

    series: list[str] = Field(["*"], description="glob patterns of the series exposed")
    max_series: int = Field(500, gt=0, description="at most this many series (by name)")
    horizon_steps: list[int] = Field(
        [1, 6, 12, 24], description="horizon steps of forecaster_forecast exposed"
    )


class ScheduleSettings(_Model):
    """When the daemon's jobs fire (UTC). Ingest runs at each source's own interval."""

    predict_interval: Duration = Field(
        timedelta(hours=1),
        description="safety net: predict also runs right after an ingest completes a window",
    )
    evaluate_interval: Duration = Field(timedelta(hours=1), description="scoring and calibration")
    retrain_cron: str | None = Field(
        "0 3 * * sun",
        description="crontab (UTC) of scheduled retraining; None = only on trigger. Name the "
        "weekday (sun, mon, ...): APScheduler 3 counts numeric weekdays from Monday = 0",
    )
    retrain_interval: Duration | None = Field(
        None,
        description="retrain every this long instead of the cron (used by replays and backtests, "
        "whose simulated time has no wall-clock cron)",
    )
    housekeeping_interval: Duration = Field(timedelta(days=1), description="retention clean-up")
    misfire_grace_time: Duration = Field(
        timedelta(minutes=10),
        description="a fire later than this is counted missed and skipped (APScheduler's default "
        "of 1 s would silently skip runs)",
    )
    workers: int = Field(2, gt=0, description="threads running jobs in the daemon")
    torch_threads: int = Field(
        1,
        gt=0,
        description="torch threads of the daemon's serving process: a predict batch gains "
        "nothing from more, and spinning threads stall when a retrain process holds the cores",
    )


class RetrainSettings(_Model):
    """The retraining policy: scheduled, and triggered when accuracy degrades."""

    enabled: bool = Field(True, description="run retraining at all (cron and triggers)")
    fine_tune: bool = Field(
        True, description="start from the champion's weights (else from scratch)"
    )
    kind: Literal["lstm", "gru", "rnn", "seq2seq"] | None = Field(
        None, description="model kind of a first model; default [training].kind"
    )
    epochs: int = Field(
        6,
        gt=0,
        description="most epochs of a retrain (a first model's too; `forecaster train` "
        "scales its epochs with the history unless [training].epochs is set)",
    )
    history: Duration = Field(timedelta(weeks=12), description="how far back a retrain reads")
    min_history: Duration = Field(
        timedelta(weeks=5), description="no model is trained before this much history is stored"
    )
    holdout: Duration = Field(
        timedelta(days=7), description="recent tail scoring challenger against champion"
    )
    min_gain: float = Field(
        0.005,
        ge=0,
        lt=1,
        description="the challenger's MASE must be this share below the champion's",
    )
    degrade_ratio: float = Field(
        1.0,
        gt=0,
        description="retrain when the champion's MAE over degrade_window exceeds the best "
        "seasonal naive's times this",
    )
    degrade_window: Duration = Field(timedelta(days=7), description="window of that comparison")
    cooldown: Duration = Field(
        timedelta(days=2), description="least time between two triggered retrains"
    )
    warmup: Duration = Field(
        timedelta(weeks=2), description="history a new model's states are built from"
    )


class AnomalySettings(_Model):
    """What the evaluate job pages on: scores, incidents and fleet-wide events (the
    [anomalies] table; forecaster.anomaly has the definitions)."""

    incidents_per_week: float = Field(
        0.5,  # forecaster.anomaly.DEFAULT_RATE (a test keeps them equal)
        gt=0,
        description="false-alarm rate you accept: incidents per series per week over the "
        "recent window; the score threshold is set to meet it",
    )
    gap: int = Field(
        2,  # forecaster.anomaly.DEFAULT_GAP
        ge=0,
        description="most normal steps inside one incident: anomalous points closer than this "
        "plus one step are one incident",
    )
    fleet_share: float = Field(
        0.4,
        gt=0,
        le=1,
        description="a fleet-wide event: at least this share of the series scored at a time "
        "inside incidents at once",
    )
    fleet_min_series: int = Field(
        3, ge=1, description="and at least this many series (a smaller fleet has no events)"
    )
    fleet_evidence: float = Field(
        6.0,  # forecaster.anomaly.FLEET_THRESHOLD
        gt=0,
        description="or where this many standard errors more series than usual sit at the "
        "same edge of their bands at once (over runs of times, as a series' evidence)",
    )
    fleet_merge: Duration = Field(
        timedelta(hours=12),
        description="fleet events less than this apart are one event (a storm paused by a "
        "night when the series are quiet anyway)",
    )


class RetentionSettings(_Model):
    """What housekeeping deletes. None keeps everything."""

    observations: Duration | None = Field(None, description="observations older than this")
    forecasts: Duration | None = Field(
        timedelta(days=90), description="forecasts whose origin's last target is older than this"
    )
    job_runs: Duration | None = Field(
        timedelta(days=30), description="job_runs rows older than this"
    )


class ComputeSettings(_Model):
    """Where jobs run: `inline` (threads of the daemon, retraining in a spawned process) or
    `ray` (the optional extra forecaster[ray]: rolling prediction fanned out over series
    shards as Ray tasks, retraining on Ray Train's TorchTrainer with DDP)."""

    backend: Literal["inline", "ray"] = Field(
        "inline", description="compute backend: inline (this machine) or ray (a Ray cluster)"
    )
    ray_address: Url | None = Field(
        None,
        description="Ray cluster to join: None starts a local one in the daemon, 'auto' joins "
        "the one `ray start --head` runs on this machine, ray://HOST:10001 a remote one",
    )
    shard_size: int = Field(
        2000, gt=0, description="series per rolling-prediction Ray task (one task per shard)"
    )
    num_cpus: float = Field(
        1.0, gt=0, description="CPUs each prediction task and Ray Train worker reserves"
    )
    num_gpus: float = Field(
        0.0,
        ge=0,
        description="GPUs each prediction task and Ray Train worker reserves; checked against "
        "the cluster's resources at start (a GPU request a cluster cannot meet would hang)",
    )
    max_retries: int = Field(
        3, ge=0, description="times Ray re-runs a prediction task whose worker died"
    )
    train_workers: int = Field(
        2, gt=0, description="Ray Train workers (DDP ranks) of a retrain, each its own series rows"
    )
    storage_path: Url | None = Field(
        None,
        description="Ray Train's run storage (a directory every node sees, or s3://...); None: "
        "Ray's default, ~/ray_results",
    )


_config_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar(
    "forecaster_config_file", default=None
)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", frozen=True
    )

    # forecaster.config_light reads these without building Settings, for the commands that
    # need no other key: a new key or value here is a test failure there until it knows.
    database_url: Url = Field(
        DEFAULT_DATABASE_URL, description="SQLAlchemy URL of the store (SQLite or PostgreSQL)"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="torch device")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        DEFAULT_LOG_LEVEL, description="least level logged"
    )
    log_format: Literal["console", "json"] = Field(
        DEFAULT_LOG_FORMAT, description="console lines, or one JSON object per line"
    )
    checkpoint_dir: str = Field("checkpoints", description="where model checkpoints are written")
    series: SeriesDefaults = Field(default_factory=SeriesDefaults)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    sources: dict[str, SourceConfig] = Field(default_factory=_default_sources)
    http: HttpSettings = Field(default_factory=HttpSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    schedule: ScheduleSettings = Field(default_factory=ScheduleSettings)
    retrain: RetrainSettings = Field(default_factory=RetrainSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    anomalies: AnomalySettings = Field(default_factory=AnomalySettings)
    compute: ComputeSettings = Field(default_factory=ComputeSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = _config_file.get()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    def series_defaults_for(self, source: str) -> SeriesDefaults:
        override = self.sources[source].series
        return override if override is not None else self.series

    # Every Settings a process holds has its secrets known to mask_secrets (the logs' last
    # processor): built here, copied, or unpickled in a retrain's own process.
    def model_post_init(self, context: Any, /) -> None:
        _remember_secrets(self)

    def __setstate__(self, state: dict[Any, Any]) -> None:
        super().__setstate__(state)
        _remember_secrets(self)

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        copied = super().model_copy(update=update, deep=deep)
        _remember_secrets(copied)
        return copied


def load_settings(config_file: Path | str | None = None, **overrides: Any) -> Settings:
    """Build the settings once. Raises ConfigError naming the bad key and how to fix it,
    never echoing a value that may be a secret.

    config_file: a TOML file; None means ./forecaster.toml when it exists."""
    path = config_path(config_file)
    token = _config_file.set(path)
    try:
        return Settings(**overrides)
    except (ValidationError, SettingsError) as exc:
        # config_reference knows each key's table and environment variable (and imports this)
        from forecaster.config_reference import config_error

        raise config_error(exc, path) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            "config_file",
            f"{path} is not valid TOML: {mask_secrets(str(exc))}",
            'Fix the syntax there: strings in double quotes (freq = "1h"), tables as [name].',
        ) from None
    except UnicodeDecodeError:
        raise ConfigError("config_file", f"{path} is not UTF-8 text", "Save it as UTF-8.") from None
    except OSError as exc:
        raise ConfigError(
            "config_file", f"{path} cannot be read: {exc.strerror}", "Check its permissions."
        ) from None
    finally:
        _config_file.reset(token)


def _remember_secrets(settings: Settings) -> None:
    raw = url_secrets(settings.database_url)
    for value in (settings.compute.ray_address, settings.compute.storage_path):
        raw += url_secrets(value) if value else []
    if settings.http.token is not None:
        raw.append(settings.http.token.get_secret_value())
    for source in settings.sources.values():
        raw += url_secrets(getattr(source, "url", ""))
        auth_env = getattr(source, "auth_env", None)
        if auth_env and os.environ.get(auth_env):
            raw.append(os.environ[auth_env])
    remember_secrets(raw)


def public_dict(settings: Settings) -> dict[str, Any]:
    """The effective settings as plain data with every secret masked, for `config show`."""
    data = settings.model_dump(mode="json")
    data["database_url"] = mask_url(settings.database_url)
    if settings.http.token is not None:
        data["http"]["token"] = "*** (set)"
    for key in ("ray_address", "storage_path"):
        if data["compute"][key]:
            data["compute"][key] = mask_url(data["compute"][key])
    for name, src in data["sources"].items():
        if "url" in src:
            src["url"] = mask_url(src["url"])
        if src.get("auth_env"):
            src["auth_env"] = f"{src['auth_env']} (value not shown)"
        data["sources"][name] = src
    return data
