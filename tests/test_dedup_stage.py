import json
import subprocess
import sys

from codeworld.config import load_params
from codeworld.shards import Dataset
from stages import corpus, dedup
from tests.helpers import STDLIB, make_tree, write_params


def build(tmp_path, name="data", **over):
    src = tmp_path / "tree"
    if not src.exists():
        make_tree(tmp_path)
    (src / "empties").mkdir(exist_ok=True)
    for i in range(3):  # empty files: exact dedup keeps one
        (src / "empties" / f"e{i}.py").write_text("" if i else "\n\n")
    params = load_params(write_params(tmp_path / f"{name}.yaml", tmp_path / name,
                                      [{"kind": "dir", "path": str(src), "name": "t"}], **over))
    corpus.run(params, track=False, metrics_path=None)
    return dedup.run(params, track=False, metrics_path=str(tmp_path / f"{name}-metrics.json"))


def test_exact_and_near_duplicates_removed_with_report(tmp_path):
    m = build(tmp_path)
    report = json.loads((tmp_path / "data" / "dedup" / "report.json").read_text())
    removed = {r["id"]: r for r in report["removed"]}
    assert removed["t/json/decoder.py"] == {"id": "t/json/decoder.py", "step": "exact",
                                            "representative": "t/copies/decoder_copy.py"}
    assert removed["t/json/encoder.py"]["step"] == "exact"  # CRLF copy sorts first
    assert removed["t/json/encoder.py"]["representative"] == "t/copies/encoder_crlf.py"
    near = removed["t/copies/encoder_edit.py"]
    assert near["step"] == "near" and near["representative"] == "t/copies/encoder_crlf.py"
    assert 0.7 <= near["jaccard"] < 1.0
    # empty files: one survives, the rest are exact duplicates of it
    kept_ids = {r["id"] for r in Dataset.open(str(tmp_path / "data" / "dedup"))}
    empties = {f"t/empties/e{i}.py" for i in range(3)} | {"t/copies/__init__.py"}
    assert len(empties & kept_ids) == 1
    assert "t/json/scanner.py" in kept_ids
    stats = m["stats"]
    assert stats["documents"] == stats["kept"] + stats["removed_exact"] + stats["removed_near"]
    assert stats["removed_near"] >= 1 and stats["near_clusters"]["largest"]["size"] >= 2
    assert set(removed) & kept_ids == set()
    metrics = json.loads((tmp_path / "data-metrics.json").read_text())
    assert metrics["kept"] == m["records"]


def test_dedup_is_deterministic_across_workers(tmp_path):
    build(tmp_path, "a", dedup={"workers": 1})
    build(tmp_path, "b", dedup={"workers": 2})
    for f in ("manifest.json", "report.json", "shard-00000.tar"):
        assert (tmp_path / "a/dedup" / f).read_bytes() == (tmp_path / "b/dedup" / f).read_bytes()


def test_adhoc_cli_on_jsonl(tmp_path):
    texts = {name: (STDLIB / "json" / name).read_text() for name in ("decoder.py", "encoder.py", "scanner.py")}
    rows = [{"id": "dec", "text": texts["decoder.py"]},
            {"id": "enc", "text": texts["encoder.py"]},
            {"id": "enc2", "text": texts["encoder.py"].replace("Encoder", "Coder", 3)},
            {"id": "dec-copy", "text": texts["decoder.py"] + "\n\n"},
            {"id": "scan", "text": texts["scanner.py"], "extra": [1, 2]}]
    lines = [json.dumps(r) for r in rows] + ["{broken", json.dumps({"id": "dec", "text": "dup id"})]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    out = subprocess.run([sys.executable, "-m", "codeworld.cli", "dedup", "in.jsonl", "out.jsonl"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    kept = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [k["id"] for k in kept] == ["dec", "enc", "scan"]
    assert kept[2]["extra"] == [1, 2]  # other fields pass through
    report = json.loads((tmp_path / "out.jsonl.report.json").read_text())
    assert {(r["id"], r["representative"], r["step"]) for r in report["removed"]} == {
        ("enc2", "enc", "near"), ("dec-copy", "dec", "exact")}
    assert len(report["bad_records"]) == 2 and "in.jsonl:6" in report["bad_records"][0]


def test_adhoc_dedup_of_a_dataset_counts_records_without_text(tmp_path, monkeypatch):
    from codeworld.shards import DatasetWriter
    from codeworld.storage import Storage
    from stages.adhoc import dedup_adhoc

    text = (STDLIB / "json" / "decoder.py").read_text()
    w = DatasetWriter(Storage(str(tmp_path)), "traces", "fp-of-another-stage")
    w.prepare()
    w.finish([w.write(0, [{"id": "a", "text": text}, {"id": "b", "trace": []},
                          {"id": "c", "text": text}, {"text": "no id"}])])
    monkeypatch.chdir(tmp_path)
    dedup_adhoc("traces", "out", workers=1)   # was a bare KeyError: 'text'
    assert [r["id"] for r in Dataset.open(str(tmp_path / "out"))] == ["a"]
    report = json.loads((tmp_path / "out.report.json").read_text())
    assert report["bad_records"] == ["traces#1: needs string field 'text' and field 'id'",
                                     "traces#3: needs string field 'text' and field 'id'"]
    assert report["stats"]["removed_exact"] == 1


def test_adhoc_dedup_counts_a_line_with_a_lone_surrogate(tmp_path):
    from stages.adhoc import dedup_adhoc

    text = (STDLIB / "json" / "scanner.py").read_text()
    lines = [json.dumps({"id": "a", "text": text}),
             '{"id": "b", "text": "x = 1\\ud800"}',                  # valid JSON, no UTF-8
             '{"id": "c", "text": "y = 2", "meta": {"note": "\\udfff"}}',
             json.dumps({"id": "d", "text": "z = 3\n"})]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    # was a UnicodeEncodeError, and nothing written
    report = dedup_adhoc(str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), workers=1)
    kept = [json.loads(line)["id"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert kept == ["a", "d"]
    assert report["bad_records"] == [
        f"{tmp_path / 'in.jsonl'}:2: field 'text' is not valid UTF-8 (a lone surrogate)",
        f"{tmp_path / 'in.jsonl'}:3: field 'meta' is not valid UTF-8 (a lone surrogate)"]


def test_an_exact_copy_of_a_near_duplicate_names_the_kept_document(tmp_path):
    from stages.adhoc import dedup_adhoc

    enc = (STDLIB / "json" / "encoder.py").read_text()
    near = enc.replace("Encoder", "Coder", 3)
    rows = [{"id": "enc", "text": enc}, {"id": "near", "text": near},
            {"id": "near-copy", "text": near + "\n\n"}]   # exact duplicate of the removed "near"
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = dedup_adhoc(str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), workers=1)
    kept = [json.loads(line)["id"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert kept == ["enc"]
    removed = {r["id"]: r for r in report["removed"]}
    assert removed["near"]["representative"] == "enc" and removed["near"]["step"] == "near"
    # was "near", itself removed: the report named no document of the output
    assert removed["near-copy"] == {"id": "near-copy", "representative": "enc", "step": "exact",
                                    "via": "near"}
    assert {r["representative"] for r in report["removed"]} <= set(kept)


def test_a_copy_saved_with_a_utf8_bom_is_an_exact_duplicate():
    # An editor's byte order mark (U+FEFF, which Python ignores at a file's start) made a copy
    # another document: both were kept, the BOM in the training text.
    from stages.exact_dedup import content_key

    text = (STDLIB / "json" / "scanner.py").read_text()
    assert content_key("\ufeff" + text) == content_key(text) == content_key("\ufeff" + text.replace("\n", "\r\n"))
    assert content_key("x = '\ufeff'\n") != content_key("x = ''\n")   # one inside the text is content


# Two programs that differ only in trailing whitespace inside a triple-quoted string: the
# strings' values differ (a test's expected output), so they are different programs.
EXPECTED_A = 'def banner():\n    return """name   \nvalue  \n"""  \n\nprint(banner())\n'
EXPECTED_B = 'def banner():\n    return """name\nvalue\n"""\n\nprint(banner())\n'


def test_trailing_whitespace_inside_a_string_literal_is_content():
    # The exact key dropped each line's trailing whitespace, inside strings too: the two
    # programs above had one key and exact dedup removed one of them.
    from stages.exact_dedup import content_key, content_key_as

    assert content_key(EXPECTED_A) != content_key(EXPECTED_B)
    # Outside strings it is still layout: after the closing quote, after code, blank lines.
    assert content_key(EXPECTED_A) == content_key(EXPECTED_A.replace('"""  \n', '"""\n')
                                                  .replace("print(banner())", "print(banner())   ") + "\n \n")
    assert content_key_as(EXPECTED_A) == (content_key(EXPECTED_A), "python")
    # f-strings and single-quoted triple strings are strings too
    assert content_key("x = f'''a  \n{y}'''\n") != content_key("x = f'''a\n{y}'''\n")
    assert content_key("x = '''a  \nb'''\n") != content_key("x = '''a\nb'''\n")
    # A file that does not tokenize (an unterminated string) takes the plain rule, said so.
    broken = 'x = """never closed   \n'
    assert content_key_as(broken) == (content_key('x = """never closed\n'), "untokenizable")
    # Another language: no tokenizer, the plain rule.
    assert content_key_as("s = `a  \nb`\n", "javascript") == (content_key("s = `a\nb`\n", "javascript"), "plain")


def test_dedup_reports_how_documents_were_normalised(tmp_path):
    from stages.adhoc import dedup_adhoc

    rows = [{"id": "a", "text": EXPECTED_A}, {"id": "b", "text": EXPECTED_B},
            {"id": "bad1", "text": 'x = """never closed   \n'}, {"id": "bad2", "text": 'x = """never closed\n'}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = dedup_adhoc(str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), workers=1)
    removed = {r["id"]: r for r in report["removed"]}
    # Token-identical, so still a near duplicate (Jaccard 1.0: near dedup's own call), but no
    # longer an exact one: the report said "exact" for two programs of different output.
    assert removed["b"] == {"id": "b", "representative": "a", "step": "near", "jaccard": 1.0}
    assert removed["bad2"]["step"] == "exact"   # the fallback's plain rule
    # bad2 has no trailing whitespace: never tokenized, both rules give its key.
    assert report["stats"]["normalised"] == {"python": 3, "untokenizable": 1, "plain": 0}


def test_a_dedup_output_names_the_python_whose_tokenizer_keyed_it(tmp_path, monkeypatch):
    # Exact keys depend on where the tokenizer finds strings, whose rules change between Python
    # versions: the same fingerprint on another interpreter could name other bytes.
    from codeworld.config import DedupConfig
    from codeworld.shards import DatasetWriter
    from codeworld.storage import Storage
    from stages import exact_dedup

    writer = DatasetWriter(Storage(str(tmp_path)), "src", "fp")
    writer.prepare()
    writer.finish([writer.write(0, [{"id": "a", "text": "x = 1\n"}])])
    source = Dataset.open(str(tmp_path / "src"))
    here = dedup.output_fingerprint(DedupConfig(), source)
    monkeypatch.setattr(exact_dedup, "TOKENIZER", "python3.99")
    assert dedup.output_fingerprint(DedupConfig(), source) != here
