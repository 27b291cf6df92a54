"""CRC-32 sums of a checkpoint's files: each writer hashes its own shards right after writing them
(still in the page cache), the rest is spread over ranks, and rank 0 writes the union as
checksums.json; a load can check every file against it, each rank its share."""

from __future__ import annotations

import json
import os
import re
import zlib
from typing import List, Optional

import torch.distributed as dist

from megatron_eve.atomic import write_text

CHECKSUMS = "checksums.json"  # CRC-32 of every file of a checkpoint, written by save()
PARTIAL_CHECKSUMS = ".crc32.rank{}.json"  # one rank's checksums of its shards, written by its writer


def crc32(path: str) -> str:
    crc = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(16 << 20):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def record_own_shards(directory: str, rank: int) -> None:
    """Where a rank's shards were just written (the background process with --async-save): their
    sums, for record_checksums to collect."""
    mine = {name: crc32(os.path.join(directory, name)) for name in sorted(os.listdir(directory))
            if name.startswith(f"__{rank}_")}
    write_text(os.path.join(directory, PARTIAL_CHECKSUMS.format(rank)), json.dumps(mine))


def _my_share(names: List[str]) -> List[str]:
    """The files this rank hashes: its own shards ("__<rank>_<n>.distcp") where it has them, the
    rest spread over ranks; every rank together covers every name once."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = []
    for position, name in enumerate(names):
        owner = re.match(r"__(\d+)_", name)
        if (int(owner.group(1)) if owner else position) % world == rank:
            mine.append(name)
    return mine


def record_checksums(directory: str) -> None:
    """Write DIRECTORY/checksums.json: the sums the writers recorded for their shards, and for the
    rest (metadata, shards without a record) each rank hashes its share; rank 0 writes the union."""
    names = sorted(n for n in os.listdir(directory) if n != CHECKSUMS and os.path.isfile(os.path.join(directory, n)))
    partial = [n for n in names if re.fullmatch(r"\.crc32\.rank\d+\.json", n)]
    known = {}
    for name in partial:
        with open(os.path.join(directory, name)) as handle:
            known.update(json.load(handle))
    rest = [n for n in names if n not in partial and n not in known]
    mine = {name: crc32(os.path.join(directory, name)) for name in _my_share(rest)}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if dist.get_rank() == 0:
        files = {name: crc for part in [known, *gathered] for name, crc in part.items() if name in names}
        with open(os.path.join(directory, CHECKSUMS), "w") as handle:
            json.dump({"algorithm": "crc32", "files": files}, handle, indent=1, sort_keys=True)
        for name in partial:
            os.remove(os.path.join(directory, name))


def damaged_files(directory: str) -> Optional[List[str]]:
    """Every file checked against checksums.json (each rank a share, all ranks get the union):
    "NAME is missing" / "NAME does not match its checksum", sorted; None when the checkpoint
    records no checksums (older, converted)."""
    path = os.path.join(directory, CHECKSUMS)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        recorded = json.load(handle)["files"]
    problems = []
    for name in _my_share(sorted(recorded)):
        file = os.path.join(directory, name)
        if not os.path.isfile(file):
            problems.append(f"{name} is missing")
        elif crc32(file) != recorded[name]:
            problems.append(f"{name} does not match its checksum")
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, problems)
    return sorted(p for part in gathered for p in part)
