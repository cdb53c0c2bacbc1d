"""Stages `tokenizer` and `pack` on a small real setup (tests/train_fixtures.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from codeworld.config import ConfigError, parse_params
from codeworld.split import corpus_id, heldout
from codeworld.storage import Storage
from codeworld.tokens import EOD_ID, SPECIAL_TOKENS, TRACE_TOKENS, encode
from stages import tokenizer as tokenizer_stage
from stages.documents import render, text_of
from tests.train_fixtures import (agent_records, build_training_root, code_records,
                                  pack_manifest, tiny_params, trace_records)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-data")
    build_training_root(root)
    return root


@pytest.fixture(scope="module")
def tok(root):
    return tokenizer_stage.load(Storage(str(root)))


def test_special_tokens_are_single_ids_in_fixed_order(tok):
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.encode(t).ids == [i]
    trace = trace_records(1)[0]["trace"]
    ids = tok.encode(trace).ids
    assert ids.count(tok.token_to_id("<|frame_sep|>")) == trace.count("<|frame_sep|>")
    assert tok.encode("<tool: bash>\nls\n</tool>").ids[0] == tok.token_to_id("<tool: bash>")


def test_no_learnt_token_spans_markup(tok):
    """Encoding splits special tokens out first, so a learnt token holding part of one (a
    merge such as '"}<|' out of the traces' text) is a vocabulary slot no encoding uses: the
    trainer sees the documents cut at their markup."""
    learnt = [t for t, i in tok.get_vocab().items() if i >= len(SPECIAL_TOKENS)]
    assert len(learnt) > 300
    assert not [t for t in learnt if "<|" in t or "|>" in t or "tool>" in t]


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=200)
       | st.lists(st.sampled_from([*TRACE_TOKENS, "x = 1\n", "  ", "é", "\x00", "🙂"])).map("".join))
def test_every_text_round_trips(tok, text):
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text


def test_tokenizer_is_byte_identical_when_retrained(root, tmp_path):
    from tests.train_fixtures import build_training_root as build

    again = tmp_path / "again"
    again.mkdir()
    build(again)
    a = (root / "tokenizer" / "tokenizer.json").read_bytes()
    b = (again / "tokenizer" / "tokenizer.json").read_bytes()
    assert a == b
    # and pack's outputs too: same params and data, same bytes
    for name in ("code.bin", "code.idx", "agent_mask.bin"):
        assert (root / "pack" / name).read_bytes() == (again / "pack" / name).read_bytes()


def test_pack_writes_megatron_datasets_that_decode_to_the_documents(root, tok):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    manifest = pack_manifest(root)
    assert manifest["vocab_size"] == tok.get_vocab_size()
    code = IndexedDataset(str(root / "pack" / "code"))
    kept = [r for r in code_records() if not heldout(r["id"], 10.0, 0)]
    assert len(code) == len(kept) == manifest["sources"]["code"]["documents"]
    for i in (0, len(kept) // 2, len(kept) - 1):
        ids = code[i].tolist()
        assert ids[-1] == EOD_ID
        assert tok.decode(ids[:-1], skip_special_tokens=False) == kept[i]["text"]
    assert code[0].dtype == np.uint16


def test_heldout_ids_never_reach_training_data(root):
    meta = pack_manifest(root)["sources"]
    assert meta["code"]["heldout"] + meta["code"]["documents"] == len(code_records())
    assert meta["code"]["heldout"] > 0  # 10% of ~80 files
    ids = {corpus_id(r) for r in trace_records()}
    held = {i for i in ids if heldout(i, 10.0, 0)}
    assert meta["traces"]["heldout"] == len(held) > 0


def test_a_broken_record_is_counted_not_fatal(root):
    meta = pack_manifest(root)["sources"]["traces"]
    assert meta["broken"] == 1
    assert "field 'trace' is int" in next(iter(meta["broken_reasons"]))


def test_agent_observations_are_masked_at_the_configured_share(root, tok):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokens = IndexedDataset(str(root / "pack" / "agent"))
    masks = IndexedDataset(str(root / "pack" / "agent_mask"))
    assert len(tokens) == len(masks) > 0
    result = tok.token_to_id("<|tool_result|>")
    masked_obs = total_obs = 0
    for i in range(len(tokens)):
        ids, mask = tokens[i].tolist(), masks[i].tolist()
        assert len(ids) == len(mask)
        for j, t in enumerate(ids):
            if t == result:
                total_obs += 1
                masked_obs += mask[j] == 0
            if t == tok.token_to_id("<|assistant|>"):
                assert mask[j] == 1  # the agent's own turns are always in the loss
    assert total_obs > 100 and 0.35 < masked_obs / total_obs < 0.65
    # the rendering agrees with the stored mask: loss tokens = tokens of kept segments + EOD
    rec = [r for r in agent_records() if not heldout(corpus_id(r), 10.0, 0)][0]
    segs = render(rec, "agent", observation_mask=0.5, seed=0)
    want = sum(len(encode(tok, t)) for t, keep in segs if keep) + 1
    assert sum(masks[0].tolist()) == want


def test_masked_dataset_applies_the_pack_mask(root):
    import torch

    from model.data import build_datasets

    if not torch.distributed.is_initialized():  # Megatron's builder asks for the rank
        torch.distributed.init_process_group(
            "gloo", store=torch.distributed.FileStore(str(root / "pg-store"), 1), rank=0,
            world_size=1)
    manifest = pack_manifest(root)
    train, _ = build_datasets(root / "pack", {"agent": 1.0}, 32, 7, 16, 2,
                              manifest["vocab_size"], root / ".work" / "idx-test")
    zeros = sum(int((train[i]["loss_mask"] == 0).sum()) for i in range(16))
    assert zeros > 0
    sample = train[0]
    assert sample["tokens"].shape == sample["loss_mask"].shape == torch.Size([32])


def test_data_indices_are_built_once_per_cache_and_a_broken_cache_is_rebuilt(root, tmp_path,
                                                                             monkeypatch):
    """build_datasets builds Megatron's indices into its cache folder without any process
    group (as model/train.py calls it, before its own), lists them in a record, reuses them
    while all are whole, and builds again when one was cut or removed. A folder it cannot
    write, or a training group of several ranks already started, is a named error."""
    import torch

    from model import data

    manifest = pack_manifest(root)
    args = (root / "pack", {"code": 1.0, "traces": 0.5}, 32, 3, 16, 4, manifest["vocab_size"])
    cache = tmp_path / "idx"
    if torch.distributed.is_initialized():   # another test's world-1 group: not this path
        torch.distributed.destroy_process_group()
    train, valid = data.build_datasets(*args, cache)
    assert not torch.distributed.is_initialized()   # the builder's own group is gone
    first = [train[i]["tokens"].tolist() for i in range(16)]
    (record,) = cache.glob("*.json")
    files = json.loads(record.read_text())["files"]
    assert len(files) > 10 and all((cache / n).stat().st_size == size for n, size in files.items())
    assert sorted(p.name for p in cache.iterdir()) == sorted([*files, record.name, ".build.lock"])
    stamps = {n: (cache / n).stat().st_mtime_ns for n in files}
    data.build_datasets(*args, cache)
    assert {n: (cache / n).stat().st_mtime_ns for n in files} == stamps   # read, not rebuilt
    shuffle = next(n for n in files if n.endswith("shuffle_index.npy"))
    (cache / shuffle).write_bytes((cache / shuffle).read_bytes()[:-4])   # a cut file
    rebuilt, _ = data.build_datasets(*args, cache)
    assert (cache / shuffle).stat().st_size == files[shuffle]
    assert [rebuilt[i]["tokens"].tolist() for i in range(16)] == first
    (cache / shuffle).unlink()
    data.build_datasets(*args, cache)
    assert (cache / shuffle).stat().st_size == files[shuffle]
    assert not [p for p in cache.iterdir() if p.name.startswith(".build-")]

    # the disk fills up while Megatron writes: named, nothing half written is left
    real_save = np.save

    def full_disk(path, *a, **k):
        if str(path).endswith("sample_index.npy"):
            raise OSError(28, "No space left on device")
        return real_save(path, *a, **k)

    monkeypatch.setattr(np, "save", full_disk)
    with pytest.raises(data.IndexCacheError, match=rf"{tmp_path}/full: cannot build Megatron's "
                       r"data indices there \(OSError: \[Errno 28\] No space left on device\)"):
        data.build_datasets(*args, tmp_path / "full")
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == [".build.lock"]
    assert not torch.distributed.is_initialized()
    monkeypatch.undo()
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with pytest.raises(data.IndexCacheError,
                       match=rf"{blocked}/idx: cannot build Megatron's data indices"):
        data.build_datasets(*args, blocked / "idx")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    with pytest.raises(data.IndexCacheError, match="before the training's process group"):
        data.ensure_index_cache(tmp_path / "late", "key", lambda path_to_cache: None)


def test_a_blend_or_tokenizer_naming_a_missing_source_fails_at_load(root):
    bad = tiny_params(root, pretrain={"blend": {"nope": 1.0}})
    with pytest.raises(ConfigError, match="pretrain.blend names 'nope'"):
        parse_params(bad)
    bad = tiny_params(root, tokenizer={"sources": ["code", "missing"]})
    with pytest.raises(ConfigError, match="tokenizer.sources names 'missing'"):
        parse_params(bad)


def test_text_of_a_trace_record_is_prompt_then_frames():
    r = trace_records(1)[0]
    assert text_of(render(r, "trace")) == r["prompt"] + r["trace"]
    repo = {"trace": "<|call_sep|>{}<|action_sep|>def g():\n<|frame_sep|>", "prompt": None}
    assert text_of(render(repo, "trace")) == repo["trace"]
    assert json.dumps(render(r, "code") if "text" in r else []) == "[]"


def test_a_pack_killed_while_replacing_sources_is_not_left_looking_finished(root, tmp_path,
                                                                            monkeypatch):
    """A rerun with other params replaces the pack's files source by source: from the first
    replaced file until the last, the old manifest must not stand (training reads it)."""
    import shutil

    from codeworld.config import load_params
    from stages import pack as pack_stage
    from tests.train_fixtures import write_yaml

    work = tmp_path / "root"
    shutil.copytree(root, work)
    params = tiny_params(work)
    params["pack"]["heldout_percent"] = 20.0          # every source's documents change
    params = load_params(write_yaml(work / "params.yaml", params))
    real, built = pack_stage.pack_source, []

    def killed_after_one(name, *args, **kwargs):
        if built:
            raise KeyboardInterrupt("killed")
        built.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(pack_stage, "pack_source", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        pack_stage.run(params, track=False, metrics_path=None)
    assert built and not (work / "pack" / "manifest.json").exists()
    monkeypatch.setattr(pack_stage, "pack_source", real)
    manifest = pack_stage.run(params, track=False, metrics_path=None)
    assert json.loads((work / "pack" / "manifest.json").read_text()) == manifest


def test_a_record_that_is_no_object_is_counted_broken():
    from types import SimpleNamespace

    from codeworld.config import PackSourceConfig
    from stages.pack import _documents

    src = PackSourceConfig(dataset="dedup", format="code")
    params = SimpleNamespace(pack=SimpleNamespace(heldout_percent=0.0, seed=0))
    counts = {"broken": 0, "heldout": 0}
    records = [["a", "list"], {"id": "m.py", "text": "x = 1\n"}, "text"]
    docs = [d for batch in _documents(records, src, params, counts) for d in batch]
    assert docs == [[("x = 1\n", True)]]   # the object is kept; corpus_id crashed on the list
    assert counts["broken"] == 2 and set(counts["broken_reasons"]) == {
        "a record that is a JSON list, not an object", "a record that is a JSON str, not an object"}


def test_the_tokenizer_and_evaluation_count_a_record_that_is_no_object():
    from types import SimpleNamespace

    from stages.documents import object_records
    from stages.tokenizer import training_texts

    params = SimpleNamespace(
        tokenizer=SimpleNamespace(max_chars=0),
        pack=SimpleNamespace(heldout_percent=0.0, seed=0, sources={
            "dedup": SimpleNamespace(format="code")}))
    counts = {"documents": 0, "chars": 0, "heldout": 0, "broken": 0}
    records = [["a", "list"], {"id": "m.py", "text": "x = 1\n"}, 7]
    assert list(training_texts(params, {"dedup": records}, counts)) == ["x = 1\n"]
    assert counts["broken"] == 2 and counts["documents"] == 1
    counts = {}   # evaluation's two readers go through the same filter
    assert list(object_records(records, counts, "skipped_broken")) == [records[1]]
    assert counts == {"skipped_broken": 2}


def test_an_output_task_with_a_field_of_the_wrong_type_is_broken_not_missing():
    from stages.documents import DocumentError, NotATask, render

    ok = {"id": "a", "status": "ok", "code": "def f():\n    return 1\n", "call": "f()",
          "result": "1"}
    assert render(ok, "sft_output")
    with pytest.raises(DocumentError, match="field 'result' is int, expected str") as err:
        render({**ok, "result": 1}, "sft_output")
    assert not isinstance(err.value, NotATask)
    with pytest.raises(NotATask, match="a repository trace"):   # no code, no call: no task
        render({"id": "b", "status": "ok", "result": "1"}, "sft_output")


def test_an_output_the_tracer_cut_short_is_no_sft_answer():
    # RL and evaluation never ask for a cut repr (no program prints "'aaa...<truncated>"):
    # SFT teaching it as the answer would train the model to write the mark instead.
    from stages.documents import NotATask, render
    from stages.tracer.reprs import truncate

    cut = truncate(repr("a" * 5000))
    record = {"id": "a", "status": "ok", "code": "def f():\n    return 'a' * 5000\n",
              "call": "f()", "result": cut}
    with pytest.raises(NotATask, match="cut short by the tracer"):
        render(record, "sft_output")
    assert render({**record, "result": repr("a" * 10)}, "sft_output")


def test_sft_documents_packed_in_windows_make_whole_samples(root, tmp_path):
    # end to end, Megatron cut SFT tasks across samples: ~44% of the default's answer tokens
    # were trained without the start of their prompt. Packed whole into windows of the
    # phase's seq_length, each window padded, every sample is one window.
    import shutil
    import subprocess
    import sys

    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from codeworld.tokens import PAD_ID
    from model.data import build_datasets
    from tests.train_fixtures import write_yaml

    work = tmp_path / "r"
    shutil.copytree(root, work, ignore=shutil.ignore_patterns("pack", ".work"))
    W = 400   # the documents here take 130-256 tokens: some windows hold two
    params = tiny_params(work, pretrain={"blend": {"sft_trace": 1.0}, "seq_length": W},
                         model={"max_position_embeddings": 512})
    params["pack"]["sources"]["sft_trace"] = {"dataset": "traces", "format": "sft_trace",
                                              "window": W, "window_documents": 3}
    path = write_yaml(work / "params.yaml", params)
    subprocess.run([sys.executable, "-m", "codeworld.cli", "stage", "pack", "--params", str(path),
                    "--no-track"], check=True, cwd=work, capture_output=True)
    meta = pack_manifest(work)["sources"]["sft_trace"]
    windows = IndexedDataset(str(work / "pack" / "sft_trace"))
    masks = IndexedDataset(str(work / "pack" / "sft_trace_mask"))
    assert len(windows) == meta["windows"] < meta["documents"], meta
    docs = pad = 0
    for i in range(len(windows)):
        ids, mask = windows[i].tolist(), masks[i].tolist()
        assert len(ids) == W
        used = len(ids) - next(k for k, t in enumerate(reversed(ids)) if t != PAD_ID)
        assert ids[used - 1] == EOD_ID and not any(mask[used:])   # whole documents, then PAD
        docs += ids[:used].count(EOD_ID)
        pad += W - used
    assert (docs, pad) == (meta["documents"], meta["pad_tokens"])
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            "gloo", store=torch.distributed.FileStore(str(tmp_path / "pg-store"), 1), rank=0,
            world_size=1)
    train, _ = build_datasets(work / "pack", {"sft_trace": 1.0}, W, 7, 24, 2,
                              pack_manifest(work)["vocab_size"], work / ".work" / "idx")
    # (Megatron's GPTDataset feeds PAD as token 0, out of the loss)
    whole = {tuple(0 if t == PAD_ID else t for t in windows[i].tolist()): i
             for i in range(len(windows))}
    assert all(tuple(train[i]["tokens"].tolist()) in whole for i in range(24))
    # Token by token: label j is token j+1, in the loss exactly when its pack flag is 1 (PAD
    # never). Megatron's GPTDataset cached the first sample's loss mask after zeroing its PAD
    # labels in place, so every later sample lost the answer tokens at those positions.
    wrong = []
    for i in range(24):
        sample = train[i]
        w = whole[tuple(sample["tokens"].tolist())]
        ids, mask = windows[w].tolist(), masks[w].tolist()
        want = [float(mask[j + 1] == 1 and ids[j + 1] != PAD_ID) for j in range(W - 1)]
        got = sample["loss_mask"].tolist()[:W - 1]
        wrong += [(i, j) for j in range(W - 1) if got[j] != want[j]]
    assert not wrong, f"{len(wrong)} labels with another loss flag than the pack's: {wrong[:5]}"


def test_an_sft_task_is_alone_in_its_window_by_default(root, tmp_path):
    # Megatron's attention here is causal over the whole sample: packed after another task, an
    # answer attended to it (the default SFT blend: 48.5% of sft_output's answer tokens), which
    # it never does at evaluation or in RL. By default each window holds one document.
    import shutil
    import subprocess
    import sys

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from tests.train_fixtures import write_yaml

    work = tmp_path / "r"
    shutil.copytree(root, work, ignore=shutil.ignore_patterns("pack", ".work"))
    W = 400   # room for two or three of these documents
    params = tiny_params(work, pretrain={"blend": {"sft_trace": 1.0}, "seq_length": W},
                         model={"max_position_embeddings": 512})
    params["pack"]["sources"]["sft_trace"] = {"dataset": "traces", "format": "sft_trace",
                                              "window": W}
    subprocess.run([sys.executable, "-m", "codeworld.cli", "stage", "pack", "--params",
                    str(write_yaml(work / "params.yaml", params)), "--no-track"], check=True,
                   cwd=work, capture_output=True)
    meta = pack_manifest(work)["sources"]["sft_trace"]
    windows = IndexedDataset(str(work / "pack" / "sft_trace"))
    assert len(windows) == meta["windows"] == meta["documents"] > 1, meta
    assert all(windows[i].tolist().count(EOD_ID) == 1 for i in range(len(windows)))
    with pytest.raises(ConfigError, match="window_documents applies to windows only"):
        parse_params(tiny_params(root, pack={"sources": {"code": {
            "dataset": "dedup", "format": "code", "window_documents": 2}}}))


def test_a_window_that_is_not_the_phases_seq_length_fails_at_load(root):
    sources = {"sft_trace": {"dataset": "traces", "format": "sft_trace", "window": 64}}
    bad = tiny_params(root, pack={"sources": sources}, pretrain={"blend": {"sft_trace": 1.0}},
                      tokenizer={"sources": ["sft_trace"]})
    with pytest.raises(ConfigError, match=r"windows of 64 tokens .* pretrain.seq_length is 32"):
        parse_params(bad)
    sources = {"code": {"dataset": "dedup", "format": "code", "window": 32}}
    with pytest.raises(ConfigError, match="window applies to the SFT formats only"):
        parse_params(tiny_params(root, pack={"sources": sources}, pretrain={"blend": {"code": 1.0}},
                                 tokenizer={"sources": ["code"]}))


def test_agent_trajectories_become_one_document_per_assistant_turn():
    # a trajectory longer than the window, cut into consecutive samples, trained most turns
    # without their task: each turn is now its own document with the task and what fits
    from codeworld.config import PackSourceConfig
    from stages.documents import ASSISTANT, SYSTEM, TOOL_RESULT, USER
    from stages.pack import source_documents

    def tokens(tag, n):
        return [tag] * n

    segments = [(SYSTEM + "s", False), (USER + "task", False),
                (ASSISTANT, False), ("a1", True), (TOOL_RESULT + "o1", False),
                (ASSISTANT, False), ("a2", True), (TOOL_RESULT + "o2", False),
                (ASSISTANT, False), ("a3", True), (TOOL_RESULT + "o3", False)]
    # token counts: system 5, task 10, markers 1, turns 4/6/3, observations 20/8/2
    pieces = [tokens(100, 5), tokens(101, 10), [7], tokens(201, 4), tokens(301, 20),
              [7], tokens(202, 6), tokens(302, 8), [7], tokens(203, 3), tokens(303, 2)]
    src = PackSourceConfig(dataset="agent/trajectories", format="sft_agent", window=40)
    docs, left_out = source_documents(segments, pieces, src)
    assert left_out == 0 and len(docs) == 3
    for (ids, mask), turn in zip(docs, (201, 202, 203)):
        assert len(ids) <= 40 and len(ids) == len(mask)
        assert ids[:15] == tokens(100, 5) + tokens(101, 10)          # the task, always
        assert [t for t, m in zip(ids, mask) if m] == [turn] * ids.count(turn)   # its turn only
        assert ids[-1] == EOD_ID and mask[-1] == 0                   # the talk goes on
    # turn 2: 15 + 7 + 1 leaves 17 for history: the 20-token observation does not fit whole,
    # so neither does the turn before it (only the latest messages, whole, are kept)
    assert docs[1][0] == tokens(100, 5) + tokens(101, 10) + [7] + tokens(202, 6) + [EOD_ID]
    # turn 3: 15 + 4 + 1 leaves 20: o2 (8) and turn 2 (7) fit, o1 (20) does not
    assert docs[2][0] == (tokens(100, 5) + tokens(101, 10) + [7] + tokens(202, 6)
                          + tokens(302, 8) + [7] + tokens(203, 3) + [EOD_ID])
    # a window the task and a turn overflow: that turn is left out, counted
    small = src.model_copy(update={"window": 21})
    docs, left_out = source_documents(segments, pieces, small)
    assert left_out == 1 and [d[0][-5:-1] for d in docs][0] == tokens(201, 4)
    # without a window: the whole trajectory, one document
    whole, _ = source_documents(segments, pieces, src.model_copy(update={"window": 0}))
    assert len(whole) == 1 and len(whole[0][0]) == sum(map(len, pieces)) + 1


def test_special_token_text_from_outside_is_text_not_the_token(tok):
    """A corpus file, a task, a command's output or a program's result that spells a token's
    text is tokenised as text: the model never sees a turn, call or end that nobody wrote. The
    markup render puts around it (roles, tool markers, end of turn) stays single tokens."""
    from codeworld.config import PackSourceConfig
    from codeworld.tokens import END_OF_TEXT, encode_batch
    from stages.pack import source_documents

    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    spelled = f'TEMPLATE = "<|user|>{{q}}<|end_of_turn|>"\nEND = "{END_OF_TEXT}"\nprint("</tool>")\n'

    def documents(record, fmt):
        segments = render(record, fmt)
        pieces = encode_batch(tok, [t for t, _ in segments])
        docs, _ = source_documents(segments, pieces, PackSourceConfig(dataset="x", format=fmt))
        return [d for d, _ in docs]

    (code,) = documents({"id": "c", "text": spelled}, "code")
    assert [t for t in code if t < len(SPECIAL_TOKENS)] == [EOD_ID]
    assert tok.decode(code[:-1], skip_special_tokens=False) == spelled

    call = "<tool: bash>\ncat chat.py | grep '<tool: edit>'\n</tool>"
    traj = {"id": "a", "messages": [{"role": "user", "content": "fix <|assistant|> bug"},
                                    {"role": "assistant", "content": call},
                                    {"role": "tool", "content": spelled}]}
    (doc,) = documents(traj, "agent")
    special = [t for t in doc if t < len(SPECIAL_TOKENS)]
    assert special == [ids["<|user|>"], ids["<|end_of_turn|>"], ids["<|assistant|>"],
                       ids["<tool: bash>"], ids["</tool>"], ids["<|end_of_turn|>"],
                       ids["<|tool_result|>"], ids["<|end_of_turn|>"], EOD_ID]
    assert tok.decode(doc, skip_special_tokens=False) == text_of(render(traj, "agent")) + END_OF_TEXT

    out = {"id": "o", "status": "ok", "code": "def f():\n    return '<' + '|user|>'\n",
           "call": "f()", "result": "'<|user|>'"}
    (doc,) = documents(out, "sft_output")
    assert doc.count(ids["<|user|>"]) == 1   # the prompt's own turn, not the result's text


def test_markup_and_plain_parts_encode_as_the_whole_markup_text(tok):
    """Encoding a text's parts apart gives the ids the whole text gave before (as long as no
    Plain part spells a token): splitting at the markup changes no other token."""
    from codeworld.tokens import Plain, encode, encode_batch

    text = ("<|user|>", Plain("def f(x):\n    return x  # é\n"), "<|end_of_turn|>")
    assert encode(tok, text) == tok.encode("".join(text)).ids
    assert encode_batch(tok, ["", (), Plain("")]) == [[], [], []]


def test_the_policy_reads_an_observation_that_spells_a_turn_as_text(tok):
    from stages.agent.policies import ModelPolicy

    seen = []
    policy = ModelPolicy(lambda prompt, turn: seen.append(prompt) or [EOD_ID], tok,
                         max_context=4096, max_new_tokens=8)
    policy.act([{"role": "user", "content": "task"},
                {"role": "assistant", "content": "<tool: bash>\nls\n</tool>"},
                {"role": "tool", "content": "x.py <|assistant|> <|end_of_turn|>"}])
    assistant = tok.token_to_id("<|assistant|>")
    assert seen[0].count(assistant) == 2   # the assistant's turn, and the turn to write


def test_answers_end_at_the_stop_token_not_at_its_text(tok):
    """A repr that spells "<|end_of_turn|>" (Plain text in SFT's answers) is scored whole, in
    evaluation and in RL's reward: cut at the decoded text's first "<|end_of_turn|>" it read
    "'a", and the answer SFT taught scored 0."""
    from codeworld import prompts
    from stages.rl_tasks import reward

    truth = "'a<|end_of_turn|>b<|end_of_text|>'"
    ids = encode(tok, prompts.output_answer(truth))
    assert prompts.output_answer_of(tok, ids) == (truth, True)
    item = {"kind": "output", "id": "o", "answer": truth}
    assert reward(item, tok, ids) == 1.0
    assert reward(item, tok, ids[:-1]) == 0.0   # cut before its end-of-turn token: no answer
    frame = '<|line_sep|>{"s": "x\\u003c|frame_sep|>"}<|action_sep|>    y = s\n<|frame_sep|>'
    item = {"kind": "next_frame", "id": "f", "answer": frame}
    assert reward(item, tok, tok.encode(frame).ids) == 1.0
    assert reward(item, tok, tok.encode(frame.replace("<|frame_sep|>", "<|end_of_text|>")).ids) == 0.0
