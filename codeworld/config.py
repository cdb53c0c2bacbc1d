"""Typed configuration: each params.yaml section maps to a pydantic model.

An unknown key, a wrong type or a bad value fails at start with the key path and the reason,
before any stage does work.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A params file that cannot be used; the message names the file, key path and reason."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StorageConfig(Section):
    # Local path (relative to the repository) or s3://bucket/prefix.
    root: str = "data"
    # Endpoint of an S3-compatible server (moto, MinIO, ...); None means AWS itself.
    s3_endpoint_url: str | None = None

    @field_validator("root")
    @classmethod
    def _root(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        if "://" in v and not v.startswith(("s3://", "file://", "memory://")):
            raise ValueError(f"unsupported scheme in {v!r}: use a local path or s3://bucket/prefix")
        return v.rstrip("/") or "/"


class TrackingConfig(Section):
    experiment: str = "codeworld"


class StdlibSource(Section):
    """The running interpreter's standard library (its Lib directory, without site-packages)."""

    kind: Literal["stdlib"]
    name: str = "stdlib"


class DirSource(Section):
    kind: Literal["dir"]
    path: str
    name: str | None = None


class GitSource(Section):
    """A local git repository read at a pinned commit (never the work tree)."""

    kind: Literal["git"]
    path: str
    commit: str
    name: str | None = None

    @field_validator("commit")
    @classmethod
    def _commit(cls, v: str) -> str:
        if not re.fullmatch(r"[0-9a-fA-F]{7,40}", v):
            raise ValueError(f"{v!r} is not a commit hash (pin a commit, not a branch)")
        return v.lower()


class S3Source(Section):
    kind: Literal["s3"]
    url: str
    name: str | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith("s3://"):
            raise ValueError(f"{v!r} must start with s3://")
        return v


class ShardsSource(Section):
    """An existing codeworld shard dataset (a folder or prefix with manifest.json)."""

    kind: Literal["shards"]
    path: str
    name: str | None = None


class JsonlSource(Section):
    """JSON lines with at least {"id", "text"} per line."""

    kind: Literal["jsonl"]
    path: str
    name: str | None = None


Source = Annotated[
    Union[StdlibSource, DirSource, GitSource, S3Source, ShardsSource, JsonlSource],
    Field(discriminator="kind"),
]

LANGUAGES = {".py": "python", ".pyi": "python", ".c": "c", ".h": "c", ".js": "javascript",
             ".ts": "typescript", ".rs": "rust", ".go": "go", ".java": "java", ".sh": "shell",
             ".md": "markdown", ".txt": "text", ".toml": "toml", ".yaml": "yaml", ".yml": "yaml",
             ".json": "json", ".cfg": "ini", ".ini": "ini", ".rst": "rst"}


class CorpusConfig(Section):
    sources: list[Source] = Field(default_factory=lambda: [StdlibSource(kind="stdlib")])
    extensions: list[str] = Field(default_factory=lambda: [".py"])
    # Glob patterns (on the path relative to the source) that are never ingested.
    exclude: list[str] = Field(default_factory=list)
    min_bytes: int = Field(default=0, ge=0)
    max_bytes: int = Field(default=1_000_000, gt=0)
    # Candidate files per shard: fixed before filtering so each shard is an independent unit
    # of work that a killed run can resume.
    shard_files: int = Field(default=1000, gt=0)
    workers: int = Field(default=2, ge=1, le=256)

    @field_validator("extensions")
    @classmethod
    def _exts(cls, v: list[str]) -> list[str]:
        for ext in v:
            if not ext.startswith(".") or ext not in LANGUAGES:
                raise ValueError(f"{ext!r} is not a known extension (known: {sorted(LANGUAGES)})")
        return v

    @model_validator(mode="after")
    def _sizes(self) -> "CorpusConfig":
        if self.min_bytes > self.max_bytes:
            raise ValueError(f"min_bytes ({self.min_bytes}) > max_bytes ({self.max_bytes})")
        names = [s.name for s in self.sources if s.name]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate source names {sorted(dup)}: give each source its own name")
        if not self.sources:
            raise ValueError("sources is empty: list at least one source")
        return self


class DedupConfig(Section):
    ngram: int = Field(default=5, ge=1, le=32)
    num_perm: int = Field(default=256, ge=16, le=1024)
    threshold: float = Field(default=0.7, gt=0.0, le=1.0)
    bands: int = Field(default=0, ge=0)
    rows: int = Field(default=0, ge=0)
    seed: int = 42
    workers: int = Field(default=2, ge=1, le=256)

    @model_validator(mode="after")
    def _banding(self) -> "DedupConfig":
        if (self.bands == 0) != (self.rows == 0):
            raise ValueError("set both bands and rows, or neither (0 = chosen for the threshold)")
        if self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands*rows = {self.bands * self.rows} exceeds num_perm = {self.num_perm}")
        return self


class TraceLimitsConfig(Section):
    """Per program: sandbox rlimits and the tracer's own limits (CWM dropped traces over 10k
    events or 1 MB)."""

    wall_seconds: float = Field(default=0.5, gt=0)
    cpu_seconds: float = Field(default=0.5, gt=0)
    memory_mb: int = Field(default=512, ge=64)
    max_events: int = Field(default=10_000, ge=10)
    max_bytes: int = Field(default=1_000_000, ge=1000)


class RepositoryConfig(Section):
    """A repository whose own test suite is traced: a PyPI sdist pinned by version and sha256
    (fetched once), or a local source tree."""

    name: str
    version: str | None = None
    sha256: str | None = None
    path: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "RepositoryConfig":
        pypi = self.version is not None and self.sha256 is not None
        if pypi == (self.path is not None):
            raise ValueError("give either version + sha256 (a PyPI sdist) or path (a local tree)")
        if self.sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ValueError(f"sha256 {self.sha256!r} is not 64 hex digits")
        return self


DEFAULT_REPOSITORIES = [RepositoryConfig(
    name="more-itertools", version="10.5.0",
    sha256="5482bfef7849c25dc3c6dd53a6173ae4795da2a41a80faea6700d9f5846c5da6")]


class TracesConfig(Section):
    seed: int = 1234
    max_functions_per_module: int = Field(default=10, ge=1)
    max_inputs_per_function: int = Field(default=4, ge=1)
    # Cap on traced programs (0 = no cap): the embedded default stays a few minutes on 2 cores.
    max_programs: int = Field(default=6000, ge=0)
    programs_per_shard: int = Field(default=2000, ge=1)
    # Programs per forked child in the sandbox: 1 isolates every program in its own process;
    # larger batches amortise the fork (~1-4 ms here) and reach the throughput target.
    batch_size: int = Field(default=64, ge=1, le=256)
    limits: TraceLimitsConfig = TraceLimitsConfig()
    workers: int = Field(default=0, ge=0, le=256)  # 0 = every core
    # Repository level: each repository's test suite runs under the tracer in the sandbox.
    repositories: list[RepositoryConfig] = Field(default_factory=lambda: list(DEFAULT_REPOSITORIES))
    repo_max_traces: int = Field(default=500, ge=0)
    repo_max_per_function: int = Field(default=5, ge=1)
    repo_wall_seconds: float = Field(default=120.0, gt=0)


class Params(Section):
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()
    corpus: CorpusConfig = CorpusConfig()
    dedup: DedupConfig = DedupConfig()
    traces: TracesConfig = TracesConfig()


def _format(err: ValidationError, origin: str) -> str:
    lines = [f"{origin}: invalid parameters"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        got = e.get("input")
        shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
        lines.append(f"  {loc}: {e['msg']}{shown}")
    return "\n".join(lines)


def parse_params(data: object, origin: str = "params") -> Params:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: top level must be a mapping of sections, got {type(data).__name__}")
    try:
        return Params.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format(err, origin)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read params file: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return parse_params(data, str(path))
