"""Typed configuration: each params.yaml section maps to a pydantic model.

An unknown key, a wrong type or a bad value fails at start with the key path and the reason,
before any stage does work.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from codeworld.storage import endpoint_problem, storage_root


class ConfigError(ValueError):
    """A params file that cannot be used; the message names the file, key path and reason."""


class StageFailed(RuntimeError):
    """A stage that cannot go on, its message saying why and what to do (the command line
    prints it as one `error:` line, not a traceback)."""


def _admits_bool(annotation) -> bool:
    return annotation is bool or annotation is Any or any(
        _admits_bool(a) for a in get_args(annotation) if not isinstance(a, (str, int, float)))


class Section(BaseModel):
    # NaN and infinity are no setting (a NaN weight passes every `< 0` check)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, data):
        """pydantic reads `true` as 1 for a number: `steps: true` is a mistake, said so."""
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(name)
                if isinstance(value, bool) and field and not _admits_bool(field.annotation):
                    raise ValueError(f"{name}: {str(value).lower()} is a yes/no value, and "
                                     f"{name} is not a yes/no setting")
        return data


# A repository's name names its cache folder and its metric keys: a plain file name
REPO_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


def metric_key(name: str) -> str:
    """A repository's name as it appears in metric keys (`tasks_<key>`)."""
    return re.sub(r"[^A-Za-z0-9_]+", "_", name)


def _distinct_repo_names(names: list[str]) -> None:
    """Names must differ, and still differ as metric keys (a.b and a_b both give tasks_a_b)."""
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"duplicate repository names {dup}")
    keys: dict[str, str] = {}
    for n in names:
        k = metric_key(n)
        if k in keys:
            raise ValueError(f"repository names {keys[k]!r} and {n!r} give the same metric key {k!r}")
        keys[k] = n


class StorageConfig(Section):
    # Local path (a relative one is taken from the working directory: dvc.yaml and `make` run
    # from the repository root), file:///abs/path, or s3://bucket/prefix.
    root: str = "data"
    # Endpoint of an S3-compatible server (moto, MinIO, ...); None means AWS itself.
    s3_endpoint_url: str | None = None
    # With an s3:// root: this node's local folder for what must be on a local disk, the pack
    # stage's .bin/.idx that Megatron memory-maps (written here then uploaded by pack,
    # downloaded here and verified by training). Unused with a local root.
    local_cache: str = "data/cache"

    @field_validator("local_cache")
    @classmethod
    def _local_cache(cls, v: str) -> str:
        if not v.strip() or "://" in v:
            raise ValueError(f"{v!r}: must be a local folder (Megatron memory-maps its datasets)")
        return v

    @field_validator("s3_endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None and (problem := endpoint_problem(v)):
            raise ValueError(problem)
        return v

    @field_validator("root")
    @classmethod
    def _root(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        if "://" in v and not v.startswith(("s3://", "file://", "memory://")):
            raise ValueError(f"unsupported scheme in {v!r}: use a local path or s3://bucket/prefix")
        return storage_root(v).rstrip("/") or "/"


class TrackingConfig(Section):
    experiment: str = "codeworld"
    registered_model: str = "codeworld"   # MLflow registry name of the final checkpoints


class ExecutorConfig(Section):
    """Where the corpus, dedup and traces stages run their independent jobs
    (codeworld/parallel.py, codeworld/executor.py): `local` = this machine's processes (each
    stage's `workers`), `dask` = an existing Dask cluster whose scheduler is at `address`. The
    outputs are the same bytes either way, so this section is no DVC param of any stage."""

    kind: Literal["local", "dask"] = "local"
    address: str | None = None          # the Dask scheduler, e.g. tcp://127.0.0.1:8786
    retries: int = Field(default=1, ge=0, le=10)   # reruns of a failed job on the cluster
    # How long to wait for the scheduler to answer and for at least one worker to join.
    connect_seconds: float = Field(default=30.0, gt=0)

    @field_validator("address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"(tcp|tls)://(\[[0-9A-Fa-f:.]+\]|[^\s/:\[\]]+):\d{1,5}", v):
            raise ValueError(f"{v!r} is not a Dask scheduler address: use tcp://HOST:PORT "
                             f"(e.g. tcp://127.0.0.1:8786)")
        return v

    @model_validator(mode="after")
    def _needs_address(self) -> "ExecutorConfig":
        if self.kind == "dask" and self.address is None:
            raise ValueError("kind dask needs address, the Dask scheduler (e.g. "
                             "tcp://127.0.0.1:8786; `make cluster` starts one on this machine)")
        return self


class StdlibSource(Section):
    """The running interpreter's Lib directory: the standard library and, on purpose, the base
    interpreter's site-packages within it (README, "Embedded default corpus": more real code on
    every machine; a virtualenv's own packages lie elsewhere and are not read)."""

    kind: Literal["stdlib"]
    name: str = "stdlib"


def _a_path(v: str) -> str:
    # An empty path would be read as the current folder: whatever the stage runs in.
    if not v.strip():
        raise ValueError("path must not be empty")
    return v


class DirSource(Section):
    kind: Literal["dir"]
    path: str
    name: str | None = None

    _path = field_validator("path")(_a_path)


class GitSource(Section):
    """A local git repository read at a pinned commit (never the work tree)."""

    kind: Literal["git"]
    path: str
    commit: str
    name: str | None = None

    _path = field_validator("path")(_a_path)

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
        return storage_root(v)   # refuses a URL without a bucket


class ShardsSource(Section):
    """An existing codeworld shard dataset (a folder or prefix with manifest.json)."""

    kind: Literal["shards"]
    path: str
    name: str | None = None

    _path = field_validator("path")(_a_path)


class JsonlSource(Section):
    """JSON lines with at least {"id", "text"} per line."""

    kind: Literal["jsonl"]
    path: str
    name: str | None = None

    _path = field_validator("path")(_a_path)


Source = Annotated[
    Union[StdlibSource, DirSource, GitSource, S3Source, ShardsSource, JsonlSource],
    Field(discriminator="kind"),
]


def source_name(src: Source) -> str:
    """The name a source's records carry (ids `NAME/path`, `NAME/id` for JSONL and shards
    records): its `name`, else the last part of its path or URL without extension (a folder
    `src/lib` is `lib`), else its kind."""
    if src.name:
        return src.name
    where = getattr(src, "path", None) or getattr(src, "url", "")
    return PurePosixPath(where.rstrip("/")).name.split(".")[0] or src.kind


def _describe(i: int, src: Source) -> str:
    where = getattr(src, "path", None) or getattr(src, "url", None)
    return f"sources[{i}] ({src.kind}{' ' + where if where else ''})"


def _distinct_source_names(sources: list[Source]) -> None:
    """Two sources of one name would give their records the same ids and merge their counts:
    refused, naming both (a derived name collides as surely as a written one)."""
    first: dict[str, int] = {}
    for i, src in enumerate(sources):
        name = source_name(src)
        if name in first:
            j = first[name]
            raise ValueError(f"{_describe(j, sources[j])} and {_describe(i, src)} are both named "
                             f"{name!r}: give each source its own `name`")
        first[name] = i

LANGUAGES = {".py": "python", ".pyi": "python", ".c": "c", ".h": "c", ".js": "javascript",
             ".ts": "typescript", ".rs": "rust", ".go": "go", ".java": "java", ".sh": "shell",
             ".md": "markdown", ".txt": "text", ".toml": "toml", ".yaml": "yaml", ".yml": "yaml",
             ".json": "json", ".cfg": "ini", ".ini": "ini", ".rst": "rst"}


class CorpusConfig(Section):
    sources: list[Source] = Field(default_factory=lambda: [StdlibSource(kind="stdlib")])
    extensions: list[str] = Field(default_factory=lambda: [".py"])
    # Glob patterns (on the path relative to the source) that are never ingested.
    exclude: list[str] = Field(default_factory=list)
    # License labels a file may be ingested under (empty: any). A choice ("Apache-2.0 OR MIT")
    # is admitted by one listed option, a combination ("GPL AND MIT") only by all; "none" admits
    # files under no license file. Checked against the labels the corpus stage gives.
    licenses: list[str] = Field(default_factory=list)
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
        _distinct_source_names(self.sources)
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

    wall_seconds: float = Field(default=5.0, gt=0)  # far above any program's time: params.yaml
    cpu_seconds: float = Field(default=5.0, gt=0)
    memory_mb: int = Field(default=512, ge=64)
    max_events: int = Field(default=10_000, ge=10)
    max_bytes: int = Field(default=1_000_000, ge=1000)


class RepositoryConfig(Section):
    """A repository whose own test suite is traced: a PyPI sdist pinned by version and sha256
    (fetched once), or a local source tree."""

    name: str = Field(pattern=REPO_NAME)
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
    # larger batches amortise the fork and the child's copy-on-write of the server's heap
    # (~15 ms a batch here): 64 -> 256 took bench/traces.py from ~1,390 to ~1,510 traces/s.
    batch_size: int = Field(default=256, ge=1, le=256)
    # How the programs of a batch are kept apart. shared: all run in the batch's process
    # (~0.1 ms a program), but a program can change its neighbours' state (decimal's precision,
    # os.environ, cwd) and write their responses: a hostile corpus program could forge other
    # programs' traces. process: each runs in a process of its own forked from the batch's
    # (~2 ms a program; ~6x fewer traces/s, bench/traces.py): state and response pipe its own.
    # The default's programs give the same traces either way (measured, README).
    isolation: Literal["shared", "process"] = "shared"
    limits: TraceLimitsConfig = TraceLimitsConfig()
    workers: int = Field(default=0, ge=0, le=256)  # 0 = every core
    # Repository level: each repository's test suite runs under the tracer in the sandbox.
    repositories: list[RepositoryConfig] = Field(default_factory=lambda: list(DEFAULT_REPOSITORIES))
    repo_max_traces: int = Field(default=500, ge=0)   # per repository; 0: none (suites not run)
    repo_max_per_function: int = Field(default=5, ge=1)
    repo_wall_seconds: float = Field(default=120.0, gt=0)

    @field_validator("repositories")
    @classmethod
    def _repositories(cls, v: list[RepositoryConfig]) -> list[RepositoryConfig]:
        _distinct_repo_names([r.name for r in v])
        return v


class TokenizerConfig(Section):
    """Byte-level BPE trained on the deduped corpus (and the traces, so the trace format's
    common strings get merges); CWM's trace tokens and the agent tool markers are single
    special tokens."""

    vocab_size: int = Field(default=4096, ge=512, le=1_000_000)
    min_frequency: int = Field(default=2, ge=1)
    sources: list[str] = Field(default_factory=lambda: ["code", "traces"], min_length=1)  # pack sources
    # Cap on training text (characters, taken in dataset order; 0 = all): BPE's cost grows with it.
    max_chars: int = Field(default=20_000_000, ge=0)


# SFT formats: the loss on the answers only, and packable into whole-document windows.
SFT_FORMATS = frozenset({"sft_trace", "sft_output", "sft_agent"})
# Formats whose documents have tokens out of the loss: pack writes a `<name>_mask` for them.
MASKED_FORMATS = SFT_FORMATS | {"agent"}


class PackSourceConfig(Section):
    """One Megatron indexed dataset: a shard dataset rendered as token documents."""

    dataset: str                     # a stage output under the storage root, e.g. dedup
    # code / trace / agent: pre- and mid-training text. sft_trace (prompt -> frames),
    # sft_output (code + call -> return value) and sft_agent (assistant turns only): SFT tasks
    # with the loss on the answers only (stages/documents.py, prompts from codeworld/prompts.py).
    format: Literal["code", "trace", "agent", "sft_trace", "sft_output", "sft_agent"]
    # Agent trajectories: the share of environment observations masked out of the loss (CWM: 0.5).
    observation_mask: float = Field(default=0.0, ge=0.0, le=1.0)
    # Cap on tokens packed from this source, documents taken in dataset order (0 = all).
    max_tokens: int = Field(default=0, ge=0)
    # Documents longer than this (tokens, end-of-text included) are skipped and counted
    # (0 = none): an SFT task longer than the phase's context would be cut from its prompt.
    max_document_tokens: int = Field(default=0, ge=0)
    # SFT: whole documents packed into windows of this many tokens, the rest of each window
    # padded out of the loss (0 = documents end to end). Megatron cuts a source into samples
    # of the phase's seq_length: documents end to end, a task that straddles a cut is trained
    # without its prompt; windows of exactly seq_length each make one sample. A phase training
    # on such a source must have this seq_length; a longer document is skipped (too_long).
    # sft_agent: one document per assistant turn, its task and the latest messages that fit.
    window: int = Field(default=0, ge=0)
    # At most this many documents a window. Attention in a sample is causal over the whole
    # window (no mask at document ends): a task packed after another attends to it, which it
    # never does at evaluation or in RL, where its prompt is alone. 1: each task alone in its
    # window (more padding); more: fewer windows, later tasks see their neighbours.
    window_documents: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _mask(self) -> "PackSourceConfig":
        if self.observation_mask and self.format != "agent":
            raise ValueError(f"observation_mask applies to format agent only (format is "
                             f"{self.format!r}; sft_agent keeps every observation out of the loss)")
        if self.window and self.format not in SFT_FORMATS:
            raise ValueError(f"window applies to the SFT formats only (format is {self.format!r}: "
                             "text without a loss mask would learn the padding)")
        if self.window_documents > 1 and not self.window:
            raise ValueError("window_documents applies to windows only (window is 0: documents "
                             "end to end)")
        return self


class PackConfig(Section):
    sources: dict[str, PackSourceConfig] = Field(default_factory=lambda: {
        "code": PackSourceConfig(dataset="dedup", format="code"),
        "traces": PackSourceConfig(dataset="traces", format="trace")})
    # Corpus ids held out of every training source (by a hash of the id), for evaluation.
    heldout_percent: float = Field(default=5.0, ge=0.0, lt=100.0)
    seed: int = 0

    @field_validator("sources")
    @classmethod
    def _names(cls, v: dict) -> dict:
        for name in v:
            if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
                raise ValueError(f"source name {name!r}: use lowercase letters, digits and _")
        if not v:
            raise ValueError("at least one source")
        return v


class ModelConfig(Section):
    """A CWM-like decoder: RoPE, SwiGLU, RMSNorm, grouped-query attention. The vocabulary
    comes from the tokenizer stage."""

    num_layers: int = Field(default=4, ge=1)
    hidden_size: int = Field(default=256, ge=8)
    num_attention_heads: int = Field(default=8, ge=1)
    num_query_groups: int = Field(default=2, ge=1)
    ffn_hidden_size: int = Field(default=704, ge=8)
    max_position_embeddings: int = Field(default=4096, ge=16)
    rotary_base: int = Field(default=10000, ge=1)
    init_method_std: float = Field(default=0.02, gt=0)
    tie_embeddings: bool = False

    @model_validator(mode="after")
    def _shapes(self) -> "ModelConfig":
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not divisible "
                             f"by num_query_groups {self.num_query_groups}")
        head = self.hidden_size // self.num_attention_heads
        if head % 2:
            # RoPE rotates each head's dimensions in pairs: Megatron's rotary code fails deep in
            # the first forward on an odd head size, with a shape error naming no setting.
            raise ValueError(f"hidden_size {self.hidden_size} / num_attention_heads "
                             f"{self.num_attention_heads} = head size {head}, which is odd; "
                             f"rotary embeddings need an even head size")
        return self


class ParallelConfig(Section):
    """Processes per node (torchrun) and how they split the model: data parallel is what is
    left of nproc * nnodes after tensor x pipeline x context."""

    nproc: int = Field(default=1, ge=1)
    nnodes: int = Field(default=1, ge=1)
    tensor: int = Field(default=1, ge=1)
    pipeline: int = Field(default=1, ge=1)
    virtual_pipeline: int | None = Field(default=None, ge=2)
    context: int = Field(default=1, ge=1)
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    backend: Literal["auto", "gloo", "nccl"] = "auto"   # auto: nccl on GPUs, gloo on CPU

    @model_validator(mode="after")
    def _world(self) -> "ParallelConfig":
        world = self.nproc * self.nnodes
        split = self.tensor * self.pipeline * self.context
        if world % split:
            raise ValueError(f"tensor x pipeline x context = {split} does not divide the "
                             f"{world} processes (nproc x nnodes)")
        if self.sequence_parallel and self.tensor == 1:
            raise ValueError("sequence_parallel needs tensor > 1")
        if self.virtual_pipeline is not None and self.pipeline == 1:
            raise ValueError("virtual_pipeline needs pipeline > 1")
        return self


class PhaseConfig(Section):
    """One training phase (pre-train, mid-train, ...): data blend, schedule, precision."""

    blend: dict[str, float] = Field(default_factory=lambda: {"code": 1.0})  # pack source -> weight
    # What the blend's weights share out: "loss_tokens", the tokens in the loss (a source's
    # share of the training signal: SFT's answers), or "samples", Megatron's own unit (a
    # sample is seq_length tokens, in the loss or not). The same where every token is in the
    # loss; an SFT window of a short answer carries few (model/data.sample_weights).
    blend_unit: Literal["loss_tokens", "samples"] = "loss_tokens"
    init_from: str | None = None       # the phase whose final checkpoint this one starts from
    steps: int = Field(default=100, ge=1)
    seq_length: int = Field(default=128, ge=8)
    micro_batch_size: int = Field(default=4, ge=1)
    global_batch_size: int = Field(default=8, ge=1)
    lr: float = Field(default=3e-3, gt=0)
    min_lr: float = Field(default=3e-4, ge=0)
    warmup_steps: int = Field(default=10, ge=0)
    weight_decay: float = Field(default=0.1, ge=0)
    clip_grad: float = Field(default=1.0, ge=0)
    adam_beta1: float = Field(default=0.9, gt=0, lt=1)
    adam_beta2: float = Field(default=0.95, gt=0, lt=1)
    seed: int = 1234
    # auto: FP8 (Transformer Engine) on Hopper+, BF16 on other GPUs, FP32 on CPU.
    precision: Literal["auto", "fp32", "bf16", "fp8"] = "auto"
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "delayed"
    recompute: bool = False            # activation recompute (full, uniform)
    # CUDA graphs (GPU only), to take the host's kernel launches off the step: "layer" captures
    # each transformer layer (Megatron's local implementation), "full_iteration" the whole
    # forward-backward of a step (all micro-batches; the optimizer step stays eager).
    cuda_graph: Literal["none", "layer", "full_iteration"] = "none"
    save_interval: int = Field(default=50, ge=1)
    log_interval: int = Field(default=1, ge=1)
    eval_interval: int = Field(default=50, ge=1)
    eval_iters: int = Field(default=4, ge=1)

    @model_validator(mode="after")
    def _batches(self) -> "PhaseConfig":
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"global_batch_size {self.global_batch_size} is not a multiple of "
                             f"micro_batch_size {self.micro_batch_size}")
        if not self.blend or any(w <= 0 for w in self.blend.values()):
            raise ValueError("blend needs at least one source, each with a weight > 0")
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps {self.warmup_steps} must be below steps {self.steps}")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} is above lr {self.lr}")
        return self


# Training phases of PhaseConfig, in order; each is a params section. A phase's `init_from`
# names an earlier one. midtrain and sft are optional sections (None: not configured, their
# stages refuse to run), so a params file of pretrain alone stays valid.
PHASES = ("pretrain", "midtrain", "sft")


class AgentRepoConfig(Section):
    """An agent environment: a PyPI sdist pinned by version and sha256 (fetched once), a local
    git repository at a pinned commit, or a local folder (path alone)."""

    name: str = Field(pattern=REPO_NAME)
    version: str | None = None
    sha256: str | None = None
    path: str | None = None
    commit: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> "AgentRepoConfig":
        pypi = self.version is not None and self.sha256 is not None
        if pypi == (self.path is not None) or (self.version is None) != (self.sha256 is None):
            raise ValueError("give either version + sha256 (a PyPI sdist) or path "
                             "(a local git repository with commit, or a folder)")
        if self.sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ValueError(f"sha256 {self.sha256!r} is not 64 hex digits")
        if self.commit is not None and not re.fullmatch(r"[0-9a-fA-F]{7,40}", self.commit):
            raise ValueError(f"commit {self.commit!r} is not a commit hash (pin a commit, not a branch)")
        if self.commit is not None and self.path is None:
            raise ValueError("commit needs path (the local git repository)")
        return self


DEFAULT_AGENT_REPOS = [
    AgentRepoConfig(name="inflection", version="0.5.1",
                    sha256="1a29730d366e996aaacffb2f1f1cb9593dc38e2ddd30c91250c6dde09ea9b417"),
    AgentRepoConfig(name="cachetools", version="5.5.0",
                    sha256="2cc24fb4cbe39633fb7badd9db9ca6295d766d9c2995f245725a46715d050f2a"),
    AgentRepoConfig(name="parse", version="1.20.2",
                    sha256="b41d604d16503c79d81af5165155c0b20f6c8d6c559efa66b4b695c3e5a0a0ce"),
    AgentRepoConfig(name="toolz", version="0.12.1",
                    sha256="ecca342664893f177a13dac0e6b41cbd8ac25a358e5f215316d43e2100224f4d"),
    AgentRepoConfig(name="webcolors", version="24.8.0",
                    sha256="08b07af286a01bcd30d583a7acadf629583d1f79bfef27dd2c2c5c263817277d"),
]


class OpenAIPolicyConfig(Section):
    base_url: str | None = None      # e.g. http://127.0.0.1:8000/v1 (vLLM, llama.cpp server)
    model: str | None = None
    api_key_env: str | None = None   # name of the environment variable holding the key
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    max_tokens: int = Field(default=1024, ge=16)
    timeout_seconds: float = Field(default=120.0, gt=0)


class AgentConfig(Section):
    """ForagerAgent-style mutate-fix data: environments, bug synthesis, agent loop."""

    seed: int = 2025
    repositories: list[AgentRepoConfig] = Field(default_factory=lambda: list(DEFAULT_AGENT_REPOS))
    max_mutants_per_repo: int = Field(default=6, ge=1)    # mutants validated (tried) per repo
    max_tasks_per_repo: int = Field(default=1, ge=0)      # kept bugs per repo
    mutant_batch: int = Field(default=4, ge=1)            # mutants per sandbox run
    mutant_timeout_seconds: float = Field(default=30.0, gt=0)
    test_wall_seconds: float = Field(default=180.0, gt=0)  # a whole suite in the sandbox
    # whole-suite runs of each original tree: a test whose outcome differs between them is
    # flaky and never a FAIL_TO_PASS/PASS_TO_PASS label
    baseline_runs: int = Field(default=3, ge=1)
    policies: list[Literal["scripted", "openai"]] = Field(default_factory=lambda: ["scripted"])
    max_turns: int = Field(default=20, ge=2)
    max_tokens: int = Field(default=32000, ge=256)
    observation_chars: int = Field(default=4000, ge=200)
    tool_wall_seconds: float = Field(default=60.0, gt=0)
    max_workdir_mb: int = Field(default=256, ge=1)         # the working copy's quota (a tmpfs); full: the episode ends
    openai: OpenAIPolicyConfig = OpenAIPolicyConfig()
    # execution traces of each task's failing tests (repository tracer), for mid-training
    failing_traces: bool = True
    failing_traces_per_task: int = Field(default=20, ge=1)
    failing_traces_wall_seconds: float = Field(default=60.0, gt=0)
    workers: int = Field(default=2, ge=1, le=64)          # repositories worked on at once

    @model_validator(mode="after")
    def _check(self) -> "AgentConfig":
        _distinct_repo_names([r.name for r in self.repositories])
        if "openai" in self.policies and not (self.openai.base_url and self.openai.model):
            raise ValueError("policy openai needs openai.base_url and openai.model")
        if not self.policies:
            raise ValueError("policies is empty: name at least one (scripted, openai)")
        if len(set(self.policies)) != len(self.policies):
            raise ValueError(f"policies listed twice: {self.policies}")
        return self


class RLConfig(Section):
    """Phase `rl`: GRPO with verifiable rewards (model/rl.py, stages/rl.py). Each step samples
    `group_size` completions of `prompts_per_step` prompts with the policy being trained, scores
    each by running code in the sandbox (output prediction, next-frame prediction) or by the
    hidden tests of a mutate-fix task (agent episodes), and takes one policy-gradient step on
    the group-normalised advantages. Optimizer, precision and checkpoint fields mean what they
    mean in PhaseConfig. Sampling needs parallel.tensor = pipeline = context = 1 (data
    parallel only: each process samples its share of the prompts)."""

    init_from: str = "sft"             # the phase whose final checkpoint is the initial policy
    steps: int = Field(default=10, ge=1)
    prompts_per_step: int = Field(default=4, ge=1)
    group_size: int = Field(default=4, ge=2)          # completions per prompt (GRPO's G)
    temperature: float = Field(default=1.0, gt=0)     # sampling; the loss uses the same
    max_new_tokens: int = Field(default=32, ge=1)
    seq_length: int = Field(default=512, ge=16)       # prompt + completion; longer prompts unused
    micro_batch_size: int = Field(default=8, ge=1)    # sequences per forward-backward
    # Task mix: the share of each step's prompts by kind (output: a function call's return
    # value; next_frame: the next frame of its trace). Rewards come from a sandbox run.
    tasks: dict[Literal["output", "next_frame"], float] = Field(
        default_factory=lambda: {"output": 0.5, "next_frame": 0.5})
    pool_size: int = Field(default=256, ge=1)         # prompts prepared per kind (run once)
    # Mutate-fix episodes (agent stage's tasks, the model as the policy): every
    # `agent_interval` steps one task is tried `agent_group_size` times (0 = never).
    agent_interval: int = Field(default=5, ge=0)
    agent_group_size: int = Field(default=2, ge=2)
    agent_max_turns: int = Field(default=2, ge=1)
    agent_max_new_tokens: int = Field(default=32, ge=1)
    agent_seq_length: int = Field(default=1536, ge=64)   # a turn's context + its reply
    agent_observation_chars: int = Field(default=1000, ge=200)
    # KL penalty to the initial policy (k3 estimator per token); 0 = none, as in DAPO.
    kl_coef: float = Field(default=0.0, ge=0)
    advantage_eps: float = Field(default=1e-6, gt=0)  # (r - mean) / (std + eps)
    lr: float = Field(default=1e-4, gt=0)
    min_lr: float = Field(default=1e-4, ge=0)
    warmup_steps: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=0.0, ge=0)
    clip_grad: float = Field(default=1.0, ge=0)
    adam_beta1: float = Field(default=0.9, gt=0, lt=1)
    adam_beta2: float = Field(default=0.95, gt=0, lt=1)
    seed: int = 1234
    precision: Literal["auto", "fp32", "bf16", "fp8"] = "auto"
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "delayed"
    recompute: bool = False
    save_interval: int = Field(default=5, ge=1)
    log_interval: int = Field(default=1, ge=1)

    @property
    def global_batch_size(self) -> int:
        """Sequences per step of output/frame tasks: what the LR schedule counts in."""
        return self.prompts_per_step * self.group_size

    @model_validator(mode="after")
    def _check(self) -> "RLConfig":
        if not self.tasks or any(w < 0 for w in self.tasks.values()) or not any(self.tasks.values()):
            raise ValueError("tasks needs at least one kind with a weight > 0 (output, next_frame)")
        if self.max_new_tokens >= self.seq_length:
            raise ValueError(f"max_new_tokens {self.max_new_tokens} leaves no room for a prompt "
                             f"in seq_length {self.seq_length}")
        if self.agent_max_new_tokens >= self.agent_seq_length:
            raise ValueError(f"agent_max_new_tokens {self.agent_max_new_tokens} leaves no room "
                             f"in agent_seq_length {self.agent_seq_length}")
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps {self.warmup_steps} must be below steps {self.steps}")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} is above lr {self.lr}")
        return self


class EvaluateConfig(Section):
    """Stage `evaluate`: every phase checkpoint that exists, on held-out programs only
    (pack.heldout_percent / seed), the same programs for every phase."""

    # Evaluated in this order when data/checkpoints/<phase>/latest.json exists.
    phases: list[str] = Field(default_factory=lambda: ["pretrain", "midtrain", "sft", "rl"], min_length=1)
    # Held-out programs for trace and output prediction, a seeded draw among those whose
    # prompt + real trace fit max_program_tokens (short traces keep the CPU default to minutes).
    max_programs: int = Field(default=10, ge=1)
    max_program_tokens: int = Field(default=320, ge=16)
    # Generation caps: a trace prediction also stops at the real trace's length + 25% + 16
    # tokens (longer cannot match it); an output prediction at output_max_new_tokens.
    max_new_tokens: int = Field(default=512, ge=1)
    output_max_new_tokens: int = Field(default=32, ge=1)
    # Perplexity per pack source on held-out documents: window length (the same for every
    # phase, so phases compare) and tokens per source.
    ppl_seq_length: int = Field(default=128, ge=8)
    ppl_max_tokens: int = Field(default=4096, ge=0)
    seed: int = 0

    @field_validator("phases")
    @classmethod
    def _phases(cls, v: list[str]) -> list[str]:
        known = (*PHASES, "rl")
        for name in v:
            if name not in known:
                raise ValueError(f"{name!r} is not a training phase (known: {', '.join(known)})")
        if len(set(v)) != len(v):
            raise ValueError(f"phases {v} lists a phase twice")
        return v


class ExportConfig(Section):
    """Stage `export`: a phase's final checkpoint as a Hugging Face model folder (Llama layout,
    safetensors, the tokenizer), loaded back with transformers and checked against our own
    forward pass on held-out programs before it is published."""

    phase: str = "rl"         # whose latest checkpoint is exported
    # Held-out trace programs (evaluate's draw, pack.heldout_percent) whose logits and greedy
    # continuations must agree between the export and the Megatron model.
    check_programs: int = Field(default=8, ge=1)
    greedy_tokens: int = Field(default=32, ge=1)
    # Largest |logit difference| accepted (and the margin under which two greedy tokens are a
    # tie): FP32 exports agree to rounding (0 on an idle 2-core machine, 2.8e-4 beside a test
    # run: the same sums in another order; a wrong weight layout differs by 1 and more); BF16
    # ones (GPU) differ by kernels, and a BF16 step on logits near 10 is 1/16.
    tolerance_fp32: float = Field(default=1e-3, gt=0)
    tolerance_bf16: float = Field(default=0.25, gt=0)

    @field_validator("phase")
    @classmethod
    def _phase(cls, v: str) -> str:
        known = (*PHASES, "rl")
        if v not in known:
            raise ValueError(f"{v!r} is not a training phase (known: {', '.join(known)})")
        return v


class Params(Section):
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()
    executor: ExecutorConfig = ExecutorConfig()
    corpus: CorpusConfig = CorpusConfig()
    dedup: DedupConfig = DedupConfig()
    traces: TracesConfig = TracesConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    pack: PackConfig = PackConfig()
    model: ModelConfig = ModelConfig()
    parallel: ParallelConfig = ParallelConfig()
    pretrain: PhaseConfig = PhaseConfig()
    midtrain: PhaseConfig | None = None
    sft: PhaseConfig | None = None
    agent: AgentConfig = AgentConfig()
    rl: RLConfig | None = None      # optional, like midtrain and sft
    evaluate: EvaluateConfig = EvaluateConfig()
    export: ExportConfig = ExportConfig()

    @model_validator(mode="after")
    def _training_layout(self) -> "Params":
        check_training_layout(self)
        return self


def check_training_layout(p: "Params") -> None:
    """Cross-section checks, so a bad layout fails at load, before any process starts."""
    m, par = p.model, p.parallel
    if m.num_attention_heads % par.tensor or m.num_query_groups % par.tensor:
        raise ValueError(f"parallel.tensor {par.tensor} must divide model.num_attention_heads "
                         f"{m.num_attention_heads} and model.num_query_groups {m.num_query_groups}")
    if m.ffn_hidden_size % par.tensor:
        raise ValueError(f"parallel.tensor {par.tensor} must divide model.ffn_hidden_size "
                         f"{m.ffn_hidden_size}")
    chunks = par.pipeline * (par.virtual_pipeline or 1)
    if m.num_layers % chunks:
        raise ValueError(f"model.num_layers {m.num_layers} is not divisible by pipeline x "
                         f"virtual_pipeline = {chunks}")
    for src in p.tokenizer.sources:
        if src not in p.pack.sources:
            raise ValueError(f"tokenizer.sources names {src!r}, which is not a pack source "
                             f"(pack.sources: {', '.join(sorted(p.pack.sources))})")
    world = par.nproc * par.nnodes
    dp = world // (par.tensor * par.pipeline * par.context)
    for name in PHASES:
        ph = getattr(p, name, None)
        if not isinstance(ph, PhaseConfig):   # a phase not configured in this params file
            continue
        where = f"{name}"
        for src in ph.blend:
            if src not in p.pack.sources:
                raise ValueError(f"{where}.blend names {src!r}, which is not a pack source "
                                 f"(pack.sources: {', '.join(sorted(p.pack.sources))})")
            window = p.pack.sources[src].window
            if window and window != ph.seq_length:
                raise ValueError(f"{where}.blend names {src!r}, packed in windows of {window} "
                                 f"tokens (pack.sources.{src}.window), but {where}.seq_length is "
                                 f"{ph.seq_length}: samples would cut its tasks; make them equal")
        if ph.init_from is not None:
            earlier = PHASES[:PHASES.index(name)]
            if ph.init_from not in earlier:
                raise ValueError(f"{where}.init_from {ph.init_from!r} is not a phase before "
                                 f"{name} (earlier phases: {', '.join(earlier) or 'none'})")
            if getattr(p, ph.init_from, None) is None:
                raise ValueError(f"{where}.init_from {ph.init_from!r}: this params file has no "
                                 f"{ph.init_from} section")
        if ph.global_batch_size % (ph.micro_batch_size * dp):
            raise ValueError(f"{where}.global_batch_size {ph.global_batch_size} is not a multiple "
                             f"of micro_batch_size x data-parallel size = "
                             f"{ph.micro_batch_size} x {dp}")
        if ph.seq_length > m.max_position_embeddings:
            raise ValueError(f"{where}.seq_length {ph.seq_length} exceeds "
                             f"model.max_position_embeddings {m.max_position_embeddings}")
        if par.context > 1 and ph.seq_length % (2 * par.context):
            raise ValueError(f"{where}.seq_length must be divisible by 2 x parallel.context")
        _check_sequence_split(where, ph, par)
        _check_interleaved_microbatches(where, ph, par, dp)
    if p.rl is not None:
        if p.rl.init_from not in PHASES:
            raise ValueError(f"rl.init_from {p.rl.init_from!r} is not a training phase "
                             f"({', '.join(PHASES)})")
        if getattr(p, p.rl.init_from, None) is None:
            raise ValueError(f"rl.init_from {p.rl.init_from!r}: this params file has no "
                             f"{p.rl.init_from} section")
        for key in ("seq_length", "agent_seq_length")[:2 if p.rl.agent_interval else 1]:
            if getattr(p.rl, key) > m.max_position_embeddings:
                raise ValueError(f"rl.{key} {getattr(p.rl, key)} exceeds "
                                 f"model.max_position_embeddings {m.max_position_embeddings}")


def _check_sequence_split(where: str, ph: PhaseConfig, par: ParallelConfig) -> None:
    """Sequence parallel splits each context-parallel rank's part of a sequence across the
    tensor-parallel ranks: Megatron otherwise fails at the first forward, naming no setting."""
    if par.sequence_parallel and ph.seq_length % (par.context * par.tensor):
        raise ValueError(f"{where}.seq_length {ph.seq_length} is not divisible by parallel.context "
                         f"x tensor = {par.context} x {par.tensor}: parallel.sequence_parallel "
                         f"splits each sequence across the tensor-parallel ranks")


def _check_interleaved_microbatches(where: str, ph: PhaseConfig, par: ParallelConfig,
                                    dp: int) -> None:
    """Megatron's interleaved schedule (virtual_pipeline) runs micro-batches in groups of
    `pipeline`: it refuses fewer micro-batches than that, and a last group smaller than
    `pipeline` (megatron/core/pipeline_parallel/schedules.py), i.e. any count that is not a
    multiple of it. Evaluation runs the same micro-batches per step."""
    if par.virtual_pipeline is None:
        return
    micro = ph.global_batch_size // (ph.micro_batch_size * dp)
    if micro % par.pipeline:
        raise ValueError(f"{where}.global_batch_size {ph.global_batch_size} makes {micro} "
                         f"micro-batches per step (global_batch_size / (micro_batch_size x "
                         f"data-parallel size {ph.micro_batch_size} x {dp})); "
                         f"parallel.virtual_pipeline needs a multiple of parallel.pipeline "
                         f"{par.pipeline}")


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


class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's own loaders keep the last of two equal keys: a section or key written twice
    (an edit pasted below the old one) would silently drop the first, so it is refused."""

    def construct_mapping(self, node, deep=False):
        first: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in first:
                raise _DuplicateKey(f"line {line}: key {key!r} is given twice (first at line "
                                    f"{first[key]}); only one of them can hold")
            first[key] = line
        return super().construct_mapping(node, deep)


def read_yaml(path: Path, what: str) -> object:
    """A params-like YAML file; any failure is a ConfigError naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read {what}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text: {err}") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except _DuplicateKey as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None


# Where dvc.yaml names the storage root's datasets: data/NAME (the data itself, or with the root
# elsewhere a pinned copy of its manifest, shards.pin_manifest).
DVC_DATA = "data"


def _dvc_deps(dvc_yaml: Path, stages: object, stage: str) -> list[str] | None:
    """The deps of `stage` as normalised relative paths; None when dvc.yaml has no such stage."""
    spec = stages.get(stage) if isinstance(stages, dict) else None
    if spec is None:
        return None
    deps = spec.get("deps") if isinstance(spec, dict) else None
    if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
        raise ConfigError(f"{dvc_yaml}: stages.{stage}.deps must be a list of paths")
    return [posixpath.normpath(d) for d in deps]


def check_dvc_deps(params: Params, dvc_yaml: Path, origin: str = "params") -> None:
    """Every dataset pack (and the tokenizer) reads must be a dep of its stage in dvc.yaml
    (data/DATASET or a folder above it): a misspelt dataset then fails here rather than after
    the stages before pack ran, and a dataset missing from the deps would be read without DVC
    tracking it (`dvc repro` would not rerun the stage when that data changes)."""
    stages = (read_yaml(dvc_yaml, "pipeline file") or {})
    stages = stages.get("stages") if isinstance(stages, dict) else None
    readers = {"pack": list(params.pack.sources), "tokenizer": list(params.tokenizer.sources)}
    for stage, names in readers.items():
        deps = _dvc_deps(dvc_yaml, stages, stage)
        if deps is None:   # a pipeline without this stage: nothing runs it under DVC
            continue
        for name in names:
            dataset = params.pack.sources[name].dataset
            wanted = posixpath.normpath(posixpath.join(DVC_DATA, dataset))
            covered = [d for d in deps if wanted == d or wanted.startswith(d.rstrip("/") + "/")]
            if not covered:
                data_deps = [d for d in deps if d == DVC_DATA or d.startswith(DVC_DATA + "/")]
                raise ConfigError(
                    f"{origin}: pack.sources.{name}.dataset {dataset!r}: {wanted} is not a dep "
                    f"of stage {stage} in {dvc_yaml} (its data deps: {', '.join(data_deps) or 'none'}): "
                    f"a misspelt dataset, or add {wanted} to the stage's deps so that dvc repro "
                    f"reruns {stage} when it changes")


def load_params(path: str | Path = "params.yaml") -> Params:
    """params.yaml validated; with a dvc.yaml beside it (the pipeline's), also checked against
    that pipeline's deps (check_dvc_deps)."""
    path = Path(path)
    params = parse_params(read_yaml(path, "params file"), str(path))
    if (dvc_yaml := path.parent / "dvc.yaml").exists():
        check_dvc_deps(params, dvc_yaml, str(path))
    return params
