"""A vectorised DICOM RLE Lossless encoder for the phantom's 16-bit slices.

pydicom's native encoder walks every row in Python (~50 ms per 128x128 slice); this one
does the same PackBits encoding with numpy over all rows at once. The output follows
DICOM PS3.5 Annex G: a 64-byte header (segment count + offsets), then one segment per
byte plane (most significant first), each row encoded separately, segments padded to an
even length. pydicom decodes it (tests compare against the original pixels).
"""

from __future__ import annotations

import numpy as np

_MIN_RUN = 3  # shorter runs of equal bytes are cheaper inside a literal


def _packbits_rows(plane: np.ndarray, pieces: int = 1) -> list[bytes]:
    """PackBits-encode each row of a (H, W) uint8 plane; rows never share a packet.

    The output is cut into ``pieces`` equal groups of rows (one per frame when the plane
    stacks several frames), so many frames are encoded in one vectorised pass.
    """
    h, w = plane.shape
    flat = plane.reshape(-1)
    size = h * w
    row_start = np.zeros(size, dtype=bool)
    row_start[::w] = True
    # eq[i]: byte i+1 repeats byte i within the row.
    eq = (flat[1:] == flat[:-1]) & ~row_start[1:]
    # A pixel is in a replicate run if it is inside some window of 3 equal bytes.
    triple = np.zeros(size, dtype=bool)
    triple[:-2] = eq[:-1] & eq[1:]
    repeat = triple.copy()
    repeat[1:] |= triple[:-1]
    repeat[2:] |= triple[:-2]
    # Blocks: each replicate run is one block; consecutive literal bytes of a row form one block.
    new_run = np.ones(size, dtype=bool)
    new_run[1:] = ~eq
    prev_repeat = np.zeros(size, dtype=bool)
    prev_repeat[1:] = repeat[:-1]
    new_block = row_start | (new_run & (repeat | prev_repeat))
    block_start = np.flatnonzero(new_block)
    block_len = np.diff(np.r_[block_start, size])
    # Packets: blocks cut into pieces of at most 128 bytes.
    n_pk = (block_len + 127) // 128
    first = np.repeat(np.cumsum(n_pk) - n_pk, n_pk)
    starts = np.repeat(block_start, n_pk) + 128 * (np.arange(n_pk.sum()) - first)
    lengths = np.minimum(np.repeat(block_start + block_len, n_pk) - starts, 128)
    is_rep = repeat[starts] & (lengths >= 2)  # a 1-byte tail of a long run goes as a literal
    header = np.where(is_rep, 257 - lengths, lengths - 1).astype(np.uint8)
    # Keep every literal byte and the first byte of each replicate packet, headers in front.
    keep = ~repeat
    keep[starts] = True
    before = np.cumsum(keep) - keep  # kept bytes before each position
    out_start = before[starts] + np.arange(len(starts))
    out = np.insert(flat[keep], before[starts], header)
    cuts = out_start[np.searchsorted(starts, np.arange(pieces) * (h // pieces) * w)]
    cuts = np.r_[cuts, len(out)]
    return [out[a:b].tobytes() for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


def encode_rle_frames(frames: np.ndarray) -> list[bytes]:
    """RLE Lossless encoding of 16-bit frames (uint16 or int16).

    Parameters
    ----------
    frames : ndarray of shape (n, H, W), dtype=uint16 or int16

    Returns
    -------
    list of bytes
        One encoded frame per slice, each the content of one Pixel Data fragment.
    """
    if frames.ndim != 3 or frames.dtype.itemsize != 2:
        raise ValueError(f"expected (n, H, W) 16-bit frames, got shape {frames.shape} dtype {frames.dtype}")
    n, h, w = frames.shape
    as_bytes = np.ascontiguousarray(frames).view(np.uint8).reshape(n * h, w, 2)
    order = (1, 0) if np.little_endian else (0, 1)  # most significant byte plane first
    planes = [_packbits_rows(np.ascontiguousarray(as_bytes[:, :, b]), pieces=n) for b in order]
    encoded = []
    for k in range(n):
        segments = [p[k] + (b"\x00" if len(p[k]) % 2 else b"") for p in planes]
        header = np.zeros(16, dtype="<u4")
        header[0] = len(segments)
        header[1] = 64
        for i in range(1, len(segments)):
            header[1 + i] = header[i] + len(segments[i - 1])
        encoded.append(header.tobytes() + b"".join(segments))
    return encoded
