import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from codeworld.config import load_params
from codeworld.shards import Dataset
from stages import corpus
from stages.corpus_sources import SourceError
from tests.helpers import make_tree, write_params

CLI = [sys.executable, "-m", "codeworld.cli"]


def run_corpus(tmp_path, sources, **over):
    params = load_params(write_params(tmp_path / "params.yaml", tmp_path / "data", sources, **over))
    return corpus.run(params, track=False, metrics_path=str(tmp_path / "metrics.json"))


def test_dir_source_records_and_counts(tmp_path):
    src = make_tree(tmp_path)
    m = run_corpus(tmp_path, [{"kind": "dir", "path": str(src), "name": "t"}])
    counts = m["stats"]["counts"]
    assert counts["skipped_non_utf8"] == 1
    assert counts["skipped_binary"] == 1
    assert counts["skipped_too_large"] == 1
    assert "notes.txt" not in json.dumps(m)  # other extensions are not candidates
    recs = list(Dataset.open(str(tmp_path / "data" / "corpus")))
    assert len(recs) == m["records"] == counts["kept"]
    by_path = {r["path"]: r for r in recs}
    r = by_path["json/decoder.py"]
    assert r["id"] == "t/json/decoder.py" and r["language"] == "python" and r["license"] == "MIT"
    assert r["text"] == (src / "json" / "decoder.py").read_text()
    assert r["size"] == len(r["text"].encode())
    assert [r["path"] for r in recs] == sorted(by_path)  # deterministic order
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["kept"] == m["records"] and metrics["skipped_binary"] == 1


def test_git_source_reads_the_pinned_commit(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t"]
    (repo / "a.py").write_text("def a():\n    return 1\n")
    (repo / "LICENSE").write_text("Apache License\nVersion 2.0\n")
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-qm", "one"], check=True)
    commit = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    (repo / "a.py").write_text("def a():\n    return 2\n")  # work tree differs from the commit
    (repo / "b.py").write_text("x = 1\n")
    m = run_corpus(tmp_path, [{"kind": "git", "path": str(repo), "commit": commit}])
    recs = list(Dataset.open(str(tmp_path / "data" / "corpus")))
    assert [(r["path"], r["text"], r["license"]) for r in recs] == [("a.py", "def a():\n    return 1\n", "Apache-2.0")]
    assert m["records"] == 1
    with pytest.raises(SourceError, match="git cat-file -e failed"):
        run_corpus(tmp_path, [{"kind": "git", "path": str(repo), "commit": "deadbeef"}])


def test_jsonl_source_counts_bad_lines(tmp_path):
    lines = [json.dumps({"id": "x", "text": "print(1)\n", "path": "x.py"}), "{not json",
             json.dumps({"id": "y"}), json.dumps({"id": "z", "text": "a b", "language": "text"})]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    m = run_corpus(tmp_path, [{"kind": "jsonl", "path": str(tmp_path / "in.jsonl"), "name": "j"}])
    assert m["records"] == 1
    assert m["stats"]["counts"]["bad_records"] == 2
    assert m["stats"]["counts"]["skipped_language"] == 1
    assert "in.jsonl:2" in m["stats"]["bad_records"][0]


def test_missing_and_empty_sources_fail_clearly(tmp_path):
    with pytest.raises(SourceError, match="is not a directory"):
        run_corpus(tmp_path, [{"kind": "dir", "path": str(tmp_path / "nope")}])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="nothing to ingest"):
        run_corpus(tmp_path, [{"kind": "dir", "path": str(tmp_path / "empty")}])


def test_empty_source_beside_others_is_counted(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.py").write_text("x = 1\n")
    m = run_corpus(tmp_path, [{"kind": "dir", "path": str(tmp_path / "empty")},
                              {"kind": "dir", "path": str(tmp_path / "one")}])
    assert m["records"] == 1
    assert m["stats"]["empty_sources"] == ["empty"] and m["stats"]["counts"]["empty_sources"] == 1


def test_a_1gb_file_is_skipped_without_being_read(tmp_path):
    d = tmp_path / "big"
    d.mkdir()
    with open(d / "huge.py", "wb") as fh:  # sparse: 1 GB on paper, nothing on disk
        fh.truncate(1 << 30)
    (d / "ok.py").write_text("y = 2\n")
    m = run_corpus(tmp_path, [{"kind": "dir", "path": str(d)}])
    assert m["records"] == 1 and m["stats"]["counts"]["skipped_too_large"] == 1
    assert m["stats"]["examples"][0]["detail"] == f"{1 << 30} bytes"


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_parallel_and_serial_runs_are_byte_identical(tmp_path):
    src = make_tree(tmp_path)
    a = write_params(tmp_path / "a.yaml", tmp_path / "A", [{"kind": "dir", "path": str(src)}],
                     corpus={"workers": 1, "shard_files": 15})
    b = write_params(tmp_path / "b.yaml", tmp_path / "B", [{"kind": "dir", "path": str(src)}],
                     corpus={"workers": 2, "shard_files": 15})
    for p in (a, b):
        subprocess.run(CLI + ["stage", "corpus", "--params", str(p), "--no-track"], cwd=tmp_path, check=True,
                       capture_output=True)
    assert _files(tmp_path / "A" / "corpus") == _files(tmp_path / "B" / "corpus")


@pytest.mark.parametrize("stage", ["corpus", "dedup"])
def test_killed_stage_resumes_to_identical_output(tmp_path, stage):
    src = make_tree(tmp_path)
    params = write_params(tmp_path / "params.yaml", tmp_path / "data", [{"kind": "dir", "path": str(src)}],
                          corpus={"shard_files": 4})
    cmd = CLI + ["stage", stage, "--params", str(params), "--no-track"]
    if stage == "dedup":
        subprocess.run(CLI + ["stage", "corpus", "--params", str(params), "--no-track"], cwd=tmp_path, check=True)
    subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True)
    reference = _files(tmp_path / "data" / stage)
    for delay in (0.8, 1.2, 1.6, 2.0):  # kill at several moments of the run
        # without its manifest the dataset is unfinished: the stage must redo (or resume) it
        (tmp_path / "data" / stage / "manifest.json").unlink(missing_ok=True)
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True)
        assert _files(tmp_path / "data" / stage) == reference
        assert not (tmp_path / "data" / ".work" / stage).exists()


def test_stage_with_root_elsewhere_pins_manifest_for_dvc(tmp_path):
    src = make_tree(tmp_path)
    params = write_params(tmp_path / "params.yaml", tmp_path / "elsewhere", [{"kind": "dir", "path": str(src)}])
    subprocess.run(CLI + ["stage", "corpus", "--params", str(params), "--no-track"], cwd=tmp_path,
                   check=True, capture_output=True)
    pinned = json.loads((tmp_path / "data" / "corpus" / "manifest.json").read_text())
    real = json.loads((tmp_path / "elsewhere" / "corpus" / "manifest.json").read_text())
    assert pinned.pop("location") == str(tmp_path / "elsewhere" / "corpus")
    assert pinned == real
    assert sorted(p.name for p in (tmp_path / "data" / "corpus").iterdir()) == ["manifest.json"]


def test_jsonl_line_that_is_not_an_object_is_counted_not_fatal(tmp_path):
    (tmp_path / "in.jsonl").write_text('[1, 2]\n"text"\n' + json.dumps({"id": "a", "text": "x = 1\n", "path": "a.py"}) + "\n")
    m = run_corpus(tmp_path, [{"kind": "jsonl", "path": str(tmp_path / "in.jsonl")}])
    assert m["records"] == 1 and m["stats"]["counts"]["bad_records"] == 2
    assert "in.jsonl:1: not a JSON object (list)" in m["stats"]["bad_records"][0]


def test_the_stdlib_gives_the_same_dataset_wherever_it_is_installed(tmp_path, monkeypatch):
    # The same interpreter installed under two prefixes: the manifest (and so every dataset
    # fingerprinted from it downstream) is byte-identical; another Python version is not reused.
    from stages import corpus_sources

    def run_with_stdlib(lib: Path, out: str) -> bytes:
        monkeypatch.setattr(corpus_sources, "stdlib_dir", lambda: lib)
        (tmp_path / out).mkdir()
        run_corpus(tmp_path / out, [{"kind": "stdlib"}])
        return (tmp_path / out / "data" / "corpus" / "manifest.json").read_bytes()

    usr, opt = make_tree(tmp_path / "usr" / "lib"), make_tree(tmp_path / "opt" / "python")
    first = run_with_stdlib(usr, "a")
    assert run_with_stdlib(opt, "b") == first
    monkeypatch.setattr(corpus_sources.platform, "python_version", lambda: "3.99.0")
    other = json.loads(run_with_stdlib(usr, "c"))
    assert other["fingerprint"] != json.loads(first)["fingerprint"]


def _texts(tmp_path) -> list[str]:
    return [r["text"] for r in Dataset.open(str(tmp_path / "data" / "corpus"))]


def test_an_edit_that_keeps_the_size_makes_a_new_dataset(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("x = 1\n")
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": "j", "text": "y = 1\n", "path": "j.py"}) + "\n")
    sources = [{"kind": "dir", "path": str(tmp_path / "src"), "name": "d"},
               {"kind": "jsonl", "path": str(tmp_path / "in.jsonl"), "name": "j"}]
    first = run_corpus(tmp_path, sources)
    assert _texts(tmp_path) == ["x = 1\n", "y = 1\n"]
    (tmp_path / "src" / "a.py").write_text("x = 2\n")   # same size: was "nothing to redo"
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": "j", "text": "y = 2\n", "path": "j.py"}) + "\n")
    second = run_corpus(tmp_path, sources)
    assert _texts(tmp_path) == ["x = 2\n", "y = 2\n"]
    assert second["fingerprint"] != first["fingerprint"]


def test_a_file_edited_between_listing_and_reading_fails_the_stage_and_a_rerun_takes_it(
        tmp_path, monkeypatch):
    from codeworld.storage import StorageError

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("x = 1\n")
    listed = corpus.list_candidates

    def list_then_edit(*args, **kwargs):
        out = listed(*args, **kwargs)
        (tmp_path / "src" / "a.py").write_text("x = 22\n")   # after its sha256 was taken
        return out

    monkeypatch.setattr(corpus, "list_candidates", list_then_edit)
    sources = [{"kind": "dir", "path": str(tmp_path / "src"), "name": "d"}]
    with pytest.raises(StorageError, match="a.py: changed while the corpus stage ran") as failed:
        run_corpus(tmp_path, sources)
    assert failed.value.transient   # exit 75: the flow's retry lists the file again
    monkeypatch.setattr(corpus, "list_candidates", listed)
    run_corpus(tmp_path, sources)
    assert _texts(tmp_path) == ["x = 22\n"]


def test_the_file_hash_cache_rehashes_only_changed_files_and_never_changes_results(tmp_path, monkeypatch):
    import hashlib
    import os

    from stages.corpus_sources import FileHashes

    monkeypatch.setattr(FileHashes, "RECENT_NS", 0)   # the files here were written just now
    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        (src / f"m{i}.py").write_text(f"v = {i}\n")
    hashed: list[str] = []
    digest = hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda fh, algo: hashed.append(fh.name) or digest(fh, algo))
    sources = [{"kind": "dir", "path": str(src), "name": "s"}]
    run_corpus(tmp_path, sources)
    assert len(hashed) == 5
    assert list((tmp_path / "data" / ".work" / "file-hashes").iterdir()) == [
        tmp_path / "data" / ".work" / "file-hashes" / "corpus.json"]
    # Same size, and the mtime put back (cp -p, touch -r): the ctime still tells the change.
    st = os.stat(src / "m3.py")
    (src / "m3.py").write_text("v = 9\n")
    os.utime(src / "m3.py", ns=(st.st_atime_ns, st.st_mtime_ns))
    hashed.clear()
    run_corpus(tmp_path, sources)
    assert hashed == [str(src / "m3.py")]
    assert _texts(tmp_path) == ["v = 0\n", "v = 1\n", "v = 2\n", "v = 9\n", "v = 4\n"]
    reference = (tmp_path / "data" / "corpus" / "manifest.json").read_bytes()
    (tmp_path / "data" / ".work" / "file-hashes" / "corpus.json").write_text("{broken")
    (tmp_path / "data" / "corpus" / "manifest.json").unlink()
    run_corpus(tmp_path, sources)   # an unusable cache: everything rehashed, same dataset
    assert (tmp_path / "data" / "corpus" / "manifest.json").read_bytes() == reference


def test_a_jsonl_line_nested_too_deeply_is_a_bad_record(tmp_path):
    good = json.dumps({"id": "a", "text": "x = 1\n", "path": "a.py"})
    (tmp_path / "in.jsonl").write_text(good + "\n" + "[" * 200_000 + "\n")
    m = run_corpus(tmp_path, [{"kind": "jsonl", "path": str(tmp_path / "in.jsonl")}])
    assert m["records"] == 1 and m["stats"]["counts"]["bad_records"] == 1
    assert "in.jsonl:2: not JSON this reader can parse: nested too deeply" in m["stats"]["bad_records"][0]


def test_a_missing_file_is_unreadable_but_an_io_error_fails_the_stage_naming_it(tmp_path, monkeypatch):
    import errno

    from codeworld import storage
    from codeworld.storage import StorageError

    src = tmp_path / "src"
    src.mkdir()
    for name in ("a.py", "b.py", "gone.py"):
        (src / name).write_text(f"# {name}\n")
    real_open = open

    def flaky_open(path, *args, **kw):
        if str(path).endswith("gone.py"):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        if str(path).endswith("b.py"):
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real_open(path, *args, **kw)

    monkeypatch.setattr(storage, "open", flaky_open, raising=False)   # the workers' reads only
    sources = [{"kind": "dir", "path": str(src), "name": "s"}]
    with pytest.raises(StorageError, match=r"src/b\.py: cannot read: OSError: \[Errno 5\]"):
        run_corpus(tmp_path, sources)   # was counted unreadable, and the dataset final
    assert not (tmp_path / "data" / "corpus" / "manifest.json").exists()
    monkeypatch.setattr(storage, "open", lambda path, *a, **kw: (   # the disk recovered
        flaky_open if str(path).endswith("gone.py") else real_open)(path, *a, **kw))
    m = run_corpus(tmp_path, sources)   # the rerun: only the missing file is skipped
    assert m["records"] == 2 and m["stats"]["counts"]["skipped_unreadable"] == 1
    assert m["stats"]["examples"] == [{"reason": "unreadable", "source": "s", "path": "gone.py",
                                       "detail": "No such file or directory"}]


def test_a_missing_git_object_is_unreadable_not_an_io_failure(tmp_path):
    from stages.corpus_sources import GitReader

    subprocess.run(["git", "init", "-q", str(tmp_path / "repo")], check=True)
    git = GitReader()
    try:
        with pytest.raises(FileNotFoundError, match="object 0{40} missing"):
            git.read(str(tmp_path / "repo"), "0" * 40)
    finally:
        git.close()


def test_a_git_object_cut_short_fails_naming_the_repository_and_path():
    import io

    from codeworld.storage import StorageError
    from stages.corpus_sources import Candidate, GitReader, read_bytes

    sha = "ab" * 20

    class Cut:   # a cat-file that dies after 5 of the object's 100 bytes
        stdin = io.BytesIO()
        stdout = io.BytesIO(f"{sha} blob 100\n".encode() + b"short")
        killed = False

        def kill(self):
            self.killed = True

        def wait(self):
            return -9

    git = GitReader()
    git.procs["/r/repo"] = proc = Cut()
    c = Candidate("g", "git", f"/r/repo\0{sha}", "pkg/a.py", 100, None, content=sha)
    with pytest.raises(StorageError, match=rf"^pkg/a\.py: git /r/repo: object {sha}: cat-file gave 5 "
                                           "of its 100 bytes$"):
        read_bytes(c, git, None)   # was b"short", ingested as the file's text
    assert proc.killed and git.procs == {}   # the next read starts a new cat-file


def test_records_keep_their_own_ids_and_a_repeated_id_is_a_bad_record(tmp_path):
    rows = [{"id": "r1", "text": "a = 1\n", "path": "setup.py"},
            {"id": "r2", "text": "b = 2\n", "path": "setup.py"},   # another repository's setup.py
            {"id": "r1", "text": "c = 3\n", "path": "c.py"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = run_corpus(tmp_path, [{"kind": "jsonl", "path": str(tmp_path / "in.jsonl"), "name": "j"}])
    recs = list(Dataset.open(str(tmp_path / "data" / "corpus")))   # were two records "j/setup.py"
    assert [(r["id"], r["path"], r["text"]) for r in recs] == [("j/r1", "setup.py", "a = 1\n"),
                                                               ("j/r2", "setup.py", "b = 2\n")]
    assert m["stats"]["bad_records"] == [f"{tmp_path / 'in.jsonl'}:3: duplicate id 'r1' (first one kept)"]
    assert m["stats"]["counts"]["bad_records"] == 1


def test_a_corpus_of_several_folders_ingested_again_keeps_distinct_ids(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.py").write_text(f"x = {name!r}\n")
    run_corpus(tmp_path, [{"kind": "dir", "path": str(tmp_path / n)} for n in ("a", "b")])
    (tmp_path / "again").mkdir()
    run_corpus(tmp_path / "again", [{"kind": "shards", "path": str(tmp_path / "data" / "corpus"),
                                     "name": "c"}])
    recs = list(Dataset.open(str(tmp_path / "again" / "data" / "corpus")))
    assert [(r["id"], r["path"]) for r in recs] == [("c/a/x.py", "x.py"), ("c/b/x.py", "x.py")]


def test_a_shards_record_that_is_not_an_object_fails_naming_it(tmp_path):
    from codeworld.shards import DatasetWriter
    from codeworld.storage import Storage

    writer = DatasetWriter(Storage(str(tmp_path)), "other", "fp")
    writer.prepare()
    writer.finish([writer.write(0, [{"id": "a", "text": "x = 1\n"}, [1, 2]])])
    with pytest.raises(SourceError) as err:   # was AttributeError: 'list' object has no attribute 'get'
        run_corpus(tmp_path, [{"kind": "shards", "path": str(tmp_path / "other"), "name": "o"}])
    assert str(err.value) == f"source 'o': {tmp_path / 'other'}#1: not a JSON object (list)"


MIT = "MIT License\n\nPermission is hereby granted, free of charge, to any person ...\n"
APACHE = "                Apache License\n           Version 2.0, January 2004\n\nTERMS AND CONDITIONS\n"
GPL = "        GNU GENERAL PUBLIC LICENSE\n           Version 3, 29 June 2007\n\nPreamble\n"


@pytest.mark.parametrize("text, label", [
    # The MPL-2.0 names the GPL among its "Secondary Licenses": a mention, not its license.
    ("Mozilla Public License Version 2.0\n==================================\n\n1.12. \"Secondary "
     "License\"\n    means either the GNU General Public License, Version 2.0, the GNU Lesser\n"
     "    General Public License, Version 2.1, or any later versions\n", "MPL-2.0"),
    # hypothesis: a preamble in its own words, then the MPL text
    ("Copyright (c) 2013, someone\n\nAll code here is released\nunder the Mozilla Public License "
     "v 2.0.\n", "MPL-2.0"),
    # numpy, scipy: their BSD text, then the GPL texts of the libraries their wheels bundle
    ("Copyright (c) 2005, someone\nAll rights reserved.\n\nRedistribution and use in source and "
     "binary forms, with or without\nmodification, are permitted ...\n" + "\n" * 40 + "libgcc:\n"
     + GPL + "it under the terms of the GNU General Public License as published by\n", "BSD"),
    # sympy: BSD first, a bundled MIT text after it
    ("Redistribution and use in source and binary forms ...\n\n" + MIT, "BSD"),
    ("GNU LESSER GENERAL PUBLIC LICENSE\n  Version 3, 29 June 2007\n\nThis version incorporates the "
     "terms of version 3 of the GNU General Public License, supplemented ...\n", "LGPL"),
    (GPL + "  The GNU General Public License is a free, copyleft license\n", "GPL"),
    ("Python was created ... Historically, most Python releases have also been GPL-compatible,\n"
     "unlike the GNU General Public License (GPL) ...\n\nPYTHON SOFTWARE FOUNDATION LICENSE VERSION 2\n"
     "--------------------------------------------\n", "PSF-2.0"),
    (APACHE, "Apache-2.0"),
    (MIT, "MIT"),
    ("We do not use the GNU General Public License.\n", "unknown"),
])
def test_a_license_is_named_by_its_own_text_not_by_licenses_it_mentions(text, label):
    from stages.corpus_sources import classify_license

    assert classify_license(text) == label


def test_an_installed_package_takes_the_license_of_the_distribution_that_installs_it(tmp_path):
    # Import names differ from distribution names (yaml: PyYAML, attr: attrs, dateutil:
    # python-dateutil), and a module may be one file (six.py): all were None.
    site = tmp_path / "lib" / "site-packages"
    files = {"yaml/__init__.py": "", "PyYAML-6.0.dist-info/LICENSE": MIT,
             "PyYAML-6.0.dist-info/RECORD": "yaml/__init__.py,sha256=x,1\n_yaml/__init__.py,,\n"
                                            "PyYAML-6.0.dist-info/RECORD,,\n../../bin/yaml,,\n",
             "attr/__init__.py": "", "attrs-26.1.0.dist-info/licenses/LICENSE": MIT,
             "attrs-26.1.0.dist-info/RECORD": "attr/__init__.py,,\nattrs/__init__.py,,\n",
             "dateutil/tz/tz.py": "", "python_dateutil-2.9.dist-info/top_level.txt": "dateutil\n",
             "python_dateutil-2.9.dist-info/LICENSE": APACHE,
             "six.py": "", "six-1.17.0.dist-info/LICENSE": MIT,
             "orphan.py": "", "nometa/__init__.py": ""}
    for rel, text in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
    (tmp_path / "lib" / "LICENSE").write_text("PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2\n")
    (tmp_path / "lib" / "os.py").write_text("")
    run_corpus(tmp_path, [{"kind": "dir", "path": str(tmp_path / "lib"), "name": "lib"}])
    licenses = {r["path"]: r["license"] for r in Dataset.open(str(tmp_path / "data" / "corpus"))}
    assert licenses == {"os.py": "PSF-2.0", "site-packages/yaml/__init__.py": "MIT",
                        "site-packages/attr/__init__.py": "MIT",
                        "site-packages/dateutil/tz/tz.py": "Apache-2.0",
                        "site-packages/six.py": "MIT", "site-packages/orphan.py": None,
                        "site-packages/nometa/__init__.py": None}


def test_an_unreadable_license_file_is_counted_not_fatal(tmp_path, monkeypatch):
    import errno

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "LICENSE").write_text(MIT)
    (src / "sub" / "LICENSE").write_text(APACHE)
    (src / "a.py").write_text("a = 1\n")
    (src / "sub" / "b.py").write_text("b = 2\n")
    real_open = Path.open

    def refused(self, *args, **kw):   # root reads any file: the refusal a user meets is made here
        if self == src / "sub" / "LICENSE":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_open(self, *args, **kw)

    monkeypatch.setattr(Path, "open", refused)
    m = run_corpus(tmp_path, [{"kind": "dir", "path": str(src), "name": "s"}])   # was fatal
    assert {r["path"]: r["license"] for r in Dataset.open(str(tmp_path / "data" / "corpus"))} == {
        "a.py": "MIT", "sub/b.py": "unreadable"}
    assert m["stats"]["counts"]["skipped_unreadable_license"] == 1
    assert m["stats"]["examples"] == [{"reason": "unreadable_license", "source": "s",
                                       "path": "sub/LICENSE", "detail": "Permission denied"}]


def _commit(repo: Path) -> str:
    git = ["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-qm", "one"], check=True)
    return subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def _write_tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def _licenses_of_checkout_and_commit(repo: Path):
    """({"d": {path: license}, "g": ...}, skipped): `repo` listed as a folder and as its git
    commit (made here), which must label every file alike."""
    from codeworld.config import CorpusConfig
    from stages.corpus_sources import list_candidates

    commit = _commit(repo)
    cfg = CorpusConfig.model_validate({"sources": [
        {"kind": "dir", "path": str(repo), "name": "d"},
        {"kind": "git", "path": str(repo), "commit": commit, "name": "g"}]})
    listed, _, skipped = list_candidates(cfg)
    return {s: {c.path: c.license for c in listed if c.source == s} for s in ("d", "g")}, skipped


def test_a_git_commit_and_its_checkout_give_the_same_licenses(tmp_path):
    repo = tmp_path / "repo"
    _write_tree(repo, {"COPYING": GPL, "LICENSE": MIT, "a.py": "a = 1\n",   # both apply
                       "sub/COPYING": GPL, "sub/LICENSE.txt": APACHE, "sub/deep/b.py": "b = 2\n",
                       "other/c.py": "c = 3\n"})
    by_source, _ = _licenses_of_checkout_and_commit(repo)
    assert by_source["d"] == {"a.py": "GPL AND MIT", "sub/deep/b.py": "Apache-2.0 AND GPL",
                              "other/c.py": "GPL AND MIT"}
    assert by_source["g"] == by_source["d"]   # was GPL for all: the first top-level one listed


@pytest.mark.parametrize("text, label", [
    # PyPA's (cryptography, packaging) and Trio's (trio, sniffio, outcome) LICENSE: the texts
    # are in other files, named by the choice.
    ("This software is made available under the terms of *either* of the licenses\nfound in "
     "LICENSE.APACHE or LICENSE.BSD. Contributions to cryptography are made\nunder the terms of "
     "*both* these licenses.\n", "Apache-2.0 OR BSD"),
    ("This software is made available under the terms of *either* of the\nlicenses found in "
     "LICENSE.APACHE2 or LICENSE.MIT. Contributions to\nTrio are made under the terms of *both* "
     "these licenses.\n", "Apache-2.0 OR MIT"),
    # The Rust convention, its options a list
    ("Licensed under either of\n\n * Apache License, Version 2.0\n   ([LICENSE-APACHE](LICENSE-APACHE)"
     " or http://www.apache.org/licenses/LICENSE-2.0)\n * MIT license\n   ([LICENSE-MIT](LICENSE-MIT)"
     " or http://opensource.org/licenses/MIT)\n\nat your option.\n", "Apache-2.0 OR MIT"),
    # An SPDX expression, bare or as an identifier line; the options in one order whatever the text's
    ("MIT OR Apache-2.0\n", "Apache-2.0 OR MIT"),
    ("SPDX-License-Identifier: Apache-2.0 OR MIT\n", "Apache-2.0 OR MIT"),
    # The choice, then both texts: was the first text alone
    ("This project is dual-licensed under the MIT license or the Apache License 2.0, at your "
     "option.\n\n" + MIT + "\n" + APACHE, "Apache-2.0 OR MIT"),
    # No choice: "either" in the GPL's "or any later version" and Apache's "express or implied"
    ("This library is free software; you can redistribute it and/or modify it under the terms of "
     "the GNU Lesser General Public License as published by the Free Software Foundation; either\n"
     "version 2.1 of the License, or (at your option) any later version.\n\nSee the GNU General "
     "Public License for more details.\n", "LGPL"),
    ("Licensed under the Apache License, Version 2.0 (the \"License\");\n...distributed on an "
     "\"AS IS\" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.\n"
     "See the License for the specific language governing permissions and\nlimitations under the "
     "License. The MIT-licensed parts...\n", "Apache-2.0"),
    # The MPL-2.0's "Secondary License" means "either the GNU General Public License, ...":
    # certifi's copy, whose title spans two lines, was AGPL OR GPL OR LGPL
    ("Mozilla Public License\nVersion 2.0\n\n1. Definitions\n\n1.5. \u201cIncompatible With "
     "Secondary Licenses\u201d\nmeans\n...\n1.12. \u201cSecondary License\u201d\nmeans either the "
     "GNU General Public License, Version 2.0, the GNU Lesser General Public License, Version "
     "2.1, the GNU Affero General Public License, Version 3.0, or any later versions of those "
     "licenses.\n", "MPL-2.0"),
    # parso, libcst: some files under both (AND), the whole MIT
    ("All contributions towards parso are MIT licensed.\n\nSome Python files have been taken from "
     "the standard library and are therefore\nPSF licensed. Modifications on these files are dual "
     "licensed (both MIT and\nPSF).\n\n" + MIT, "MIT"),
    # A choice that covers bundled code, after the file's own license text
    (MIT + "\nvendor/ holds code available under either the BSD or the Apache License 2.0.\n", "MIT"),
    # Two texts without a choice stay the first (a bundled license follows the file's own)
    (MIT + "\n" + APACHE, "MIT"),
])
def test_a_dual_license_is_the_expression_of_its_options(text, label):
    # Were "unknown" (no text, no notice) or the first text alone.
    from stages.corpus_sources import classify_license

    assert classify_license(text) == label


def test_a_license_file_that_is_a_link_is_followed_only_within_the_source(tmp_path):
    # A LICENSE link leading out of the tree was read (a file of this machine, no part of the
    # source, classified into its files' license); in git sources every LICENSE link was passed
    # over (its folder took its parent's license) where a checkout followed it.

    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "LICENSE").write_text(GPL)
    repo = tmp_path / "repo"
    links = {"inside/LICENSE": "../legal/MIT.txt", "escape/LICENSE": "../../outside/LICENSE",
             "abs/LICENSE": str(tmp_path / "outside" / "LICENSE"), "dangling/LICENSE": "gone",
             "site-packages/pkg-1.0.dist-info/LICENSE": "../../../outside/LICENSE"}
    files = {"LICENSE": APACHE, "a.py": "", "legal/MIT.txt": MIT, "inside/b.py": "",
             "escape/c.py": "", "abs/d.py": "", "dangling/e.py": "",
             "site-packages/pkg/__init__.py": "",
             "site-packages/pkg-1.0.dist-info/RECORD": "pkg/__init__.py,,\n"}
    _write_tree(repo, files)
    for rel, target in links.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).symlink_to(target)
    by_source, skipped = _licenses_of_checkout_and_commit(repo)
    assert by_source["d"] == {"a.py": "Apache-2.0", "inside/b.py": "MIT", "escape/c.py": "unreadable",
                              "abs/d.py": "unreadable", "dangling/e.py": "unreadable",
                              "site-packages/pkg/__init__.py": "unreadable"}
    assert by_source["g"] == by_source["d"]
    outside = "symlink to a file outside the source, not followed"
    counted = {(s["path"], s["detail"]) for s in skipped if s["reason"] == "unreadable_license"}
    assert counted == {("escape/LICENSE", outside), ("abs/LICENSE", outside),
                       ("dangling/LICENSE", "No such file or directory"),
                       ("site-packages/pkg-1.0.dist-info/LICENSE", outside)}
    assert sorted(s["source"] for s in skipped) == ["d"] * 4 + ["g"] * 4


def test_a_license_file_of_another_common_name_is_found_in_its_folder(tmp_path):
    # LICENSE.rst (Pallets), LICENSE-MIT and LICENSE-APACHE (the Rust convention), license.txt,
    # COPYING.LESSER: none was looked for, so a vendored package took the license of the tree
    # above it (GPL for MIT code). A module named license.py is code, not a license file.

    repo = tmp_path / "repo"
    files = {"COPYING": GPL, "main.py": "x = 1\n",
             "vendor/click/LICENSE.rst": MIT, "vendor/click/core.py": "c = 1\n",
             "vendor/rusty/LICENSE-APACHE": APACHE, "vendor/rusty/lib.py": "r = 1\n",
             "vendor/lower/license.txt": MIT, "vendor/lower/deep/m.py": "m = 1\n",
             "vendor/lesser/COPYING.LESSER": GPL.replace("GNU GENERAL", "GNU LESSER GENERAL"),
             "vendor/lesser/l.py": "l = 1\n",
             "tools/license.py": "def show():\n    pass\n", "tools/t.py": "t = 1\n"}
    _write_tree(repo, files)
    by_source, _ = _licenses_of_checkout_and_commit(repo)
    assert by_source["d"] == {"main.py": "GPL", "vendor/click/core.py": "MIT",
                              "vendor/rusty/lib.py": "Apache-2.0",
                              "vendor/lower/deep/m.py": "MIT", "vendor/lesser/l.py": "LGPL",
                              "tools/license.py": "GPL", "tools/t.py": "GPL"}
    assert by_source["g"] == by_source["d"]


def test_a_records_language_is_matched_whatever_its_case(tmp_path):
    # Public code datasets label records "Python", "JavaScript": every one was skipped as the
    # wrong language for extensions [".py"], and kept ones keep the stage's own name.
    recs = [{"id": f"r{i}", "text": f"def f{i}():\n    return {i}\n", "language": lang}
            for i, lang in enumerate(["Python", "PYTHON", "python", "JavaScript"])]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    m = run_corpus(tmp_path, [{"kind": "jsonl", "path": str(tmp_path / "in.jsonl"), "name": "j"}])
    assert m["stats"]["counts"]["skipped_language"] == 1
    assert [(r["id"], r["language"]) for r in Dataset.open(str(tmp_path / "data" / "corpus"))] == [
        ("j/r0", "python"), ("j/r1", "python"), ("j/r2", "python")]


BSD = "BSD 3-Clause License\n\nRedistribution and use in source and binary forms, with or without\n"
LGPL = GPL.replace("GNU GENERAL", "GNU LESSER GENERAL")
CHOICE = ("This software is made available under the terms of *either* of the licenses\nfound in "
          "LICENSE.APACHE or LICENSE.BSD. Contributions are made under the terms of\n*both* these licenses.\n")


def test_a_folder_with_several_license_files_takes_all_of_them(tmp_path):
    # The first file by name was the folder's license: LICENSE-APACHE beside LICENSE-MIT (a dual
    # license) was "Apache-2.0", COPYING beside COPYING.LESSER (an LGPL-3.0 project) "GPL",
    # and MIT code that also ships the GPL "MIT" (the GPL's terms lost).

    repo = tmp_path / "repo"
    files = {"rusty/LICENSE-APACHE": APACHE, "rusty/LICENSE-MIT": MIT, "rusty/r.py": "r = 1\n",
             "lesser/COPYING": GPL, "lesser/COPYING.LESSER": LGPL, "lesser/l.py": "l = 1\n",
             "both/LICENSE": MIT, "both/COPYING": GPL, "both/b.py": "b = 1\n",
             "pypa/LICENSE": CHOICE, "pypa/LICENSE.APACHE": APACHE, "pypa/LICENSE.BSD": BSD,
             "pypa/p.py": "p = 1\n",
             "bundles/LICENSE.txt": BSD, "bundles/LICENSES_bundled.txt": GPL, "bundles/n.py": "n = 1\n",
             "same/LICENSE": MIT, "same/LICENSE.md": MIT, "same/s.py": "s = 1\n",
             "odd/LICENSE": MIT, "odd/LICENSE-EXTRA": "Some terms of our own.\n", "odd/o.py": "o = 1\n"}
    _write_tree(repo, files)
    by_source, _ = _licenses_of_checkout_and_commit(repo)
    assert by_source["d"] == {"rusty/r.py": "Apache-2.0 OR MIT", "lesser/l.py": "LGPL",
                              "both/b.py": "GPL AND MIT", "pypa/p.py": "Apache-2.0 OR BSD",
                              "bundles/n.py": "BSD", "same/s.py": "MIT", "odd/o.py": "MIT AND unknown"}
    assert by_source["g"] == by_source["d"]


def test_an_installed_package_takes_its_own_license_files_not_its_bundled_ones(tmp_path):
    # orjson's dist-info holds license_files/LICENSE-APACHE and LICENSE-MIT (its METADATA:
    # "Apache-2.0 OR MIT"): it was "Apache-2.0". numpy's holds licenses/LICENSE.txt and, deeper,
    # the licenses of code it bundles at their paths: those are not numpy's own.
    tree = {"site-packages/orjson/__init__.py": "o = 1\n",
            "site-packages/orjson-3.8.3.dist-info/license_files/LICENSE-APACHE": APACHE,
            "site-packages/orjson-3.8.3.dist-info/license_files/LICENSE-MIT": MIT,
            "site-packages/numpy/__init__.py": "n = 1\n",
            "site-packages/numpy-2.4.6.dist-info/licenses/LICENSE.txt": BSD,
            "site-packages/numpy-2.4.6.dist-info/licenses/numpy/ma/LICENSE": GPL}
    for rel, text in tree.items():
        (tmp_path / "lib" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "lib" / rel).write_text(text)
    run_corpus(tmp_path, [{"kind": "dir", "path": str(tmp_path / "lib"), "name": "s"}])
    assert {r["path"]: r["license"] for r in Dataset.open(str(tmp_path / "data" / "corpus"))} == {
        "site-packages/orjson/__init__.py": "Apache-2.0 OR MIT", "site-packages/numpy/__init__.py": "BSD"}


def test_a_license_filter_admits_a_choice_by_one_option_and_a_combination_by_all(tmp_path):
    # A permissive-only corpus: "Apache-2.0 OR MIT" is usable under MIT alone; "GPL AND MIT"
    # (MIT code shipping the GPL) is not, nor a file under no license file at all.
    repo = tmp_path / "repo"
    files = {"rusty/LICENSE-APACHE": APACHE, "rusty/LICENSE-MIT": MIT, "rusty/r.py": "r = 1\n",
             "both/LICENSE": MIT, "both/COPYING": GPL, "both/b.py": "b = 1\n",
             "gpl/COPYING": GPL, "gpl/g.py": "g = 1\n", "mit/LICENSE": MIT, "mit/m.py": "m = 1\n",
             "bare.py": "x = 1\n"}
    _write_tree(repo, files)
    m = run_corpus(tmp_path, [{"kind": "dir", "path": str(repo), "name": "d"}],
                   corpus={"licenses": ["MIT", "BSD", "PSF-2.0"]})
    kept = {r["path"]: r["license"] for r in Dataset.open(str(tmp_path / "data" / "corpus"))}
    assert kept == {"rusty/r.py": "Apache-2.0 OR MIT", "mit/m.py": "MIT"}
    assert m["stats"]["counts"]["skipped_license"] == 3
    assert {(e["path"], e["detail"]) for e in m["stats"]["examples"] if e["reason"] == "license"} == {
        ("both/b.py", "GPL AND MIT"), ("gpl/g.py", "GPL"), ("bare.py", "none")}


def test_a_license_filter_naming_no_label_is_refused(tmp_path):
    (tmp_path / "a.py").write_text("a = 1\n")
    with pytest.raises(ValueError, match=r"corpus\.licenses: 'GPL-3.0' is no license label"):
        run_corpus(tmp_path, [{"kind": "dir", "path": str(tmp_path), "name": "d"}],
                   corpus={"licenses": ["MIT", "GPL-3.0"]})


def test_a_choice_beside_an_unrelated_license_is_a_combination_with_it():
    # PyPA's choice file beside a GPL COPYING the choice does not name: both apply, the choice
    # through one option, the GPL whatever the choice.
    from stages.corpus_sources import combine_licenses, license_admitted

    label = combine_licenses([("LICENSE", "Apache-2.0 OR BSD"), ("LICENSE.APACHE", "Apache-2.0"),
                              ("COPYING", "GPL")])
    assert label == "(Apache-2.0 OR BSD) AND GPL"
    assert not license_admitted(label, frozenset({"BSD", "Apache-2.0"}))
    assert license_admitted(label, frozenset({"Apache-2.0", "GPL"}))
    assert combine_licenses([("COPYING", "GPL"), ("LICENSE", "unreadable")]) == "unreadable"
