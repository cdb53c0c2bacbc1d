import pytest

from codeworld.config import ConfigError, load_params, parse_params


def test_defaults_are_the_embedded_pipeline():
    p = parse_params({})
    assert p.corpus.sources[0].kind == "stdlib"
    assert (p.dedup.ngram, p.dedup.num_perm, p.dedup.threshold) == (5, 256, 0.7)


def test_repo_params_file_is_valid():
    p = load_params("params.yaml")
    assert p.storage.root == "data"


@pytest.mark.parametrize("data, needle", [
    ({"dedup": {"treshold": 0.7}}, "dedup.treshold: Extra inputs are not permitted"),
    ({"dedup": {"num_perm": "many"}}, "dedup.num_perm: Input should be a valid integer"),
    ({"dedup": {"threshold": 1.5}}, "dedup.threshold: Input should be less than or equal to 1"),
    ({"corpus": {"extensions": ["py"]}}, "corpus.extensions: Value error, 'py' is not a known extension"),
    ({"corpus": {"sources": [{"kind": "git", "path": "x", "commit": "main"}]}},
     "is not a commit hash"),
    ({"corpus": {"sources": [{"kind": "dir"}]}}, "corpus.sources.0.dir.path: Field required"),
    ({"corpus": {"sources": [{"kind": "ftp", "path": "x"}]}}, "corpus.sources.0"),
    ({"storage": {"root": "gs://bucket"}}, "storage.root"),
    ({"corpus": {"min_bytes": 10, "max_bytes": 5}}, "min_bytes (10) > max_bytes (5)"),
    ({"dedup": {"bands": 30, "rows": 10}}, "bands*rows = 300 exceeds num_perm = 256"),
    ({"nonsense": {}}, "nonsense: Extra inputs are not permitted"),
])
def test_bad_params_name_the_key_and_reason(data, needle):
    with pytest.raises(ConfigError) as err:
        parse_params(data, "params.yaml")
    assert str(err.value).startswith("params.yaml: invalid parameters")
    assert needle in str(err.value)


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read params file"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("corpus: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_params(bad)
    twice = tmp_path / "twice.yaml"   # YAML itself would keep the last 'traces' silently
    twice.write_text("traces:\n  seed: 1\n  max_programs: 10\ncorpus: {}\ntraces:\n  seed: 2\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: line 5: key 'traces' is given twice \(first at line 1\)"):
        load_params(twice)
    twice.write_text("traces:\n  seed: 1\n  seed: 2\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: line 3: key 'seed' is given twice \(first at line 2\)"):
        load_params(twice)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_params(listy)


@pytest.mark.parametrize("data, needle", [
    ({"rl": {"tasks": {"output": float("nan"), "next_frame": 1}}}, "rl.tasks.output: Input should be a finite number"),
    ({"traces": {"limits": {"wall_seconds": float("inf")}}}, "traces.limits.wall_seconds: Input should be a finite"),
    ({"evaluate": {"phases": []}}, "evaluate.phases: List should have at least 1 item"),
    ({"agent": {"repositories": [{"name": "../../x", "path": "/tmp"}]}}, "agent.repositories.0.name: String should match"),
    ({"agent": {"repositories": [{"name": "a.b", "path": "/a"}, {"name": "a_b", "path": "/b"}]}},
     "repository names 'a.b' and 'a_b' give the same metric key 'a_b'"),
    ({"traces": {"repositories": [{"name": "r", "path": "/a"}, {"name": "r", "path": "/b"}]}},
     "traces.repositories: Value error, duplicate repository names ['r']"),
    # pydantic's lax mode read `true` as 1 and `false` as 0.0
    ({"pretrain": {"steps": True}}, "pretrain: Value error, steps: true is a yes/no value, and steps "
                                    "is not a yes/no setting"),
    ({"traces": {"limits": {"wall_seconds": False}}}, "wall_seconds: false is a yes/no value"),
])
def test_values_no_stage_can_use_are_refused_naming_the_key(data, needle):
    # each was accepted, then failed deep in a stage (NaN weights after the sandbox work, an
    # empty phase list on its first index) or clashed (cache folders, metric keys)
    with pytest.raises(ConfigError) as err:
        parse_params(data, "p.yaml")
    assert needle in str(err.value)


VP = {"model": {"num_layers": 4}, "parallel": {"nproc": 2, "pipeline": 2, "virtual_pipeline": 2}}


@pytest.mark.parametrize("data, needle", [
    # RoPE rotates pairs of a head's dimensions: Megatron failed on a shape in its first forward
    ({"model": {"hidden_size": 72, "num_attention_heads": 8}},
     "model: Value error, hidden_size 72 / num_attention_heads 8 = head size 9, which is odd"),
    # sequence parallel splits each sequence over the TP ranks: Megatron failed at the first
    # forward naming no setting
    ({"parallel": {"nproc": 2, "tensor": 2, "sequence_parallel": True},
      "pretrain": {"seq_length": 129}},
     "pretrain.seq_length 129 is not divisible by parallel.context x tensor = 1 x 2"),
    # the interleaved schedule takes micro-batches in groups of `pipeline`: fewer (1 of 2), or
    # a last group smaller (3 = 2 + 1), and Megatron refuses the first step
    ({**VP, "pretrain": {"micro_batch_size": 4, "global_batch_size": 4}},
     "pretrain.global_batch_size 4 makes 1 micro-batches per step (global_batch_size / "
     "(micro_batch_size x data-parallel size 4 x 1)); parallel.virtual_pipeline needs a multiple "
     "of parallel.pipeline 2"),
    ({**VP, "pretrain": {"micro_batch_size": 4, "global_batch_size": 12}},
     "pretrain.global_batch_size 12 makes 3 micro-batches"),
])
def test_layouts_megatron_would_refuse_mid_run_fail_at_load(data, needle):
    with pytest.raises(ConfigError) as err:
        parse_params(data, "p.yaml")
    assert needle in str(err.value)


def test_layouts_that_split_evenly_pass():
    sp = parse_params({"parallel": {"nproc": 4, "tensor": 2, "context": 2, "sequence_parallel": True},
                       "pretrain": {"seq_length": 132}})     # 132 / 2 = 66 per context rank, 33 per TP rank
    assert sp.parallel.sequence_parallel
    vp = parse_params({**VP, "pretrain": {"micro_batch_size": 2, "global_batch_size": 8}})
    assert vp.pretrain.global_batch_size == 8                 # 4 micro-batches: two groups of 2
    assert parse_params({"model": {"hidden_size": 80, "num_attention_heads": 8}}).model.hidden_size == 80


@pytest.mark.parametrize("sources, needle", [
    # two folders of one basename: their records got the same ids `lib/...`
    ([{"kind": "dir", "path": "a/lib"}, {"kind": "dir", "path": "b/lib"}],
     "sources[0] (dir a/lib) and sources[1] (dir b/lib) are both named 'lib'"),
    ([{"kind": "dir", "path": "x/stdlib"}, {"kind": "stdlib"}],
     "sources[0] (dir x/stdlib) and sources[1] (stdlib) are both named 'stdlib'"),
    ([{"kind": "jsonl", "path": "in.jsonl"}, {"kind": "dir", "path": "q", "name": "in"}],
     "sources[0] (jsonl in.jsonl) and sources[1] (dir q) are both named 'in'"),
    ([{"kind": "dir", "path": ""}], "corpus.sources.0.dir.path: Value error, path must not be empty"),
    ([{"kind": "dir", "path": "  "}], "path must not be empty"),
])
def test_sources_that_collide_or_name_no_folder_are_refused(sources, needle):
    with pytest.raises(ConfigError) as err:
        parse_params({"corpus": {"sources": sources}}, "p.yaml")
    assert needle in str(err.value)


def test_distinct_derived_source_names_pass():
    p = parse_params({"corpus": {"sources": [{"kind": "dir", "path": "a/lib"},
                                             {"kind": "dir", "path": "b/lib", "name": "lib2"}]}})
    assert [s.path for s in p.corpus.sources] == ["a/lib", "b/lib"]


@pytest.mark.parametrize("root, needle", [
    ("memory://x", "memory:// is not a storage root"),
    ("s3://", "an s3:// URL needs a bucket"),
    ("s3:///prefix", "an s3:// URL needs a bucket"),
    ("file://relative/x", "a file:// URL needs an absolute path"),
])
def test_storage_roots_that_would_lose_or_misplace_data_are_refused(root, needle):
    with pytest.raises(ConfigError) as err:
        parse_params({"storage": {"root": root}}, "p.yaml")
    assert "storage.root" in str(err.value) and needle in str(err.value)


def test_a_file_url_root_is_its_local_path(tmp_path):
    from codeworld.storage import Storage, StorageError

    assert parse_params({"storage": {"root": f"file://{tmp_path}/data/"}}).storage.root == f"{tmp_path}/data"
    store = Storage(f"file://{tmp_path}/data")
    store.write_bytes("a/b.txt", b"x")   # was written under ./file:/...
    assert (tmp_path / "data" / "a" / "b.txt").read_bytes() == b"x" and store.root == f"{tmp_path}/data"
    for bad in ("memory://x", "s3://"):
        with pytest.raises(StorageError, match="memory://|needs a bucket"):
            Storage(bad)


@pytest.mark.parametrize("endpoint", ["localhost:9000", "127.0.0.1:9000", "ftp://127.0.0.1:9000",
                                      "http://"])
def test_an_s3_endpoint_botocore_cannot_use_is_refused_naming_the_key(endpoint):
    """Accepted before, then the stage died in a traceback at its first S3 call
    (aiobotocore: `ValueError: Invalid endpoint: localhost:9000`)."""
    with pytest.raises(ConfigError) as err:
        parse_params({"storage": {"root": "s3://b/p", "s3_endpoint_url": endpoint}}, "p.yaml")
    assert "storage.s3_endpoint_url" in str(err.value) and "http://HOST:PORT" in str(err.value)


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:9000", "https://s3.example.com",
                                      "http://[::1]:9000", "http://minio:9000/"])
def test_s3_endpoints_botocore_takes_pass(endpoint):
    assert parse_params({"storage": {"s3_endpoint_url": endpoint}}).storage.s3_endpoint_url == endpoint


def test_an_s3_endpoint_from_the_environment_botocore_cannot_use_is_named(monkeypatch):
    from codeworld.storage import Storage, StorageError

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "localhost:9000")
    with pytest.raises(StorageError, match="AWS_ENDPOINT_URL_S3.*localhost:9000.*http://HOST:PORT"):
        Storage("s3://b/p").exists("x")


def _pipeline_copy(tmp_path, params_edit=None, dvc_edit=None):
    """The repository's params.yaml and dvc.yaml side by side in tmp_path, each optionally
    edited as text; the params file's path."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    params, dvc = (root / "params.yaml").read_text(), (root / "dvc.yaml").read_text()
    (tmp_path / "params.yaml").write_text(params_edit(params) if params_edit else params)
    (tmp_path / "dvc.yaml").write_text(dvc_edit(dvc) if dvc_edit else dvc)
    return tmp_path / "params.yaml"


def test_the_repository_pack_datasets_are_deps_of_pack_and_tokenizer(tmp_path):
    p = load_params(_pipeline_copy(tmp_path))
    assert p.pack.sources["agent"].dataset == "agent/trajectories"   # covered by data/agent


def test_a_misspelt_pack_dataset_fails_at_load_naming_field_value_and_dep(tmp_path):
    path = _pipeline_copy(tmp_path, params_edit=lambda t: t.replace(
        "traces_short: {dataset: traces,", "traces_short: {dataset: tarces,"))
    with pytest.raises(ConfigError) as err:
        load_params(path)
    msg = str(err.value)
    assert "pack.sources.traces_short.dataset 'tarces'" in msg
    assert f"data/tarces is not a dep of stage pack in {tmp_path / 'dvc.yaml'}" in msg


def test_a_pack_dataset_missing_from_the_stage_deps_fails_at_load(tmp_path):
    """pack reads data/agent's datasets: without data/agent in its deps, DVC would not rerun
    pack when the agent stage's output changes."""
    path = _pipeline_copy(tmp_path, dvc_edit=lambda t: t.replace(
        "      - data/traces\n      - data/agent\n", "      - data/traces\n", 1))
    with pytest.raises(ConfigError) as err:
        load_params(path)
    msg = str(err.value)
    assert "pack.sources.agent.dataset 'agent/trajectories': data/agent/trajectories is not a " \
           "dep of stage pack" in msg
    assert "data deps: data/tokenizer, data/dedup, data/traces)" in msg


def test_a_tokenizer_source_whose_dataset_is_not_a_tokenizer_dep_fails_at_load(tmp_path):
    path = _pipeline_copy(tmp_path, params_edit=lambda t: t.replace(
        "sources: [code, traces]   #", "sources: [code, traces, agent]   #"))
    with pytest.raises(ConfigError, match=r"pack.sources.agent.dataset 'agent/trajectories': "
                                          r"data/agent/trajectories is not a dep of stage tokenizer"):
        load_params(path)
