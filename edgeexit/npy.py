"""A `.npy` file memory-mapped read-only, whose pages can be handed back as a reader moves on.

`np.load(mmap_mode="r")` maps the file but keeps every page it touched resident until the
array dies, so a pass over a 2 GB file ends with 2 GB in the process's resident set.
`MappedNpy` maps it with `mmap` itself and `release(start, stop)` tells the kernel that rows
already processed are not needed (`madvise(MADV_DONTNEED)`): resident memory stays near one
chunk. The header is parsed with numpy's own `numpy.lib.format`; object arrays are refused
(nothing is unpickled).
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
from numpy.lib import format as npformat


class MappedNpy:
    """The array of an `.npy` file, mapped read-only (`array`), with `release`; the mapping
    closes when the last view of it goes."""

    def __init__(self, path: Path):
        with open(path, "rb") as f:
            version = npformat.read_magic(f)
            read_header = {(1, 0): npformat.read_array_header_1_0, (2, 0): npformat.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ValueError(f".npy format version {version} is not supported")
            shape, fortran, dtype = read_header(f)
            if any(not isinstance(d, int) or d < 0 for d in shape):
                raise ValueError(f"the header's shape {shape} has a negative dimension")
            if dtype.hasobject:
                raise ValueError("the array holds Python objects (pickled data is never loaded)")
            self.offset = f.tell()
            count = int(np.prod(shape, dtype=np.int64))
            if count == 0:
                self._map, self.array = None, np.zeros(shape, dtype)
                return
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        flat = np.frombuffer(self._map, dtype=dtype, count=count, offset=self.offset)
        self.array = flat.reshape(shape, order="F" if fortran else "C")
        self._row_bytes = dtype.itemsize * (count // shape[0]) if shape and not fortran else 0

    def release(self, start: int, stop: int) -> None:
        """Rows [start, stop) will not be read again: drop their pages from this process."""
        if self._map is None or not self._row_bytes or not hasattr(mmap, "MADV_DONTNEED"):
            return
        first = self.offset + start * self._row_bytes
        last = self.offset + stop * self._row_bytes
        first -= first % mmap.PAGESIZE
        last -= last % mmap.PAGESIZE  # whole pages only: the next chunk may share the last one
        if last > first:
            self._map.madvise(mmap.MADV_DONTNEED, first, last - first)
