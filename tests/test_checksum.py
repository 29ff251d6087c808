"""CRC-32C: the standard check value, any buffer read in place, one flipped bit noticed."""

import numpy as np
import torch

from megatron_unicron.checksum import crc32c, crc32c_each
from megatron_unicron.transition.exchange import checksum


def test_the_standard_check_value_and_incremental_use() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C catalogue's check value
    assert crc32c(b"6789", crc32c(b"12345")) == 0xE3069283
    view = memoryview(b"123456789abc")
    assert crc32c_each([view[:9], view[9:], view[:0]]) == (0xE3069283, crc32c(b"abc"), 0)


def test_buffers_are_read_in_place_and_a_flipped_bit_is_seen() -> None:
    data = np.arange(1 << 16, dtype=np.float32)
    whole = crc32c(data.tobytes())
    assert crc32c(data) == crc32c(memoryview(data)) == whole
    wire = torch.from_numpy(data.view(np.uint8).copy())
    assert checksum(wire) == whole
    wire[12345] ^= 1
    assert checksum(wire) != whole
    assert checksum(torch.empty(0, dtype=torch.uint8)) == 0
