"""The packed W2A8 Triton kernel, run on the CPU under Triton's interpreter (conftest sets
TRITON_INTERPRET=1), against an int32 reference: a wrong index or shift fails here, without a GPU."""

import pytest
import torch

pytest.importorskip("triton", reason="triton is installed by the README's set-up command (.[dev])")

from bitquant import w2a8  # noqa: E402
from bitquant.packing import pack_ternary  # noqa: E402
from bitquant.runtime import TernaryLinear  # noqa: E402
from bitquant.ternary import quantize_activations  # noqa: E402


def random_case(m, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    xq = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    return codes, xq


@pytest.mark.parametrize("m,n,k", [(1, 64, 128), (5, 256, 96), (16, 128, 256), (37, 320, 200), (70, 8, 64)])
def test_int32_product_equals_the_reference_exactly(m, n, k):
    """Decode and prefill tiles, rows and columns that are not multiples of the tiles."""
    codes, xq = random_case(m, n, k)
    want = xq.to(torch.int32) @ codes.to(torch.int32).T
    got = w2a8.matmul_int32(xq, pack_ternary(codes))
    assert got.dtype == torch.int32 and torch.equal(got, want)


@pytest.mark.parametrize("multiply", [False, True])
def test_scaled_output_equals_the_cpu_runtime(multiply):
    """The epilogue applies the runtime's conventions: within 1e-6 relative of TernaryLinear."""
    codes, _ = random_case(1, 192, 160, seed=1)
    x = torch.randn(9, 160, generator=torch.Generator().manual_seed(2))
    scale = torch.tensor([0.037 if multiply else 1 / 0.037])
    ref = TernaryLinear(codes, scale, None, act_quant=True, multiply=multiply)(x)
    q, act_scale = quantize_activations(x)
    got = w2a8.linear(q.to(torch.int8), act_scale, pack_ternary(codes), scale, multiply)
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-6


@pytest.mark.parametrize("split", [2, 4, 3])
def test_a_split_inner_dimension_gives_the_same_integers(split):
    """Decode splits k over programs whose int32 partial sums the last one adds: exact,
    including a last share shorter than the others, and again on a second call (the
    counts go back to zero)."""
    codes, xq = random_case(3, 64, 1000, seed=3)
    want = xq.to(torch.int32) @ codes.to(torch.int32).T
    tiles = w2a8.Tiles(16, 16, 128, split)
    for _ in range(2):
        assert torch.equal(w2a8.matmul_int32(xq, pack_ternary(codes), tiles), want)
    counts = [c for key, (_, c) in w2a8._WORKSPACES.items() if key[1] == split]
    assert counts and all(int(c.abs().sum()) == 0 for c in counts)


def test_the_tiles_cover_decode_and_prefill():
    """Decode: 16 tokens a tile, k split to about 1k a program; prefill: one program per tile;
    one token: the gemv's launch."""
    assert w2a8.tiles_for(1, 1024, 4096).split == 4 and w2a8.tiles_for(16, 2752, 11008).split == 8
    assert w2a8.tiles_for(2, 640, 2560).split == 4 and w2a8.tiles_for(5, 64, 512).split == 1
    assert w2a8.tiles_for(17, 1024, 4096).split == 1
    # the gemv: eight packed rows a program for the wide layers, 256 words for the long rows,
    # four stages of codes in flight
    assert w2a8.gemv_tiles(1024, 4096) == (4, 128, 4, 4) and w2a8.gemv_tiles(2752, 4096) == (8, 128, 4, 4)
    assert w2a8.gemv_tiles(1024, 11008) == (4, 256, 4, 4)


@pytest.mark.parametrize("multiply", [False, True])
@pytest.mark.parametrize("split", [1, 4])
def test_forward_equals_the_cpu_runtime_with_bias(multiply, split, monkeypatch):
    """Quantize + multiply + scale + bias, through the split and the unsplit epilogue."""
    g = torch.Generator().manual_seed(4)
    codes = torch.randint(-1, 2, (96, 1024), generator=g, dtype=torch.int8)
    x = torch.randn(4, 5, 1024, generator=g)  # 20 tokens: the tiled kernel, not the gemv
    bias = torch.randn(96, generator=g)
    scale = torch.tensor([0.021 if multiply else 1 / 0.021])
    ref = TernaryLinear(codes, scale, bias, act_quant=True, multiply=multiply)(x)
    monkeypatch.setattr(w2a8, "tiles_for", lambda m, r, k: w2a8.Tiles(16, 16, 128, split))  # 20 tokens, split
    got = w2a8.forward(x, pack_ternary(codes), scale, multiply, bias)
    assert got.shape == ref.shape and got.dtype == x.dtype
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-6


@pytest.mark.parametrize("row", [w2a8.QUANT_ROW, 1024])
def test_quantize_gives_the_runtimes_integers_exactly(row, monkeypatch):
    """One kernel per token equals quantize_activations in float32: scales bit for bit, codes
    exactly, including ties (x * scale = k + 0.5 rounds to even), zero rows and the clamp;
    rows read once, and rows longer than a block read twice."""
    monkeypatch.setattr(w2a8, "QUANT_ROW", row)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 3000, generator=g) * torch.tensor([1e-3, 1.0, 30.0, 1.0, 1.0, 1.0])[:, None]
    x[3] = 0.0
    x[4, :4] = torch.tensor([127.0, 0.5, 1.5, -2.5])  # scale 1: ties at .5
    x[4, 4:] = torch.linspace(-127, 127, 2996).round() + 0.5 * (torch.arange(2996) % 2)
    x[4].clamp_(-127, 127)
    q, scale = w2a8.quantize(x)
    want_q, want_scale = quantize_activations(x)
    assert q.dtype == torch.int8 and torch.equal(scale, want_scale.reshape(-1))
    assert torch.equal(q.to(torch.float32), want_q)
    xb = x.to(torch.bfloat16)  # a bf16 model's activations, quantized in float32
    qb, sb = w2a8.quantize(xb)
    want_qb, want_sb = quantize_activations(xb.float())
    assert torch.equal(qb.to(torch.float32), want_qb) and torch.equal(sb, want_sb.reshape(-1))


def test_wrong_inputs_are_refused():
    codes, xq = random_case(2, 8, 16)
    with pytest.raises(ValueError, match="need int8"):
        w2a8.matmul_int32(xq[0], pack_ternary(codes))
    with pytest.raises(ValueError, match="need int8"):
        w2a8.matmul_int32(xq.float(), pack_ternary(codes))


@pytest.mark.parametrize("m,k,tiles", [(1, 96, (4, 16, 4)), (1, 1000, (8, 128, 4, 1)), (3, 1536, (2, 64, 2, 4)),
                                       (16, 200, (4, 32, 4, 2)), (1, 4096, None)])
def test_gemv_is_exact(m, k, tiles):
    """Decode: one launch, a program per token and tile, no tensor cores, the codes read as
    words of four (dp4a spelled out byte by byte here); with unit scales its float32 output
    is the int32 product itself (every value far below 2**24). Pipeline stages (a fourth
    number) only reorder the loads on a GPU; the interpreter runs the loop in order."""
    codes, xq = random_case(m, 72, k, seed=6)
    want = (xq.to(torch.int32) @ codes.to(torch.int32).T).float()
    got = w2a8.gemv(xq, pack_ternary(codes), torch.ones(1), True, act_scale=torch.ones(m), tiles=tiles)
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_gemv_reads_int8_rows_that_do_not_start_on_a_word():
    """A slice one byte into a buffer cannot be read as words: it is copied first, same numbers."""
    codes, xq = random_case(1, 16, 64, seed=9)
    buf = torch.zeros(1, 65, dtype=torch.int8)
    buf[0, 1:] = xq[0]
    x = buf[:, 1:]
    assert x.data_ptr() % 4 != 0
    want = (xq.to(torch.int32) @ codes.to(torch.int32).T).float()
    got = w2a8.gemv(x, pack_ternary(codes), torch.ones(1), True, act_scale=torch.ones(1), tiles=(4, 16, 4))
    assert torch.equal(got, want)


def test_an_inner_dimension_that_is_not_whole_words_takes_the_tiles():
    """The gemv reads 32-bit words; K = 1002 goes to the tensor-core tiles, with the same numbers."""
    g = torch.Generator().manual_seed(8)
    codes = torch.randint(-1, 2, (24, 1002), generator=g, dtype=torch.int8)
    x = torch.randn(1, 1002, generator=g)
    ref = TernaryLinear(codes, torch.tensor([0.5]), None, act_quant=True, multiply=True)(x)
    packed = pack_ternary(codes)
    assert not w2a8.takes_words(packed)
    got = w2a8.forward(x, packed, torch.tensor([0.5]), True)
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-6
    with pytest.raises(ValueError, match="32-bit words"):
        w2a8.gemv(x, packed, torch.tensor([0.5]), True)


@pytest.mark.parametrize("multiply", [False, True])
def test_one_token_forward_quantizes_in_the_kernel(multiply):
    """forward() of one token goes through the fused gemv: the CPU runtime's numbers."""
    g = torch.Generator().manual_seed(7)
    codes = torch.randint(-1, 2, (40, 700), generator=g, dtype=torch.int8)
    x = torch.randn(1, 1, 700, generator=g) * 3
    bias = torch.randn(40, generator=g)
    scale = torch.tensor([0.03 if multiply else 1 / 0.03])
    ref = TernaryLinear(codes, scale, bias, act_quant=True, multiply=multiply)(x)
    got = w2a8.forward(x, pack_ternary(codes), scale, multiply, bias)
    assert got.shape == (1, 1, 40) and float((got - ref).abs().max() / ref.abs().max()) < 1e-6
    with pytest.raises(ValueError, match="1 to 16 tokens"):
        w2a8.gemv(x[0].repeat(17, 1), pack_ternary(codes), scale, multiply)


@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_heals_student_layer_equals_the_kernel_bit_for_bit(tokens):
    """What heal trains is what ships on a GPU: in float32 the student's fake-ternary layer
    (the exporter's quantizer, torch's arithmetic) gives the W2A8 kernels' output (gemv for
    one token, the tiles for more) bit for bit, the division rounded alike."""
    from bitquant.formats.hf_bitnet import encode
    from bitquant.kernels import quantize_pack
    from bitquant.training.student import fake_ternary_linear

    g = torch.Generator().manual_seed(tokens)
    latent = torch.randn(96, 128, generator=g).half()
    x = torch.randn(tokens, 128, generator=g) * 3
    t = quantize_pack(latent, eps=1e-5)
    (_, packed), (_, inv) = encode("w", t.packed, t.scale, torch.float16)
    student = fake_ternary_linear(x, latent.float(), None, 1e-5, torch.float16)
    shipped = w2a8.forward(x, packed, inv.to(torch.float32), False)
    assert torch.equal(student, shipped)
