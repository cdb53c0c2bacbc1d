"""The `export` stage: a trained checkpoint as a Hugging Face Llama folder that transformers
loads alone and that computes what the Megatron model computes."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from codeworld.config import ConfigError, ModelConfig, parse_params
from model.hf_llama import ExportMappingError, llama_state_dict, split_qkv

REPO = Path(__file__).resolve().parents[1]
REPO = Path(__file__).resolve().parents[1]
EXPORT = {"phase": "pretrain", "check_programs": 3, "greedy_tokens": 12}
EVAL = {"max_programs": 4, "max_program_tokens": 600}


def test_fused_qkv_rows_go_to_the_llama_head_of_their_group():
    m = ModelConfig(num_layers=1, hidden_size=8, num_attention_heads=4, num_query_groups=2,
                    ffn_hidden_size=16)
    d = 2   # head_dim; Megatron's rows, group by group: q heads of the group, then k, then v
    rows = [f"g{g}.{part}.{i}" for g in range(2) for part in ("q0", "q1", "k", "v")
            for i in range(d)]
    weight = torch.arange(len(rows), dtype=torch.float32)[:, None].expand(len(rows), 8)
    q, k, v = split_qkv(weight, m)
    name = lambda t: [rows[int(r)] for r in t[:, 0]]
    # Llama: query head h uses key/value head h // (heads / groups)
    assert name(q) == ["g0.q0.0", "g0.q0.1", "g0.q1.0", "g0.q1.1",
                       "g1.q0.0", "g1.q0.1", "g1.q1.0", "g1.q1.1"]
    assert name(k) == ["g0.k.0", "g0.k.1", "g1.k.0", "g1.k.1"]
    assert name(v) == ["g0.v.0", "g0.v.1", "g1.v.0", "g1.v.1"]


def test_a_weight_llama_has_no_place_for_is_refused():
    m = ModelConfig(num_layers=1, hidden_size=8, num_attention_heads=4, num_query_groups=2,
                    ffn_hidden_size=16)
    state = {"embedding.word_embeddings.weight": torch.zeros(64, 8),
             "decoder.layers.0.self_attention.linear_proj.bias": torch.zeros(8)}
    with pytest.raises(ExportMappingError, match="linear_proj.bias"):
        llama_state_dict(state, m, vocab_size=60)


def test_the_te_spec_and_bf16_wrapper_names_map_like_the_local_spec():
    """On a GPU the TE spec keeps the pre-norms in the linear layers, Float16Module prefixes
    `module.`, and TE adds `_extra_state` (FP8 bookkeeping): the same Llama weights come out."""
    m = ModelConfig(num_layers=1, hidden_size=8, num_attention_heads=4, num_query_groups=2,
                    ffn_hidden_size=16)
    g = torch.Generator().manual_seed(0)
    w = lambda *shape: torch.randn(*shape, generator=g)
    local = {"embedding.word_embeddings.weight": w(64, 8), "output_layer.weight": w(64, 8),
             "decoder.final_layernorm.weight": w(8),
             "decoder.layers.0.input_layernorm.weight": w(8),
             "decoder.layers.0.self_attention.linear_qkv.weight": w(16, 8),
             "decoder.layers.0.self_attention.linear_proj.weight": w(8, 8),
             "decoder.layers.0.pre_mlp_layernorm.weight": w(8),
             "decoder.layers.0.mlp.linear_fc1.weight": w(32, 8),
             "decoder.layers.0.mlp.linear_fc2.weight": w(8, 16)}
    te = {"module." + k.replace("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight")
          .replace("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"): v
          for k, v in local.items()}
    te["module.decoder.layers.0.self_attention.linear_qkv._extra_state"] = None
    a, b = llama_state_dict(local, m, 60), llama_state_dict(te, m, 60)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert a["model.embed_tokens.weight"].shape == (60, 8)          # padding rows cut
    assert torch.equal(a["model.layers.0.mlp.gate_proj.weight"], local[
        "decoder.layers.0.mlp.linear_fc1.weight"][:16])               # gate first, then up
    assert "model.layers.0.post_attention_layernorm.weight" in a and len(a) == 12


def test_export_params_are_checked():
    with pytest.raises(ConfigError, match="export.phase"):
        parse_params({"export": {"phase": "posttrain"}}, "p.yaml")
    with pytest.raises(ConfigError, match="export.tolerance_fp32"):
        parse_params({"export": {"tolerance_fp32": 0}}, "p.yaml")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap (the sandbox) is not installed")
    from tests.train_fixtures import build_eval_root

    root = tmp_path_factory.mktemp("export")
    build_eval_root(root, evaluate=EVAL, export=EXPORT)
    return root


def _export(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "codeworld.cli", "stage", "export", "--params",
                           str(root / "params.yaml"), "--no-track"], cwd=root,
                          capture_output=True, text=True, timeout=900)


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# transformers alone (no codeworld module): what a user of the export runs
HF_GREEDY = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, prompts = sys.argv[1], json.loads(sys.argv[2])
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder)
out = []
for text in prompts:
    ids = tok(text, return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=10)
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    out.append({"ids": ids[0].tolist(), "new": gen[0, ids.shape[1]:].tolist(),
                "last": logits.tolist()})
print(json.dumps(out))
"""
# the Megatron checkpoint through our own loader
OURS_GREEDY = """
import json, sys
from pathlib import Path
import torch
from codeworld.config import load_params
from codeworld.storage import Storage
from model.generate import load
from stages.tokenizer import load as load_tok
root, prompts = Path(sys.argv[1]), json.loads(sys.argv[2])
tok = load_tok(Storage(str(root)))
lm = load(load_params(root / "params.yaml"), root / "checkpoints" / "pretrain", tok.get_vocab_size())
out = []
for text in prompts:
    ids = tok.encode(text).ids
    new = lm.sample(ids, max_new_tokens=10, stop_ids={0})[0]
    steps = lm.logits(torch.tensor([ids + new]))[0, len(ids) - 1:]
    top2 = steps.topk(2, -1).values
    out.append({"ids": ids, "new": new, "last": steps[0].tolist(),
                "margins": (top2[:, 0] - top2[:, 1]).tolist()})
print(json.dumps(out))
"""


def _run(script: str, *args: str) -> list[dict]:
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_export_is_checked_loads_with_transformers_alone_and_is_reproducible(root):
    proc = _export(root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = root / "export"
    manifest = json.loads((folder / "codeworld.json").read_text())
    assert manifest["phase"] == "pretrain" and manifest["iteration"] == 4
    assert set(manifest["files"]) == {"README.md", "config.json", "generation_config.json",
                                      "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert {f: h for f, h in _hashes(folder).items() if f != "codeworld.json"} == manifest["files"]
    assert manifest["check"] == {"programs": 3, "greedy_tokens": 12, "dtype": "float32",
                                 "tolerance": 1e-3}
    check = json.loads((root / "metrics" / "export.json").read_text())
    assert check["programs"] == 3 and check["tokenizer_equal"] == 3
    assert check["greedy_equal"] + check["greedy_near_ties"] == 3
    assert check["logits_max_abs_diff"] <= 1e-3 and check["argmax_agreement"] > 0.99
    config = json.loads((folder / "config.json").read_text())
    # the tokenizer's 600 rows, not Megatron's padded 640; GQA kept
    assert config["vocab_size"] == 600 and config["num_key_value_heads"] == 2
    assert config["architectures"] == ["LlamaForCausalLM"] and config["eos_token_id"] == 0

    # independently of the stage's own check: a user's transformers session against our loader
    prompts = [r["prompt"] for r in _records(root)[:2]]
    theirs = _run(HF_GREEDY, str(folder), json.dumps(prompts))
    ours = _run(OURS_GREEDY, str(root), json.dumps(prompts))
    for a, b in zip(theirs, ours):
        assert a["ids"] == b["ids"]              # same tokens, no BOS added
        assert len(a["new"]) > 0
        # the same tokens up to a near tie, if any (rounding may pick either token there);
        # ours stops at end-of-text, theirs too
        tie = next((k for k, m in enumerate(b["margins"]) if m < 1e-3), len(b["new"]))
        assert a["new"][:tie] == b["new"][:tie] and len(a["new"]) >= min(tie, len(b["new"]))
        assert max(abs(x - y) for x, y in zip(a["last"], b["last"])) < 1e-3

    # a rerun does nothing; a new export from scratch is byte for byte the same
    before = _hashes(folder)
    proc = _export(root)
    assert proc.returncode == 0 and "up to date" in proc.stderr
    shutil.rmtree(folder)
    assert _export(root).returncode == 0
    assert _hashes(folder) == before


def test_debugger_runs_the_export_through_transformers_as_it_runs_the_checkpoint(root, tmp_path):
    """`codeworld debug --hf`: the neural debugger for whoever has only the export."""
    if not (root / "export" / "codeworld.json").exists():
        assert _export(root).returncode == 0
    prog = tmp_path / "prog.py"
    prog.write_text("def helper(v):\n    return v * 2\n\n\ndef f(a, b):\n    c = helper(a)\n"
                    "    d = c + b\n    return d\n")
    base = [sys.executable, "-m", "codeworld.cli", "debug", str(prog), "--call", "f(2, 3)",
            "--params", str(root / "params.yaml"), "--max-new-tokens", "64"]
    walk = "s\ns\nn\np a\nc\nq\n"
    hf = subprocess.run([*base, "--hf", str(root / "export")], input=walk, capture_output=True,
                        text=True, cwd=REPO, timeout=600)
    assert hf.returncode == 0, hf.stderr[-3000:]
    assert hf.stdout.startswith(f"model: pretrain export {root / 'export'} (iteration 4, "
                                "through transformers); program traced: ok\n")
    assert "Loading weights" not in hf.stderr
    ours = subprocess.run([*base, "--checkpoint", str(root / "checkpoints" / "pretrain")], input=walk,
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert ours.returncode == 0, ours.stderr[-3000:]
    # the same session, frame for frame: real frames, predicted ones, the marks between them
    assert hf.stdout.split("\n", 1)[1] == ours.stdout.split("\n", 1)[1]
    assert hf.stdout.count("pred:") >= 5 and "real: call      def f(a, b):" in hf.stdout
    # a folder that is no finished export, and one missing a file, are refused before any work
    bad = subprocess.run([*base, "--hf", str(tmp_path)], input="", capture_output=True, text=True,
                         cwd=REPO, timeout=300)
    assert bad.returncode == 2 and "not a finished codeworld export" in bad.stderr
    partial = tmp_path / "partial"
    shutil.copytree(root / "export", partial)
    (partial / "model.safetensors").unlink()
    bad = subprocess.run([*base, "--hf", str(partial)], input="", capture_output=True, text=True,
                         cwd=REPO, timeout=300)
    assert bad.returncode == 2 and f"--hf {partial}: model.safetensors missing from the export" in bad.stderr


def _records(root: Path) -> list[dict]:
    from codeworld.shards import Dataset
    from codeworld.storage import Storage

    return [r for r in Dataset(Storage(str(root)).sub("traces")) if isinstance(r.get("prompt"), str)]


BROKEN = """
import sys
import model.hf_llama as hf
# a plausible mistake: Q, K and V as three blocks instead of group by group
hf.split_qkv = lambda w, m: w.split([m.hidden_size, w.shape[0] // 2 - m.hidden_size // 2,
                                     w.shape[0] // 2 - m.hidden_size // 2])
from codeworld.config import load_params
from stages.export import run
run(load_params(sys.argv[1]), track=False, metrics_path=None)
"""


def test_an_export_that_computes_otherwise_is_refused_and_not_published(root, tmp_path):
    params = tmp_path / "params.yaml"
    text = (root / "params.yaml").read_text().replace(str(root), str(tmp_path / "data"))
    params.write_text(text)
    shutil.copytree(root, tmp_path / "data", ignore=shutil.ignore_patterns("export", "params.yaml"))
    proc = subprocess.run([sys.executable, "-c", BROKEN, str(params)], capture_output=True,
                          text=True, timeout=600, cwd=REPO)
    assert proc.returncode != 0
    assert "ExportCheckFailed" in proc.stderr and "logits differ by up to" in proc.stderr
    assert not (tmp_path / "data" / "export").exists()


def test_codeworld_export_takes_any_phase_checkpoint_directory(root, tmp_path):
    """A checkpoint trained by hand: exported and checked like the stage's, its own lineage."""
    out = tmp_path / "hf"
    cmd = [sys.executable, "-m", "codeworld.cli", "export", "--params", str(root / "params.yaml"),
           "--checkpoint", str(root / "checkpoints" / "pretrain")]
    proc = subprocess.run([*cmd, "--out", str(out)], cwd=root, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["programs"] == 3 and summary["logits_max_abs_diff"] <= 1e-3
    manifest = json.loads((out / "codeworld.json").read_text())
    assert [r["phase"] for r in manifest["lineage"]] == ["pretrain"]
    assert "model.safetensors" in manifest["files"]
    proc = subprocess.run([*cmd[:-1], str(tmp_path), "--out", str(tmp_path / "x")], cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "not a phase checkpoint directory" in proc.stderr
    proc = subprocess.run([*cmd, "--out", str(root / "checkpoints" / "pretrain")], cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "is the same path as checkpoint" in proc.stderr

    # a folder of the user's is refused before any work, and loses nothing
    mine = tmp_path / "mine"
    (mine / "notes").mkdir(parents=True)
    (mine / "notes" / "a.txt").write_text("keep me")
    (mine / "README.md").write_text("my own readme")
    proc = subprocess.run([*cmd, "--out", str(mine)], cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{mine} holds files no codeworld export wrote (README.md, notes)" in proc.stderr
    assert (mine / "notes" / "a.txt").read_text() == "keep me"
    assert (mine / "README.md").read_text() == "my own readme"

    # killed while publishing (the pending manifest names the files an export may have left):
    # the rerun publishes whole and removes what the earlier export wrote and this one does not
    files = json.loads((out / "codeworld.json").read_text())["files"]
    (out / "model.safetensors").unlink()
    (out / "old.bin").write_bytes(b"an earlier export's file")
    (out / "codeworld.json").write_text(json.dumps(
        {"name": "export", "pending": True, "files": dict.fromkeys([*files, "old.bin"])}))
    proc = subprocess.run([*cmd, "--out", str(out)], cwd=root, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "codeworld.json").read_text())["files"] == files
    assert sorted(p.name for p in out.iterdir()) == sorted([*files, "codeworld.json"])


def test_export_without_a_checkpoint_names_the_phase_and_where(tmp_path):
    from stages.export import run

    params = parse_params({"storage": {"root": str(tmp_path)}, "export": {"phase": "pretrain"}},
                          "p.yaml")
    with pytest.raises(ConfigError, match="export.phase 'pretrain': no checkpoint"):
        run(params, track=False, metrics_path=None)


def _copy_root(root: Path, tmp_path: Path) -> Path:
    """A copy of the module's trained root at tmp_path/data, its params at tmp_path."""
    shutil.copytree(root, tmp_path / "data", ignore=shutil.ignore_patterns("export", "params.yaml"))
    (tmp_path / "params.yaml").write_text(
        (root / "params.yaml").read_text().replace(str(root), str(tmp_path / "data")))
    return tmp_path / "params.yaml"


def test_the_card_carries_the_evaluation_of_the_exported_checkpoint_only(root, tmp_path):
    """The card prints the evaluate stage's figures: new figures are a new export (it was
    'up to date' with the old ones), and figures of another checkpoint are left out."""
    params, data = _copy_root(root, tmp_path), tmp_path / "data"
    exported = data / "checkpoints" / "pretrain" / "iter_0000004"
    assert exported.is_dir()
    (data / "evaluate").mkdir()

    run_fp = json.loads((exported.parent / "run.json").read_text())["fingerprint"]

    def export_with(figure: float, checkpoint: Path) -> tuple[str, str]:
        (data / "evaluate" / "summary.json").write_text(json.dumps({"phases": {"pretrain": {
            "checkpoint": str(checkpoint), "iteration": 4, "run_fingerprint": run_fp,
            "valid_format": figure}}}))
        proc = subprocess.run([sys.executable, "-m", "codeworld.cli", "stage", "export",
                               "--params", str(params), "--no-track"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stderr, (data / "export" / "README.md").read_text()

    _, card = export_with(0.25, exported)
    assert "| valid_format | 0.250 |" in card
    err, card = export_with(0.75, exported)
    assert "up to date" not in err and "| valid_format | 0.750 |" in card
    err, card = export_with(0.75, exported.parent / "iter_0000002")
    assert "No held-out evaluation of this checkpoint on record" in card
    assert "the card leaves it out" in err


def test_figures_of_a_checkpoint_retrained_to_the_same_iteration_are_not_its(tmp_path, caplog):
    """The default always ends at iter_0000200: a retrained phase has the same checkpoint path
    and other weights. The evaluation is the checkpoint's only when its folder, iteration and
    run (run.json's fingerprint) are the ones the summary names."""
    from codeworld.storage import Storage
    from stages.export import evaluation_of

    ckdir = tmp_path / "checkpoints" / "pretrain"
    it = ckdir / "iter_0000200"
    it.mkdir(parents=True)
    (tmp_path / "evaluate").mkdir()
    storage = Storage(str(tmp_path))

    def with_run(fingerprint: str, **entry) -> dict | None:
        (ckdir / "run.json").write_text(json.dumps({"phase": "pretrain", "fingerprint": fingerprint}))
        (tmp_path / "evaluate" / "summary.json").write_text(json.dumps({"phases": {"pretrain": {
            "checkpoint": str(it), "iteration": 200, "run_fingerprint": "run-one",
            "valid_format": 0.5, **entry}}}))
        return evaluation_of(storage, "pretrain", it)

    assert with_run("run-one")["valid_format"] == 0.5
    assert with_run("run-two") is None                        # retrained: same path, other run
    assert "the card leaves it out" in caplog.text
    assert with_run("run-one", iteration=100) is None          # another iteration
    assert with_run("run-one", run_fingerprint=None) is None   # a summary naming no run
    (ckdir / "run.json").unlink()
    assert evaluation_of(storage, "pretrain", it) is None      # a checkpoint naming no run


def test_an_export_on_s3_is_pinned_where_dvc_looks_for_it(root, tmp_path, s3_endpoint, s3_bucket):
    """With storage.root on S3 the export goes there and data/export/ holds a copy of its
    manifest (its files' sha256 and where it is): dvc.yaml's output, which DVC needs."""
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    prefix = f"{s3_bucket}/run"
    for name in ("tokenizer", "traces"):
        fs.put(str(root / name), f"{prefix}/{name}", recursive=True)
    ws = tmp_path / "ws"
    shutil.copytree(root / "checkpoints" / "pretrain", ws / "data" / "checkpoints" / "pretrain")
    text = (root / "params.yaml").read_text()
    assert f"root: {root}\n" in text
    (ws / "params.yaml").write_text(text.replace(
        f"root: {root}\n", f"root: {prefix}\n  s3_endpoint_url: {s3_endpoint}\n"))
    proc = subprocess.run([sys.executable, "-m", "codeworld.cli", "stage", "export", "--params",
                           str(ws / "params.yaml"), "--no-track"], cwd=ws, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    remote = json.loads(fs.cat_file(f"{prefix}/export/codeworld.json"))
    pinned = json.loads((ws / "data" / "export" / "manifest.json").read_text())
    assert pinned["location"] == f"{prefix}/export" and pinned["files"] == remote["files"]
    assert pinned["fingerprint"] == remote["fingerprint"]


def test_a_checkpoint_trained_with_another_tokenizer_is_refused(root, tmp_path):
    """run.json records the tokenizer a phase trained with; the export refuses another one
    (same vocabulary size, other ids: its own check runs both sides on the same tokenizer)."""
    tokenizer = json.loads((root / "tokenizer" / "manifest.json").read_text())
    assert json.loads((root / "checkpoints" / "pretrain" / "run.json").read_text())[
        "tokenizer_sha256"] == tokenizer["sha256"]
    params = _copy_root(root, tmp_path)
    run_json = tmp_path / "data" / "checkpoints" / "pretrain" / "run.json"
    run_json.write_text(json.dumps({**json.loads(run_json.read_text()),
                                    "tokenizer_sha256": "ab" * 32}))
    proc = subprocess.run([sys.executable, "-m", "codeworld.cli", "stage", "export", "--params",
                           str(params), "--no-track"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (f"was trained with tokenizer sha256 abababababab..., {tmp_path / 'data' / 'tokenizer'}"
            f" holds {tokenizer['sha256'][:12]}...") in proc.stderr
    assert not (tmp_path / "data" / "export").exists()
