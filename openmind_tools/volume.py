"""A converted volume as both stores hand it out, its mask code, and its content checksum.

The two binary masks travel as one uint8 code (bit 0 anatomy, bit 1 deface) so a store holds one mask
array; the checksum covers the decoded arrays, so `verify` compares what a reader would get, whichever
store (and codec) holds the bytes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Volume:
    image: np.ndarray  # (X, Y, Z) float16, z-scored
    anatomy: np.ndarray  # (X, Y, Z) uint8, 1 = anatomy
    deface: np.ndarray  # (X, Y, Z) uint8, 1 = defaced region

    def mask_code(self) -> np.ndarray:
        return (self.anatomy.astype(np.uint8) & 1) | ((self.deface.astype(np.uint8) & 1) << 1)

    @classmethod
    def from_code(cls, image: np.ndarray, code: np.ndarray) -> Volume:
        code = code.astype(np.uint8, copy=False)
        return cls(image=image, anatomy=code & 1, deface=(code >> 1) & 1)

    def checksum(self) -> str:
        digest = hashlib.blake2b(digest_size=16)
        for array in (
            self.image.astype(np.float16),
            self.anatomy.astype(np.uint8),
            self.deface.astype(np.uint8),
        ):
            digest.update(np.ascontiguousarray(array).data)
        return digest.hexdigest()
