"""Rewrite a GGUF file's metadata for tests: drop or replace keys, copy the tensors.

GGUF layout: magic, version, tensor count, key-value count, the key-value
pairs, the tensor infos (offsets relative to the data section), padding to
`general.alignment` (32 by default), then the tensor data. Changing the header
only moves the data section, so the data is copied as is after new padding.
"""

from __future__ import annotations

import struct
from pathlib import Path

_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def _string(key: str) -> bytes:
    b = key.encode()
    return struct.pack("<Q", len(b)) + b


def rewrite(src: Path, dst: Path, drop: set[str] = frozenset(), strings: dict[str, str] | None = None) -> Path:
    """Copy `src` to `dst` without the keys in `drop`, and with string keys set (added
    or replaced) from `strings`."""
    data = Path(src).read_bytes()
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        pos += n
        return data[pos - n:pos]

    def u32() -> int:
        return struct.unpack("<I", take(4))[0]

    def u64() -> int:
        return struct.unpack("<Q", take(8))[0]

    def skip_value(t: int) -> None:
        if t in _SIZES:
            take(_SIZES[t])
        elif t == _STRING:
            take(u64())
        elif t == _ARRAY:
            et, n = u32(), u64()
            for _ in range(n):
                skip_value(et)
        else:
            raise ValueError(f"unknown GGUF type {t}")

    assert take(4) == b"GGUF"
    version, n_tensors, n_kv = u32(), u64(), u64()
    kept, alignment = [], 32
    for _ in range(n_kv):
        start = pos
        key = take(u64()).decode()
        t = u32()
        vstart = pos
        skip_value(t)
        if key == "general.alignment":
            alignment = struct.unpack("<I", data[vstart:vstart + 4])[0]
        if key not in drop and key not in (strings or {}):
            kept.append(data[start:pos])
    for key, value in (strings or {}).items():
        kept.append(_string(key) + struct.pack("<I", _STRING) + _string(value))
    info_start = pos
    for _ in range(n_tensors):
        take(u64())
        take(8 * u32())
        take(4 + 8)
    infos = data[info_start:pos]
    data_start = -(-pos // alignment) * alignment
    head = b"GGUF" + struct.pack("<IQQ", version, n_tensors, len(kept)) + b"".join(kept) + infos
    head += b"\0" * (-len(head) % alignment)
    with open(dst, "wb") as f:
        f.write(head)
        f.write(memoryview(data)[data_start:])
    return Path(dst)
