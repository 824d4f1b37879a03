import hashlib

import pytest
import torch
from safetensors import safe_open

from bitquant.errors import SourceError
from bitquant.tensorfile import SafetensorsReader, SafetensorsStreamWriter, TensorSpec


def tensors():
    torch.manual_seed(0)
    return {
        "a": torch.randn(3, 5).half(),
        "b": torch.randint(0, 255, (7,), dtype=torch.uint8),
        "c": torch.randn(2, 2).to(torch.bfloat16),
        "d": torch.tensor([0.25], dtype=torch.float32),
    }


def write(path, ts):
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in ts.items()]
    w = SafetensorsStreamWriter(path, specs)
    for k, v in ts.items():
        w.write(k, v)
    w.close()
    return w


def test_stream_written_file_reads_back_with_safetensors(tmp_path):
    ts = tensors()
    w = write(tmp_path / "x.safetensors", ts)
    assert w.nbytes == (tmp_path / "x.safetensors").stat().st_size
    assert w.sha256 == hashlib.sha256((tmp_path / "x.safetensors").read_bytes()).hexdigest()
    with safe_open(tmp_path / "x.safetensors", "pt") as f:
        assert set(f.keys()) == set(ts)
        for k, v in ts.items():
            assert torch.equal(f.get_tensor(k), v)
    with SafetensorsReader(tmp_path / "x.safetensors") as r:
        assert r.names() == list(ts)
        for k, v in ts.items():
            assert torch.equal(r.get(k), v)


def test_writes_are_deterministic(tmp_path):
    a = write(tmp_path / "a.safetensors", tensors())
    b = write(tmp_path / "b.safetensors", tensors())
    assert a.sha256 == b.sha256


def test_writer_refuses_out_of_plan_tensors(tmp_path):
    w = SafetensorsStreamWriter(tmp_path / "x.safetensors", [TensorSpec("a", torch.float16, (2,))])
    with pytest.raises(ValueError, match="does not match"):
        w.write("a", torch.zeros(3, dtype=torch.float16))
    with pytest.raises(ValueError, match="never written"):
        w.close()


def test_truncated_and_garbage_files_are_reported(tmp_path):
    good = tmp_path / "x.safetensors"
    write(good, tensors())
    data = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-10])
    with pytest.raises(SourceError, match="cut.safetensors is not a valid safetensors file.*past the end"):
        SafetensorsReader(cut)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(SourceError, match="header is not JSON"):
        SafetensorsReader(junk)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"abc")
    with pytest.raises(SourceError, match="shorter than"):
        SafetensorsReader(tiny)
