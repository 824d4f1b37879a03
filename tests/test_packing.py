import numpy as np
import pytest
import torch
from transformers.integrations.bitnet import pack_weights, unpack_weights

from bitquant.errors import TensorError
from bitquant.packing import pack_ternary, packed_shape, unpack_ternary
from reference import unpack_reference


def random_codes(rows, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, (rows, cols), generator=g, dtype=torch.int8)


@pytest.mark.parametrize("shape", [(4, 1), (8, 3), (64, 48), (1536, 576), (4, 257), (12, 7)])
def test_round_trip_against_transformers_unpack(shape):
    codes = random_codes(*shape, seed=sum(shape))
    packed = pack_ternary(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0] // 4, shape[1])
    theirs = unpack_weights(packed, dtype=torch.float32)
    assert torch.equal(theirs, codes.float())
    assert torch.equal(unpack_ternary(packed), codes)
    assert np.array_equal(unpack_reference(packed.numpy()), codes.numpy())


@pytest.mark.parametrize("shape", [(8, 5), (128, 64)])
def test_same_bytes_as_transformers_pack(shape):
    codes = random_codes(*shape, seed=7)
    theirs = pack_weights(codes.clone().to(torch.int32))  # pack_weights adds 1 in place
    assert torch.equal(pack_ternary(codes), theirs)


def test_row_block_order_not_interleaved():
    codes = torch.zeros(8, 1, dtype=torch.int8)
    codes[2, 0] = 1  # block 1 (rows 2..3), row 0 of that block -> bits 2..3 of packed row 0
    packed = pack_ternary(codes)
    # every other code is 0 -> stored as 1 ("01"); row 2 holds 1 -> stored as 2 ("10")
    assert packed[0, 0].item() == 0b01_01_10_01
    assert packed[1, 0].item() == 0b01_01_01_01


def test_rows_not_multiple_of_four_are_refused():
    with pytest.raises(TensorError, match="not a multiple of 4"):
        packed_shape((6, 4), "model.layers.0.self_attn.k_proj.weight")
    with pytest.raises(TensorError):
        pack_ternary(torch.zeros(6, 4, dtype=torch.int8))
