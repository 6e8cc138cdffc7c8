"""The fixed held-out split: which records evaluation keeps away from training.

A record is held out when the CRC-32 of its name falls in the first `percent` of the hash range.
The name is what stays the same when data moves: an image's file name (not its path), a text
paragraph's file name and number, a TFDS example's dataset and index. So the split is the same
on every machine and process, a folder that grows keeps its old split, and the rows that share an
image (Flickr8k has five captions per photo) share its side of the split.
"""

import pathlib
import zlib


def held_out(name: str, percent: float) -> bool:
    """Whether the record called `name` (a path's last part counts) is held out."""
    name = pathlib.PurePath(name).name
    return zlib.crc32(name.encode()) % 10_000 < percent * 100


class Subset:
    """The records of a random-access source at `indices`, itself random access (for grain)."""

    def __init__(self, source, indices):
        self.source, self.indices = source, list(indices)
        self.skipped = getattr(source, "skipped", 0)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        return self.source[self.indices[index]]


def split(source, percent: float, held: bool) -> Subset:
    """The held-out records of `source` (held=True) or the training ones; `source` names its
    records with `record_name(i)`, read without decoding anything."""
    indices = [i for i in range(len(source)) if held_out(source.record_name(i), percent) == held]
    return Subset(source, indices)
