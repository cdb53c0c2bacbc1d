"""Awkward entries in corpus sources and broken resume files: each is skipped (or redone) and
counted, never fatal to the stage, and what was fine before is ingested as before."""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from codeworld.config import load_params
from codeworld.shards import Dataset, DatasetWriter
from codeworld.storage import Storage
from stages import corpus, dedup
from stages.corpus_sources import SourceError
from tests.helpers import STDLIB, make_tree, write_params


def run_corpus(tmp_path, sources, **over):
    params = load_params(write_params(tmp_path / "params.yaml", tmp_path / "data", sources, **over))
    return corpus.run(params, track=False, metrics_path=str(tmp_path / "metrics.json"))


def small_tree(root):
    src = root / "src"
    shutil.copytree(STDLIB / "json", src, ignore=shutil.ignore_patterns("__pycache__"))
    return src


def records(tmp_path):
    return {r["path"]: r for r in Dataset.open(str(tmp_path / "data" / "corpus"))}


def test_non_utf8_file_name_is_skipped_and_counted(tmp_path):
    src = small_tree(tmp_path)
    with open(os.path.join(os.fsencode(src), b"bad_\xff\xfename.py"), "wb") as fh:
        fh.write(b"x = 1\n")
    m = run_corpus(tmp_path, [{"kind": "dir", "path": str(src), "name": "t"}])
    counts = m["stats"]["counts"]
    assert counts["skipped_bad_name"] == 1
    assert m["records"] == counts["kept"] == len(list(STDLIB.joinpath("json").glob("*.py")))
    assert m["stats"]["examples"][0] == {"reason": "bad_name", "source": "t", "path": "bad_\\xff\\xfename.py",
                                         "detail": "path is not valid UTF-8"}
    assert json.loads((tmp_path / "metrics.json").read_text())["skipped_bad_name"] == 1


def test_jsonl_records_with_lone_surrogates_or_odd_fields_are_counted(tmp_path):
    lines = ['{"id": "a", "text": "x = 1\\n", "path": "a.py"}',
             '{"id": "b", "text": "x = 2\\n", "path": "b\\ud800.py"}',   # lone surrogate in path
             '{"id": "c\\udfff", "text": "x = 3\\n"}',                    # ... in the id used as path
             '{"id": "d", "text": "x = 4\\n", "license": "MIT\\ud800"}',  # ... in a copied field
             '{"id": "e", "text": "x = 5\\n", "language": ["python"]}']   # unhashable language
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    m = run_corpus(tmp_path, [{"kind": "jsonl", "path": str(tmp_path / "in.jsonl"), "name": "j"}])
    counts = m["stats"]["counts"]
    assert m["records"] == 1 and counts["skipped_bad_name"] == 2 and counts["bad_records"] == 2
    assert [e["path"] for e in m["stats"]["examples"]] == ["b\\ud800.py", "c\\udfff"]
    assert m["stats"]["examples"][0]["detail"] == f"{tmp_path / 'in.jsonl'}:2: path is not valid UTF-8"
    assert m["stats"]["bad_records"] == [
        f"{tmp_path / 'in.jsonl'}:4: field 'license' is not valid UTF-8 (a lone surrogate)",
        f"{tmp_path / 'in.jsonl'}:5: field 'language' must be a string, not list"]


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t", *args],
                   check=True, capture_output=True)


def test_git_non_utf8_path_and_symlink_are_counted(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "a.py").write_text("def a():\n    return 1\n")
    with open(os.path.join(os.fsencode(repo), b"caf\xe9.py"), "wb") as fh:
        fh.write(b"x = 1\n")
    (repo / "link.py").symlink_to("a.py")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "one")
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    m = run_corpus(tmp_path, [{"kind": "git", "path": str(repo), "commit": commit}])
    counts = m["stats"]["counts"]
    assert m["records"] == 1 and counts["skipped_bad_name"] == 1 and counts["skipped_symlink"] == 1
    assert sorted(e["path"] for e in m["stats"]["examples"]) == ["caf\\xe9.py", "link.py"]


def test_fifo_socket_and_symlinks_are_skipped_without_being_opened(tmp_path):
    src = small_tree(tmp_path)
    os.mkfifo(src / "fifo.py")   # opening it for reading blocks until a writer comes: never
    os.mknod(src / "sock.py", stat.S_IFSOCK | 0o600)
    (src / "link.py").symlink_to("decoder.py")        # a link to a file in the tree
    (src / "dangling.py").symlink_to("nowhere.py")
    (src / "loop.py").symlink_to("loop.py")
    (src / "pkg.py").mkdir()                          # a folder is walked, not a candidate
    (src / "pkg.py" / "inner.py").write_text("y = 2\n")
    params = write_params(tmp_path / "params.yaml", tmp_path / "data", [{"kind": "dir", "path": str(src)}])
    # in a subprocess: before the fix the fifo blocked the stage forever
    out = subprocess.run([sys.executable, "-m", "codeworld.cli", "stage", "corpus", "--params", str(params),
                          "--no-track"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    m = json.loads((tmp_path / "data" / "corpus" / "manifest.json").read_text())
    counts = m["stats"]["counts"]
    assert counts["skipped_not_regular"] == 2 and counts["skipped_symlink"] == 3
    assert "skipped_unreadable" not in counts
    details = {e["path"]: e["detail"] for e in m["stats"]["examples"]}
    assert details == {"fifo.py": "fifo", "sock.py": "socket", "link.py": "symlink, not followed",
                       "dangling.py": "symlink, not followed: No such file or directory",
                       "loop.py": "symlink, not followed: Too many levels of symbolic links"}
    assert set(records(tmp_path)) == {p.name for p in STDLIB.joinpath("json").glob("*.py")} | {"pkg.py/inner.py"}


def test_nothing_to_ingest_names_what_listing_rejected(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"id": "x"}\n{not json\n')
    with pytest.raises(SourceError, match=r"nothing to ingest; 2 bad records, the first: \S+in\.jsonl:1: "
                                          r"needs string fields 'id' and 'text'$"):
        run_corpus(tmp_path, [{"kind": "jsonl", "path": str(tmp_path / "in.jsonl")}])
    (tmp_path / "only").mkdir()
    os.mkfifo(tmp_path / "only" / "f.py")
    with pytest.raises(SourceError, match=r"1 entries skipped, the first: only/f\.py \(not_regular: fifo\)"):
        run_corpus(tmp_path, [{"kind": "dir", "path": str(tmp_path / "only")}])


def test_bad_record_is_named_once(tmp_path):
    (tmp_path / "cj.jsonl").write_text('{"id": "x"}\n{"id": "a", "text": "x = 1\\n"}\n')
    m = run_corpus(tmp_path, [{"kind": "jsonl", "path": str(tmp_path / "cj.jsonl")}])
    assert m["stats"]["bad_records"] == [f"{tmp_path / 'cj.jsonl'}:1: needs string fields 'id' and 'text'"]
    # a shards source holding a record that is no corpus record: fatal, naming that record once
    writer = DatasetWriter(Storage(str(tmp_path)), "other", "fp")
    writer.prepare()
    writer.finish([writer.write(0, [{"id": "a", "text": "x = 1\n"}, {"id": "b"}])])
    with pytest.raises(SourceError) as err:
        run_corpus(tmp_path, [{"kind": "shards", "path": str(tmp_path / "other"), "name": "o"}])
    assert str(err.value) == f"source 'o': {tmp_path / 'other'}#1: needs string fields 'id' and 'text'"


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage"])
def test_dedup_recomputes_a_broken_signature_file(tmp_path, monkeypatch, caplog, damage):
    make_tree(tmp_path)
    params = load_params(write_params(tmp_path / "params.yaml", tmp_path / "data",
                                      [{"kind": "dir", "path": str(tmp_path / "tree")}],
                                      corpus={"shard_files": 20}))
    corpus.run(params, track=False, metrics_path=None)
    dedup.run(params, track=False, metrics_path=None)
    out = tmp_path / "data" / "dedup"
    reference = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "manifest.json").unlink()

    def killed(*a, **k):  # the run dies after its signatures are saved
        raise KeyboardInterrupt
    with monkeypatch.context() as mp:
        mp.setattr(dedup, "candidate_pairs", killed)
        with pytest.raises(KeyboardInterrupt):
            dedup.run(params, track=False, metrics_path=None)
    sigs = sorted((tmp_path / "data" / ".work" / "dedup").glob("sig-*.npz"))
    assert len(sigs) > 1
    data = sigs[1].read_bytes()
    sigs[1].write_bytes({"truncate": data[:len(data) // 2], "empty": b"", "garbage": b"\x93NUMPY junk"}[damage])
    with caplog.at_level("WARNING", logger="stages.dedup"):
        dedup.run(params, track=False, metrics_path=None)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == reference
    assert f"{sigs[1]}: unreadable signatures" in caplog.text



def test_unlistable_folder_is_counted_and_unlistable_root_is_fatal(tmp_path, monkeypatch):
    src = small_tree(tmp_path)
    locked = src / "locked"
    locked.mkdir()
    (locked / "hidden.py").write_text("z = 3\n")
    real_scandir = os.scandir

    def scandir(path="."):
        # root lists any folder, so the refusal a user without read permission meets is made here
        if not isinstance(path, int) and os.fsdecode(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    m = run_corpus(tmp_path, [{"kind": "dir", "path": str(src)}])
    assert m["stats"]["counts"]["skipped_unlistable_dir"] == 1
    assert [e for e in m["stats"]["examples"] if e["reason"] == "unlistable_dir"] == [
        {"reason": "unlistable_dir", "source": "src", "path": "locked", "detail": "Permission denied"}]
    assert "locked/hidden.py" not in records(tmp_path) and "decoder.py" in records(tmp_path)
    with pytest.raises(SourceError, match=r"source 'locked': cannot list \S+/locked: Permission denied"):
        run_corpus(tmp_path, [{"kind": "dir", "path": str(locked)}])


def test_a_symlinked_folder_is_counted_not_dropped_silently(tmp_path):
    src = small_tree(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "b.py").write_text("b = 2\n")
    (src / "linkdir").symlink_to(other)               # os.walk lists it, never enters it
    (src / "skipme").symlink_to(other)
    m = run_corpus(tmp_path, [{"kind": "dir", "path": str(src), "name": "s"}], corpus={"exclude": ["skip*"]})
    assert m["stats"]["counts"]["skipped_symlink"] == 1
    assert {"reason": "symlink", "source": "s", "path": "linkdir",
            "detail": "symlink, not followed"} in m["stats"]["examples"]
    assert not any(p.startswith("linkdir") for p in records(tmp_path))
