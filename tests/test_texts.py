"""heal's training text the way people hold it: JSON Lines, Parquet and a Hub data set
(served by the local fake Hub, streamed through the datasets library), beside text files."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from bitquant.errors import TextError, UsageError
from bitquant.training import texts
from bitquant.training.texts import DataSpec
from conftest import DATA, REPO, make_heal_source
from fake_hub import FakeHub

BOOK = REPO / "bitquant" / "data" / "paradise-lost.txt"


def paragraphs(n: int = 60) -> list[str]:
    parts = [p.strip() for p in (DATA / "alice29.txt").read_text().split("\n\n") if len(p.strip()) > 200]
    return parts[:n]


def write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


def write_parquet(path, docs, field="text"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({field: docs, "id": list(range(len(docs)))}), path)
    return path


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def expected(tok, docs, eos, seq_len):
    ids = []
    for d in docs:
        ids += tok(d, add_special_tokens=False)["input_ids"] + [eos]
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_local_files_give_documents_joined_by_eos(tmp_path, tok, kind):
    docs = paragraphs()
    path = (write_jsonl if kind == "jsonl" else write_parquet)(tmp_path / f"d.{kind}", docs)
    ids, info = texts.load(DataSpec(str(path)), tok, 32, None, 1, 10**6)
    assert torch.equal(ids, expected(tok, docs, 1, 32))
    assert info["format"] == kind and info["sequences"] == len(ids) and not info["truncated"]


def test_reading_stops_at_the_tokens_the_run_needs(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", paragraphs())
    ids, info = texts.load(DataSpec(str(path)), tok, 32, None, 1, 320)
    assert ids.shape == (10, 32) and info["truncated"] and info["tokens"] == 320


def test_another_field_and_bos_sequences(tmp_path, tok):
    path = write_parquet(tmp_path / "d.parquet", paragraphs(), field="content")
    with pytest.raises(UsageError, match="has no column 'text' \\(it has: content, id\\); name the text column with --data-field"):
        texts.load(DataSpec(str(path)), tok, 32, None, 1, 10**6)
    ids, _ = texts.load(DataSpec(str(path), field="content"), tok, 32, 0, 1, 10**6)
    assert (ids[:, 0] == 0).all()  # a tokenizer that adds BOS: every sequence starts with it


def test_bad_sources_are_one_line_errors(tmp_path, tok):
    with pytest.raises(TextError, match="does not exist"):
        texts.load(DataSpec(str(tmp_path / "none.jsonl")), tok, 32, None, 1, 100)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(TextError, match="holds no text"):
        texts.load(DataSpec(str(tmp_path / "empty.jsonl")), tok, 32, None, 1, 100)
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(TextError, match="line 2 is not JSON"):
        texts.load(DataSpec(str(tmp_path / "bad.jsonl")), tok, 32, None, 1, 100)
    write_jsonl(tmp_path / "other.jsonl", ["some text"], field="body")
    with pytest.raises(UsageError, match="has no field 'text' \\(line 1 has: body, id\\)"):
        texts.load(DataSpec(str(tmp_path / "other.jsonl")), tok, 32, None, 1, 100)
    with pytest.raises(UsageError, match="is not a Hub data set id"):
        texts.load(DataSpec("hf:not a/valid id!"), tok, 32, None, 1, 100)


@pytest.fixture
def hub(tmp_path):
    with FakeHub() as h:
        yield h


def in_process_with_hub(code: str, hub: FakeHub, tmp_path) -> dict:
    """Run ``code`` in a fresh interpreter whose environment points huggingface_hub (and so
    the datasets library) at the fake Hub, as a user's shell would; its last line is JSON."""
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="0",
               HF_HUB_DISABLE_TELEMETRY="1", BITQUANT_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    try:
        return json.loads(proc.stdout)  # the whole output is one JSON document (bitquant heal --json)
    except json.JSONDecodeError:
        return json.loads(proc.stdout.strip().splitlines()[-1])


LOAD = """
import json, torch
from transformers import AutoTokenizer
from bitquant.training import texts
from bitquant.errors import BitquantError
tok = AutoTokenizer.from_pretrained({tok!r})
out = {{}}
for name, spec in {specs!r}:
    try:
        ids, info = texts.load(texts.DataSpec(spec), tok, 32, None, 1, 10**6, cache_dir=__import__("pathlib").Path({cache!r}),
                               model_key="m")
        out[name] = {{"ids": ids.tolist(), "info": info}}
    except BitquantError as e:
        out[name] = {{"error": e.message}}
print(json.dumps(out))
"""


def test_a_hub_data_set_streams_and_is_cached(hub, tmp_path, tok, tiny_tokenizer_dir):
    pytest.importorskip("datasets")
    docs = paragraphs()
    lines = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    hub.datasets["acme/books"] = {"data/train-00000-of-00001.jsonl": lines, "README.md": b"# books\n"}
    reads = lambda: sum(1 for _, path in hub.requests if "resolve" in path and path.endswith(".jsonl"))  # noqa: E731
    code = LOAD.format(tok=str(tiny_tokenizer_dir), specs=[("first", "hf:acme/books")], cache=str(tmp_path / "cache"))
    first = in_process_with_hub(code, hub, tmp_path)["first"]
    assert torch.equal(torch.tensor(first["ids"]), expected(tok, docs, 1, 32))
    info = first["info"]
    assert info["repo"] == "acme/books" and info["commit"] == "d" * 40 and info["cached"] is False
    before = reads()
    again = in_process_with_hub(code, hub, tmp_path)["first"]  # a second run: from the token cache
    assert again["ids"] == first["ids"] and again["info"]["cached"] is True and reads() == before


def test_a_missing_hub_data_set_or_field_is_one_line(hub, tmp_path, tiny_tokenizer_dir):
    pytest.importorskip("datasets")
    hub.datasets["acme/other"] = {"data/train.jsonl": b'{"body": "x"}\n'}
    code = LOAD.format(tok=str(tiny_tokenizer_dir), specs=[("missing", "hf:acme/nothing"), ("field", "hf:acme/other")],
                       cache=str(tmp_path / "cache"))
    out = in_process_with_hub(code, hub, tmp_path)
    assert "data set 'acme/nothing' was not found on the Hub" in out["missing"]["error"]
    assert "has no field 'text' (row 1 has: body)" in out["field"]["error"]


def test_an_unreachable_hub_is_one_line(tmp_path, tiny_tokenizer_dir):
    """Nothing listens at HF_ENDPOINT (a closed local port): a one-line error, not the HTTP
    client's traceback."""
    import socket

    with socket.socket() as s:  # a port that was free a moment ago, and is closed now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = LOAD.format(tok=str(tiny_tokenizer_dir), specs=[("down", "hf:acme/books")], cache=str(tmp_path / "cache"))
    out = in_process_with_hub(code, SimpleNamespace(url=f"http://127.0.0.1:{port}"), tmp_path)
    message = out["down"]["error"]
    assert f"data set acme/books cannot be reached at http://127.0.0.1:{port}" in message
    assert "check the network or HF_ENDPOINT" in message and "\n" not in message


def test_heal_trains_on_jsonl_parquet_and_a_hub_data_set(hub, tmp_path, tiny_tokenizer_dir):
    """The command line, as a user runs it: three sources at once."""
    pytest.importorskip("datasets")
    source = make_heal_source(tmp_path / "src", tiny_tokenizer_dir)
    docs = paragraphs()
    hub.datasets["acme/books"] = {"train.jsonl": "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()}
    a, b = write_jsonl(tmp_path / "a.jsonl", docs[:30]), write_parquet(tmp_path / "b.parquet", docs[30:])
    config = tmp_path / "small.yaml"
    config.write_text("kind: heal\nname: small\nseq_len: 32\nbatch_tokens: 128\nmicro_batch_tokens: 128\n"
                      "time_budget: null\ntokens: 512\nmin_steps: 1\nwarmup_steps: 1\nlr: 0.01\n")
    code = f"""
import sys, json
from bitquant.cli.main import main
sys.argv = ["bitquant", "heal", {str(source)!r}, "-o", {str(tmp_path / "out")!r}, "--device", "cpu", "--config", {str(config)!r},
            "--data", {str(a)!r}, "--data", {str(b)!r}, "--data", "hf:acme/books", "--json", "-q"]
try:
    main()
except SystemExit as e:
    assert e.code == 0, e.code
"""
    env_out = in_process_with_hub(code, hub, tmp_path)
    files = env_out["heal"]["data"][0]["files"]
    assert [f["format"] for f in files] == ["jsonl", "parquet", "hub"] and files[2]["repo"] == "acme/books"
    assert env_out["heal"]["exactness"]["relative_error"] == 0.0
    assert "hf:acme/books" in (tmp_path / "out" / "README.md").read_text()


def test_a_connection_lost_mid_stream_is_one_line(monkeypatch):
    import datasets
    httpx = importlib.import_module("httpx2") if importlib.util.find_spec("httpx2") else pytest.importorskip("httpx")

    def stream():
        yield {"text": "the first row"}
        yield {"text": "the second row"}
        raise httpx.ReadTimeout("The read operation timed out")

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: stream())
    docs = texts.documents(DataSpec("hf:acme/books"))
    assert [next(docs), next(docs)] == ["the first row", "the second row"]
    with pytest.raises(UsageError, match=r"acme/books stopped streaming after 2 rows \(ReadTimeout: The read operation "
                                         r"timed out\); check the network"):
        next(docs)

    def refused(*a, **k):
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(datasets, "load_dataset", refused)
    with pytest.raises(UsageError, match="stopped streaming after 0 rows"):
        list(texts.documents(DataSpec("hf:acme/books")))

    def broken(*a, **k):  # anything else is a bug and keeps its traceback
        yield {"text": "x"}
        raise RuntimeError("a bug")

    monkeypatch.setattr(datasets, "load_dataset", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        list(texts.documents(DataSpec("hf:acme/books")))
