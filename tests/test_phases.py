"""The later training phases: SFT documents carry exactly their answers in the loss, a phase
starts from its parent's checkpoint and records it, a source too small to validate still
trains, and a phase order that cannot be is refused at load. Tiny model, real torchrun."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from codeworld import prompts
from codeworld.config import ConfigError, parse_params
from codeworld.shards import Dataset
from codeworld.split import corpus_id, heldout
from codeworld.storage import Storage
from codeworld.tokens import END_OF_TEXT, ROLE_TOKENS, joined
from stages.documents import END_OF_TURN, NotATask, render
from tests.train_fixtures import agent_records, build_phase_root, phase_params, sft_trace_records


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("phases")
    build_phase_root(root)
    return root


def loss_text(segments) -> str:
    return "".join(joined(t) for t, keep in segments if keep)


def test_sft_segments_put_only_the_answers_in_the_loss():
    rec = next(r for r in sft_trace_records() if r.get("status") == "ok")
    trace = render(rec, "sft_trace")
    assert trace == [(prompts.trace_prompt(rec), False), (rec["trace"] + END_OF_TEXT, True)]
    out = render(rec, "sft_output")
    assert out == [(prompts.output_prompt(rec["code"], rec["call"]), False),
                   (prompts.output_answer(rec["result"]), True)]
    raised = next(r for r in sft_trace_records() if r.get("status") == "exception")
    with pytest.raises(NotATask, match="did not return"):
        render(raised, "sft_output")
    with pytest.raises(NotATask, match="no prompt"):
        render(sft_trace_records()[-1], "sft_trace")
    traj = agent_records(1)[0]
    agent = render(traj, "sft_agent")
    assistant = ROLE_TOKENS[2]
    answers = [m["content"] + END_OF_TURN for m in traj["messages"] if m["role"] == "assistant"]
    assert loss_text(agent) == "".join(answers)
    assert [joined(t) for t, keep in agent if not keep].count(assistant) == len(answers)


def _documents(root: Path, name: str) -> list[tuple[np.ndarray, np.ndarray]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ids, mask = IndexedDataset(str(root / "pack" / name)), IndexedDataset(str(root / "pack" / f"{name}_mask"))
    # copies: the arrays are views of memory maps that close with their datasets
    return [(np.array(ids[i]), np.array(mask[i])) for i in range(len(ids))]


def test_packed_sft_masks_exactly_the_answers_and_skip_held_out_programs(root):
    from stages import tokenizer as tokenizer_stage

    tok = tokenizer_stage.load(Storage(str(root)))
    records = list(Dataset(Storage(str(root)).sub("traces")))
    kept = [r for r in records if not heldout(corpus_id(r), 10.0, 0)]
    assert len(kept) < len(records)   # the fixture's 10% holds some programs out
    meta = json.loads((root / "pack" / "manifest.json").read_text())["sources"]

    def answers(name: str) -> list[str]:
        return [tok.decode(ids[mask == 1].tolist(), skip_special_tokens=False)
                for ids, mask in _documents(root, name)]

    with_output = [r for r in kept if prompts.has_output_task(r)]
    assert answers("sft_output") == [joined(prompts.output_answer(r["result"])) + END_OF_TEXT
                                     for r in with_output]
    assert meta["sft_output"]["skipped"] == len(kept) - len(with_output)
    with_prompt = [r for r in kept if isinstance(r.get("prompt"), str)]
    # the answer brings its own end-of-text: exactly one closes the document
    assert answers("sft_trace") == [prompts.trace_answer(r) for r in with_prompt]
    first_ids, first_mask = _documents(root, "sft_trace")[0]
    prompt = tok.decode(first_ids[first_mask == 0].tolist(), skip_special_tokens=False)
    assert prompt == prompts.trace_prompt(with_prompt[0])
    assert meta["sft_trace"]["skipped"] == len(kept) - len(with_prompt) >= 4  # repository traces
    assert meta["sft_agent"]["masked"] and not meta["traces"]["masked"]


def run_phase(root: Path, phase: str, tmp: Path, track: bool = False,
              **sections) -> tuple[dict, dict]:
    from stages import train_phase

    params = parse_params(phase_params(root, **sections))
    metrics = tmp / f"{phase}.json"
    result = train_phase.run_phase(params, phase, track=track, metrics_path=str(metrics),
                                   plot_path=None)
    return result, json.loads(metrics.read_text())


def test_midtrain_starts_from_pretrain_and_trains_on_a_source_too_small_to_validate(
        root, tmp_path, monkeypatch):
    fresh, _ = run_phase(root, "midtrain", tmp_path, midtrain={"init_from": None})
    pre, pre_stats = run_phase(root, "pretrain", tmp_path)
    assert pre_stats["final_loss"] < pre_stats["first_loss"] - 0.5, pre_stats
    mid, stats = run_phase(root, "midtrain", tmp_path)
    # pretrain's weights: the same first batch costs far less than from a fresh init
    assert stats["first_loss"] < fresh["stats"]["first_loss"] - 0.5, (stats, fresh["stats"])
    ck = root / "checkpoints"
    run = json.loads((ck / "midtrain" / "run.json").read_text())
    assert run["parent"] == {"phase": "pretrain", "checkpoint": pre["checkpoint"], "iteration": 20,
                             "fingerprint": pre["fingerprint"]}
    assert mid["parent"] == run["parent"] and mid["fingerprint"] != fresh["fingerprint"]
    # the 5-trajectory source trains, the validation loss comes from the others
    assert run["train_only_sources"] == ["agent_small"] == mid["train_only_sources"]
    assert run["valid_sources"] == ["code", "traces"]
    assert stats["train_only_sources"] == 1 and "final_valid_loss" in stats
    assert "not validated (too few documents for a validation split): agent_small" in \
        (ck / "midtrain" / "train.log").read_text()
    # SFT from midtrain, on the masked sources, its MLflow run tagged with the parent
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    sft, sft_stats = run_phase(root, "sft", tmp_path, track=True)
    assert sft["parent"]["phase"] == "midtrain" and sft_stats["steps"] == 2
    assert sft["train_only_sources"] == []
    # the blend's shares of the loss tokens, as given (blend_unit loss_tokens) and as they
    # were when the weights counted samples
    weights = {"sft_trace": 0.4, "sft_output": 0.4, "sft_agent": 0.2}
    for n, w in weights.items():
        assert sft_stats[f"blend_weight_{n}"] == pytest.approx(w)
        assert sft_stats[f"loss_share_{n}"] == pytest.approx(w, abs=1e-5)
    assert sft_stats["loss_share_if_samples_sft_output"] < 0.3, sft_stats
    assert sft_stats["sample_weight_sft_output"] > 0.5, sft_stats
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [tagged] = client.search_runs([client.get_experiment_by_name("codeworld").experiment_id])
    tags = tagged.data.tags
    assert tags["codeworld.stage"] == "sft" and tags["codeworld.parent_phase"] == "midtrain"
    assert tags["codeworld.parent_checkpoint"] == mid["checkpoint"]
    assert tags["codeworld.parent_iteration"] == "2"
    assert tags["codeworld.parent_fingerprint"] == mid["fingerprint"]
    assert tagged.data.metrics["loss_share_sft_output"] == pytest.approx(0.4, abs=1e-5)
    assert tagged.data.metrics["loss_share_if_samples_sft_output"] < 0.3


@pytest.fixture
def one_process_group(tmp_path):
    """Megatron's BlendedDataset asks for the rank while it builds its indices (the group may
    be there already: tests/test_tokenizer_pack.py leaves one, as this does)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "pg"), 1), rank=0,
                                world_size=1)


def test_small_source_is_in_the_train_blend_only(root, tmp_path, one_process_group):
    from model.data import build_datasets, plan_validation

    args = dict(seq_length=32, seed=1, train_samples=64, valid_samples=8, vocab_size=600,
                cache_dir=tmp_path / "cache")
    train, valid = build_datasets(root / "pack", {"traces": 1.0, "agent_small": 1.0}, **args)
    # 2% of 25 documents rounds to one, of 24 to none
    assert plan_validation({"b": 24, "a": 25}) == (["a"], ["b"])
    names = [Path(d.dataset_path).name for d in train.datasets]
    assert names == ["agent_small", "traces"]
    assert 0 < np.count_nonzero(train.dataset_index == 0) < len(train)   # both sources drawn
    assert [Path(d.dataset_path).name for d in valid.datasets] == ["traces"]
    assert len(train.datasets[0].indices) == 5   # all its documents train
    # a validated source: its last 2% validate and never train
    assert set(valid.datasets[0].indices).isdisjoint(train.datasets[1].indices)
    assert len(valid.datasets[0].indices) >= 1
    with pytest.raises(ValueError, match="no source of the blend .*agent_small: 5 documents.* "
                                         "can give a validation split"):
        build_datasets(root / "pack", {"agent_small": 1.0}, **args)


def test_blend_weights_share_out_the_loss_tokens(root, tmp_path, one_process_group):
    # Megatron draws samples by its weights, and a sample of short answers (sft_output) carries
    # far fewer loss tokens than one of traces: taken as samples, weights 1:3 gave sft_output
    # 19% of the loss tokens here, not 75%. Measured on the samples training reads.
    from model.data import build_datasets, drawn_loss_tokens

    blend = {"sft_trace": 1.0, "sft_output": 3.0}
    args = dict(seq_length=32, seed=1, train_samples=3000, valid_samples=8, vocab_size=600)
    train, _ = build_datasets(root / "pack", blend, cache_dir=tmp_path / "a", **args)
    drawn = drawn_loss_tokens(train, 3000)
    loss = {n: tokens for n, (_, tokens) in drawn.items()}
    assert loss["sft_output"] / sum(loss.values()) == pytest.approx(0.75, abs=0.03), drawn
    # blend_unit samples: Megatron's own unit, the weights as given
    train, _ = build_datasets(root / "pack", blend, cache_dir=tmp_path / "b",
                              blend_unit="samples", **args)
    drawn = drawn_loss_tokens(train, 3000)
    assert drawn["sft_output"][0] / 3000 == pytest.approx(0.75, abs=0.01), drawn
    assert drawn["sft_output"][1] / sum(t for _, t in drawn.values()) < 0.6, drawn


def test_blend_weights_of_equally_dense_sources_reach_megatron_unchanged():
    # pretrain's blend (every token in the loss): the same per-sample weights, bit for bit,
    # so its Megatron indices (named by a hash of the weights) are the ones built before.
    from model.data import loss_token_shares, sample_weights

    sources = {"code": {"tokens": 300, "loss_tokens": 300},
               "traces": {"tokens": 7, "loss_tokens": 7},
               "sft": {"tokens": 90, "pad_tokens": 10, "loss_tokens": 5},
               "empty": {"tokens": 50, "pad_tokens": 14, "loss_tokens": 0}}
    blend = {"code": 0.1, "traces": 0.7}
    assert sample_weights(blend, sources) == blend
    # 5 loss tokens in 100 stored (padding counted): 20 times the samples of a dense source
    assert sample_weights({"code": 0.1, "sft": 0.3}, sources) == {"code": 0.1, "sft": 0.3 * 20}
    shares = loss_token_shares(sample_weights({"code": 0.1, "sft": 0.3}, sources), sources)
    assert shares == pytest.approx({"code": 0.25, "sft": 0.75})
    assert sample_weights({"sft": 0.3, "empty": 1.0}, sources, "samples") == {"sft": 0.3,
                                                                                "empty": 1.0}
    with pytest.raises(ValueError, match="empty carry no loss tokens"):
        sample_weights({"sft": 0.3, "empty": 1.0}, sources)
    with pytest.raises(ValueError, match="'old': its manifest entry has no 'loss_tokens'"):
        sample_weights({"old": 1.0}, {"old": {"tokens": 3}})
    with pytest.raises(ValueError, match="nope not in the pack manifest"):
        sample_weights({"nope": 1.0}, sources)
    with pytest.raises(ConfigError, match="blend_unit"):
        parse_params(phase_params(Path("/nonexistent"), sft={"blend_unit": "tokens"}))


def test_a_phase_must_start_from_an_earlier_configured_phase(root):
    with pytest.raises(ConfigError, match="midtrain.init_from 'sft' is not a phase before midtrain"):
        parse_params(phase_params(root, midtrain={"init_from": "sft"}))
    with pytest.raises(ConfigError, match="sft.init_from 'rlhf' is not a phase before sft "
                                          r"\(earlier phases: pretrain, midtrain\)"):
        parse_params(phase_params(root, sft={"init_from": "rlhf"}))
    without_mid = phase_params(root)
    del without_mid["midtrain"]
    with pytest.raises(ConfigError, match="sft.init_from 'midtrain': this params file has no "
                                          "midtrain section"):
        parse_params(without_mid)
    with pytest.raises(ConfigError, match="observation_mask applies to format agent only"):
        parse_params(phase_params(root, pack={"sources": {
            "code": {"dataset": "dedup", "format": "code"},
            "sft_agent": {"dataset": "agent", "format": "sft_agent", "observation_mask": 0.5}}}))
    from stages.train_phase import phase_config

    with pytest.raises(ConfigError, match="params has no sft section"):
        phase_config(parse_params({}), "sft")
