import hashlib

import pytest
from transformers import AutoTokenizer

import bitquant.text
from bitquant.errors import TextError
from bitquant.text import tokenize_file
from conftest import DATA


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def test_whole_file_matches_plain_tokenization_and_hash(tok):
    text = (DATA / "alice29.txt").read_text()  # text mode: \r\n -> \n
    t = tokenize_file(DATA / "alice29.txt", tok, min_tokens=16)
    assert t.ids == tok(text, add_special_tokens=False)["input_ids"]
    assert t.sha256 == hashlib.sha256((DATA / "alice29.txt").read_bytes()).hexdigest()
    assert not t.truncated


def test_streamed_prefix_equals_whole_tokenization(tok, monkeypatch):
    monkeypatch.setattr(bitquant.text, "CHUNK_BYTES", 997)  # many chunks, cut at line breaks
    whole = tokenize_file(DATA / "alice29.txt", tok, min_tokens=16).ids
    t = tokenize_file(DATA / "alice29.txt", tok, min_tokens=16, max_tokens=5000)
    assert t.truncated and t.ids == whole[:5000]


def test_crlf_and_cr_are_normalized(tok, tmp_path):
    (tmp_path / "a.txt").write_bytes(b"one line\r\ntwo line\rthree line\n" * 20)
    (tmp_path / "b.txt").write_bytes(b"one line\ntwo line\nthree line\n" * 20)
    assert tokenize_file(tmp_path / "a.txt", tok, 4).ids == tokenize_file(tmp_path / "b.txt", tok, 4).ids


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "does not exist"),
        (b"", "is empty"),
        (b"  \n\n\t \n", "is empty"),
        (b"text\x00with a NUL byte", "NUL bytes"),
        ("caf\u00e9 au lait ".encode("latin-1") * 50, "not UTF-8 text"),
        (b"far too short", "fewer than one window of 512"),
    ],
)
def test_bad_texts_are_one_clear_error(tok, tmp_path, content, message):
    path = tmp_path / "t.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(TextError, match=message):
        tokenize_file(path, tok, min_tokens=512)
    with pytest.raises(TextError, match=message):
        tokenize_file(path, tok, min_tokens=512, max_tokens=1024)
