"""Damage to the exporter's state file, applied while the exporter is stopped.

The state is a JSON manifest (``state_file``) and binary table files in ``<state_file>.d/`` (see
exporter/state.py). Each damage is one way a disk, an operator or a bug could leave them: cut,
garbage, valid JSON with wrong types or implausible values, a table file cut, bit-flipped, missing
or of another type, a crafted first-seen time of -1e20, the table directory or the manifest
replaced by something else. Whatever the damage, the exporter must start, serve every endpoint and
be exact again after its first refreshes.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAGIC = b"IPXTABLE2\n"


@dataclass(frozen=True)
class Damage:
    name: str
    describe: str
    apply: Callable[[Path, random.Random], str]  # -> what exactly was done
    needs_repair: bool = False  # the exporter cannot write its state until the soak repairs it
    refused: bool = False  # by design a config error: the exporter exits 2 naming state_file


def directory_of(state: Path) -> Path:
    return state.with_name(state.name + ".d")


def _manifest(state: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(state.read_text())
    return document


def _write(state: Path, document: Any) -> None:
    state.write_text(json.dumps(document))


def _sources(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(estate, source kind, entry) of every source in the manifest."""
    return [
        (estate, kind, entry)
        for estate, value in document["estates"].items()
        for kind, entry in value["sources"].items()
    ]


def _tables(state: Path) -> list[Path]:
    return sorted(directory_of(state).glob("*.tbl"))


def _pick_table(state: Path, rng: random.Random) -> Path:
    tables = _tables(state)
    if not tables:
        raise RuntimeError(f"no table files in {directory_of(state)}")
    return rng.choice(tables)


# ------------------------------------------------------------------------------ the manifest
def manifest_truncated(state: Path, rng: random.Random) -> str:
    data = state.read_bytes()
    keep = rng.randrange(1, max(2, len(data) - 1))
    state.write_bytes(data[:keep])
    return f"manifest cut to {keep} of {len(data)} bytes"


def manifest_garbage(state: Path, rng: random.Random) -> str:
    size = rng.choice((1, 100, 4096, 1 << 20))
    state.write_bytes(rng.randbytes(size))
    return f"manifest replaced by {size} random bytes"


def manifest_empty(state: Path, rng: random.Random) -> str:
    state.write_bytes(b"")
    return "manifest emptied"


def manifest_wrong_types(state: Path, rng: random.Random) -> str:
    document = _manifest(state)
    estate, kind, entry = rng.choice(_sources(document))
    choice = rng.randrange(7)
    if choice == 0:
        document["estates"] = [1, 2]
        what = '"estates": [1, 2]'
    elif choice == 1:
        entry["last_success"] = "yesterday"
        what = f'{kind}.last_success "yesterday"'
    elif choice == 2:
        entry["duration"] = -5
        what = f"{kind}.duration -5"
    elif choice == 3:
        document["version"] = "2"
        what = 'version "2"'
    elif choice == 4:
        document["label_key"] = 12345
        what = "label_key 12345"
    elif choice == 5:
        entry["up"] = "yes"
        what = f'{kind}.up "yes"'
    else:
        document["estates"][estate]["sources"] = None
        what = f"estates.{estate}.sources null"
    _write(state, document)
    return what


def manifest_bad_values(state: Path, rng: random.Random) -> str:
    document = _manifest(state)
    estate, kind, entry = rng.choice(_sources(document))
    choice = rng.randrange(6)
    if choice == 0:
        entry["last_success"] = 1e300
        what = f"{kind}.last_success 1e300"
    elif choice == 1:
        entry["full_read_at"] = -1e20
        what = f"{kind}.full_read_at -1e20"
    elif choice == 2:
        entry["table"] = "../../../../etc/passwd"
        what = f"{kind}.table ../../../../etc/passwd"
    elif choice == 3:
        entry["table"] = "scale-ad-000000000000.tbl"
        what = f"{kind}.table names a file that does not exist"
    elif choice == 4:
        document["estates"][estate]["pipeline"] = "cloud"
        what = f"estate {estate} claims pipeline cloud"
    else:
        state.write_text(
            json.dumps(document).replace(f'"{kind}": {{"up": ', f'"{kind}": {{"up": NaN, "x": ', 1)
        )
        return f"{kind}.up NaN and an unknown key"
    _write(state, document)
    return what


def manifest_is_directory(state: Path, rng: random.Random) -> str:
    state.unlink()
    state.mkdir()
    (state / "junk").write_text("not a manifest")
    return "the manifest path is a directory"


# ------------------------------------------------------------------------------ the table files
def table_truncated(state: Path, rng: random.Random) -> str:
    table = _pick_table(state, rng)
    data = table.read_bytes()
    keep = rng.randrange(0, len(data))
    table.write_bytes(data[:keep])
    return f"{table.name} cut to {keep} of {len(data)} bytes"


def table_bitflip(state: Path, rng: random.Random) -> str:
    """Bits flipped inside one column's data (what a bad disk block does): the file stays
    structurally valid, so only a checksum could tell."""
    table = _pick_table(state, rng)
    data = bytearray(table.read_bytes())
    length = struct.unpack_from("<Q", data, len(MAGIC))[0]
    body = len(MAGIC) + 8 + length
    header = json.loads(data[len(MAGIC) + 8 : body])
    columns = [c for c in header["columns"] if c["buffers"] and c["buffers"][0][1] > 0]
    column = rng.choice(columns)
    offset, size = column["buffers"][0][:2]  # (offset, length, CRC-32)
    flips = rng.choice((1, 8, 64))
    for _ in range(flips):
        data[body + offset + rng.randrange(size)] ^= 1 << rng.randrange(8)
    table.write_bytes(bytes(data))
    return f"{flips} bit(s) flipped in column {column['name']} of {table.name}"


def table_header(state: Path, rng: random.Random) -> str:
    table = _pick_table(state, rng)
    data = table.read_bytes()
    length = struct.unpack_from("<Q", data, len(MAGIC))[0]
    start = len(MAGIC) + 8
    header = json.loads(data[start : start + length])
    choice = rng.randrange(4)
    if choice == 0:
        header["rows"] = -1
        what = "rows -1"
    elif choice == 1:
        header["rows"] = 10**12
        what = "rows 10^12"
    elif choice == 2:
        header["columns"][0]["buffers"][0] = [0, 1 << 40]
        what = "a buffer of 1 TiB"
    else:
        header = "garbage"
        what = "header is a JSON string"
    encoded = json.dumps(header).encode()
    table.write_bytes(MAGIC + struct.pack("<Q", len(encoded)) + encoded + data[start + length :])
    return f"{table.name}: {what}"


def table_missing(state: Path, rng: random.Random) -> str:
    table = _pick_table(state, rng)
    table.unlink()
    return f"{table.name} deleted"


def table_swapped(state: Path, rng: random.Random) -> str:
    document = _manifest(state)
    tables = [(kind, entry) for _, kind, entry in _sources(document) if entry.get("table")]
    (kind_a, a), (kind_b, b) = rng.sample(tables, 2)
    a["table"], b["table"] = b["table"], a["table"]
    _write(state, document)
    return f"{kind_a} and {kind_b} point at each other's table file"


def first_seen_extreme(state: Path, rng: random.Random) -> str:
    """A structurally valid first-seen table whose times are -1e20 (issue 12, item 3)."""
    document = _manifest(state)
    estate = rng.choice(sorted(document["estates"]))
    name = document["estates"][estate].get("first_seen")
    if not name:
        raise RuntimeError(f"estate {estate} has no first-seen table")
    table = directory_of(state) / name
    data = bytearray(table.read_bytes())
    length = struct.unpack_from("<Q", data, len(MAGIC))[0]
    body = len(MAGIC) + 8 + length
    header = json.loads(data[len(MAGIC) + 8 : body])
    since = next(c for c in header["columns"] if c["name"] == "since")
    offset, size = since["buffers"][0]
    value = rng.choice((-1e20, 1e20, float("inf")))
    data[body + offset : body + offset + size] = struct.pack("<d", value) * (size // 8)
    table.write_bytes(bytes(data))
    return f"every first-seen time in {name} set to {value:g}"


def directory_is_file(state: Path, rng: random.Random) -> str:
    directory = directory_of(state)
    shutil.rmtree(directory)
    directory.write_text("not a directory")
    return f"{directory.name} replaced by a regular file (state writes fail until repaired)"


DAMAGES: tuple[Damage, ...] = (
    Damage("manifest_truncated", "the manifest cut short", manifest_truncated),
    Damage("manifest_garbage", "the manifest replaced by random bytes", manifest_garbage),
    Damage("manifest_empty", "an empty manifest", manifest_empty),
    Damage("manifest_wrong_types", "valid JSON with wrong types", manifest_wrong_types),
    Damage("manifest_bad_values", "valid JSON with implausible values or paths", manifest_bad_values),
    Damage(
        "manifest_is_directory",
        "a directory where the manifest was",
        manifest_is_directory,
        True,
        refused=True,
    ),
    Damage("table_truncated", "a table file cut short", table_truncated),
    Damage("table_bitflip", "bits flipped in a table file's body", table_bitflip),
    Damage("table_header", "a table file's header with wrong sizes or types", table_header),
    Damage("table_missing", "a table file deleted", table_missing),
    Damage("table_swapped", "two sources pointing at each other's table files", table_swapped),
    Damage("first_seen_extreme", "first-seen times of ±1e20 or inf in a valid table", first_seen_extreme),
    Damage("directory_is_file", "the table directory replaced by a file", directory_is_file, True),
)


def repair(state: Path) -> None:
    """Undo what stops the exporter from writing (a directory where the manifest goes, a file
    where the table directory goes)."""
    if state.is_dir():
        shutil.rmtree(state)
    directory = directory_of(state)
    if directory.exists() and not directory.is_dir():
        directory.unlink()
