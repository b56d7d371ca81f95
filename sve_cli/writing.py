"""Writing files safely: atomic replacement, deterministic safetensors, streamed HF shards, locks.

Every file goes to a temporary sibling (`.NAME.tmp-PID`), is fsynced and renamed over its final
name, so a reader never sees half a file and a crash never destroys the previous version. A
directory that sve writes into is held by an exclusive lock (`.sve.lock`, `flock`: released by the
kernel even when the process is SIGKILLed), so two commands never write the same output at once;
once the lock is held, temporaries left by a killed process are removed.

A name is not a marker: a user's file may be called `.x.tmp-7`. Each temporary sve creates is
recorded in its journal (`$SVE_HOME/temporaries/`, one small file per temporary holding its path,
device and inode) until it is renamed or removed; only a temporary whose record matches is ever
treated as sve's own (`is_own_temporary`): ignored beside an output, swept once its writer is dead.
Outputs that cannot carry a marker inside (a predictions CSV or JSONL) are journaled the same way
(`$SVE_HOME/outputs/`) once renamed into place.

`fault_point(name)` lets the tests kill the process at an exact moment (`SVE_KILL_AT=name[:n]`
SIGKILLs it the n-th time that point is reached); it does nothing otherwise.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import signal
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from sve_cli.tensors import SAFETENSORS_DTYPES, tensor_fingerprint
from sve_cli.errors import LockedError, SveError

_UMASK = os.umask(0)
os.umask(_UMASK)
LOCK_NAME = ".sve.lock"
TEMPORARY = re.compile(r"\..+\.(tmp|old)-\d+")  # `.NAME.tmp-PID` files and `.NAME.old-PID` directories
_fault_counts: dict[str, int] = {}


def fault_point(name: str) -> None:
    """SIGKILL this process here when `SVE_KILL_AT` names this point (tests of crash safety)."""
    wanted = os.environ.get("SVE_KILL_AT")
    if not wanted:
        return
    point, _, count = wanted.partition(":")
    if point == name:
        _fault_counts[name] = _fault_counts.get(name, 0) + 1
        if _fault_counts[name] == int(count or 1):
            os.kill(os.getpid(), signal.SIGKILL)


def sve_home() -> Path:
    """Where `sve` caches converted checkpoints, default decompositions and its journal (`$SVE_HOME`)."""
    return Path(os.environ.get("SVE_HOME") or Path.home() / ".cache" / "sve")


def _journal_entry(path: Path, section: str) -> Path:
    key = hashlib.sha256(str(path.absolute()).encode()).hexdigest()[:40]
    return sve_home() / section / f"{key}.json"


def _identity(path: Path) -> list[int]:
    status = path.lstat()
    return [status.st_dev, status.st_ino]


def journal(path: Path, section: str) -> None:
    """Record that sve made `path` (which exists now): its absolute path, device and inode, under
    `$SVE_HOME/SECTION/`. A failure to record leaves it unrecorded — never replaced: the safe side."""
    entry = _journal_entry(path, section)
    with contextlib.suppress(OSError):
        entry.parent.mkdir(parents=True, exist_ok=True)
        entry.write_text(json.dumps({"path": str(path.absolute()), "identity": _identity(path)}))


def unjournal(path: Path, section: str) -> None:
    with contextlib.suppress(OSError):
        _journal_entry(path, section).unlink(missing_ok=True)


def in_journal(path: Path, section: str) -> bool:
    """True when the journal recorded exactly this file or folder (the same inode at the same path)."""
    try:
        record = json.loads(_journal_entry(path, section).read_text(encoding="utf-8"))
        return record["path"] == str(path.absolute()) and record["identity"] == _identity(path)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def record_temporary(temporary: Path) -> None:
    journal(temporary, "temporaries")


def forget_temporary(temporary: Path) -> None:
    """Drop `temporary`'s record (after it was renamed into place or removed)."""
    unjournal(temporary, "temporaries")


def is_own_temporary(path: Path) -> bool:
    """True when `path` is named like a temporary and the journal recorded exactly it."""
    return bool(TEMPORARY.fullmatch(path.name)) and in_journal(path, "temporaries")


def remove_temporary(path: Path) -> None:
    """Remove one of sve's own temporaries (a file or a folder) and its record; anything else stays."""
    if not is_own_temporary(path):
        return
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    forget_temporary(path)


def claim_temporary(path: Path, kind: str = "tmp") -> Path:
    """The temporary sibling `.NAME.KIND-PID` of `path`, cleared if it is a leftover of sve's own;
    one clear line when something else holds that name."""
    temporary = path.with_name(f".{path.name}.{kind}-{os.getpid()}")
    remove_temporary(temporary)
    if temporary.exists() or temporary.is_symlink():
        raise SveError(f"{temporary} exists and sve did not make it; move it away (sve writes {path.name} "
                       "through that name)")
    return temporary


def sweep_temporaries(directory: Path, of: str | None = None) -> None:
    """Remove sve's own temporaries left in `directory` by killed writers (of the output `of` only)."""
    for leftover in directory.iterdir():
        if of is None or re.fullmatch(rf"\.{re.escape(of)}\.(tmp|old)-\d+", leftover.name):
            remove_temporary(leftover)


def public_names(text: str) -> str:
    """`text` with this process's temporary names (`.NAME.tmp-PID`, `.NAME.old-PID`) replaced by `NAME`;
    a user's file that merely looks like one (another number) keeps its name."""
    return re.sub(rf"(?<![\w.])\.([^/\s]+?)\.(?:tmp|old)-{os.getpid()}(?!\d)", r"\1", text)


def is_bookkeeping(path: Path) -> bool:
    """The lock file, or sve's own temporary of an interrupted write: never part of an output."""
    return path.name == LOCK_NAME or is_own_temporary(path)


def visible_entries(directory: Path) -> list[Path]:
    """What a directory holds besides sve's lock and temporaries."""
    return [path for path in directory.iterdir() if not is_bookkeeping(path)]


@contextlib.contextmanager
def exclusive(directory: Path, what: str, wait: bool, on_wait=None) -> Iterator[None]:
    """Hold `directory/.sve.lock` for the block; then remove temporaries of interrupted writes.

    `wait=False` refuses at once (one line) when another process holds it; `wait=True` blocks,
    calling `on_wait()` first, so the second process finds the first one's finished work.
    """
    directory.mkdir(parents=True, exist_ok=True)
    handle = open(directory / LOCK_NAME, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise LockedError(f"{directory} is in use by another sve {what}; wait for it to finish "
                                  "or choose another output") from None
            on_wait and on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        sweep_temporaries(directory)  # nobody else writes here now: leftovers are dead
        yield
    finally:
        handle.close()  # releases the lock


def parse_size(text: str | int) -> int:
    """'500MB', '2GB', '1GiB' or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", text, re.IGNORECASE)
    if not match:
        raise SveError(f"cannot read size '{text}' (try 500MB, 2GB or a byte count)")
    unit = (match.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = "BKMGT".index(unit[0]) if unit[0] in "KMGT" else 0
    return int(float(match.group(1)) * base**power)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path`; on success fsync it and rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = claim_temporary(path)
    try:
        with open(temporary, "xb"):
            record_temporary(temporary)  # the writer below reuses this file (and its journal record)
        yield temporary
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o666 & ~_UMASK)  # some writers create 0600 files
        fault_point("before-rename")
        os.replace(temporary, path)
        _fsync_directory(path.parent)
    finally:
        temporary.unlink(missing_ok=True)
        forget_temporary(temporary)


def create_new(path: Path, text: str, option: str, check=None) -> None:
    """Write `text` to `path`, which must not exist: written whole under a temporary name, checked
    (`check(temporary)` may raise), then linked into place (a hard link never replaces what appeared in the
    meantime); `option` names it in the refusal."""
    if path.exists() or path.is_symlink():
        raise SveError(f"{option} {path} already exists; sve never replaces it: choose another name")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = claim_temporary(path)
    try:
        with open(temporary, "x", encoding="utf-8") as handle:
            record_temporary(temporary)
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o666 & ~_UMASK)
        if check is not None:
            check(temporary)
        try:
            os.link(temporary, path)
        except FileExistsError:
            raise SveError(f"{option} {path} already exists; sve never replaces it: choose another name") from None
        _fsync_directory(path.parent)
    finally:
        temporary.unlink(missing_ok=True)
        forget_temporary(temporary)


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_json(path: Path, payload: dict) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n", encoding="utf-8")


Layout = Sequence[tuple[str, torch.dtype, Sequence[int]]]  # (name, dtype, shape) in file order


def _header(layout: Layout, metadata: dict[str, str]) -> bytes:
    """A safetensors header: keys sorted (equal content gives equal bytes), data in layout order.

    (`safetensors.torch.save_file` orders its header by hash map, which differs per process; a
    reproducible cache wants byte-identical files.)
    """
    entries: dict[str, object] = {}
    offset = 0
    for name, dtype, shape in layout:
        nbytes = math.prod(shape) * dtype.itemsize
        entries[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                         "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header = {"__metadata__": dict(sorted(metadata.items())), **dict(sorted(entries.items()))}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8-byte alignment
    return len(encoded).to_bytes(8, "little") + encoded


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data


def save_file(tensors: dict[str, torch.Tensor], filename: str, metadata: dict[str, str]) -> None:
    """Write a whole safetensors file (deterministic bytes, see `_header`)."""
    layout = [(name, tensors[name].dtype, tensors[name].shape) for name in sorted(tensors)]
    with open(filename, "wb") as handle:
        handle.write(_header(layout, metadata))
        for name, _, _ in layout:
            handle.write(_tensor_bytes(tensors[name]))


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write one safetensors file atomically, with `{"format": "pt"}` among its metadata."""
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata={"format": "pt", **metadata})


@dataclass
class Shard:
    filename: str
    names: list[str]
    nbytes: int


def plan_shards(sizes: Sequence[tuple[str, int]], max_shard_size: int, prefix: str,
                single_name: str | None = None) -> list[Shard]:
    """Group tensors, in order, into HF-named shards of at most `max_shard_size` bytes each.

    Sizes are known from shapes before any tensor is computed, so the shard names
    (`prefix-00001-of-00003.safetensors`) are fixed up front and a rerun plans the same files.
    """
    groups: list[list[tuple[str, int]]] = [[]]
    for name, nbytes in sizes:
        if groups[-1] and sum(b for _, b in groups[-1]) + nbytes > max_shard_size:
            groups.append([])
        groups[-1].append((name, nbytes))
    count = len(groups)
    shards = []
    for number, group in enumerate(groups, start=1):
        filename = f"{prefix}-{number:05d}-of-{count:05d}.safetensors"
        if count == 1 and single_name:
            filename = single_name
        shards.append(Shard(filename, [n for n, _ in group], sum(b for _, b in group)))
    return shards


IN_FLIGHT = 3  # tensors handed to the writer thread and not yet written (a target's U, S and Vh)
SYNC_EVERY = 8_000_000  # bytes written between fsyncs in the writer thread, so a commit flushes only the tail


class ShardWriter:
    """Streams shards to disk tensor by tensor in a background thread.

    The caller declares a shard's layout (`begin`), hands over tensors as it computes them
    (`add`), and `commit`s; meanwhile earlier tensors are written (and, with `fingerprint`, hashed for
    the caller's checksums) by one thread, up to `IN_FLIGHT` of them: a target's U, S and Vh are written
    while the next SVD runs, and memory stays bounded. A shard lives under a temporary name until its commit, which
    may rewrite the header's metadata with final values of the same length (e.g. fixed-width
    numbers known only at the end), then fsyncs and renames it. The thread also fsyncs every
    `SYNC_EVERY` bytes as it goes: the disk is written behind the caller's work, not all at the commit.
    """

    def __init__(self, directory: Path, fingerprint: bool = False):
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sve-writer")
        self._pending: list[Future] = []  # writes queued to the writer thread, oldest first
        self._handle = None
        self._layout: Layout = []
        self._written = 0
        self.fingerprints: dict[str, str] = {}  # tensor name -> `tensor_fingerprint`, computed as it is written

    def _submit(self, function, *args) -> None:
        while len(self._pending) >= IN_FLIGHT:  # memory stays bounded
            self._pending.pop(0).result()
        self._pending.append(self._executor.submit(function, *args))

    def wait(self) -> None:
        while self._pending:
            self._pending.pop(0).result()

    def begin(self, filename: str, layout: Layout, metadata: dict[str, str]) -> None:
        self.wait()
        self._path = self.directory / filename
        self.directory.mkdir(parents=True, exist_ok=True)
        self._temporary = claim_temporary(self._path)
        self._layout, self._metadata, self._written = list(layout), {"format": "pt", **metadata}, 0
        self._unsynced = 0
        self._header_size = len(_header(self._layout, self._metadata))
        self._handle = open(self._temporary, "xb")
        record_temporary(self._temporary)
        self._handle.write(_header(self._layout, self._metadata))
        fault_point("shard-begun")

    def add(self, name: str, tensor: torch.Tensor) -> None:
        expected_name, dtype, shape = self._layout[self._written]
        if (name, tensor.dtype, tuple(tensor.shape)) != (expected_name, dtype, tuple(shape)):
            raise ValueError(f"shard layout expects {expected_name} {dtype} {list(shape)}, got {name}")
        self._written += 1
        self._submit(self._write, name, tensor)

    def _write(self, name: str, tensor: torch.Tensor) -> None:
        self._unsynced += self._handle.write(_tensor_bytes(tensor))
        if self._unsynced >= SYNC_EVERY:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._unsynced = 0
        if self.fingerprint:
            self.fingerprints[name] = tensor_fingerprint(tensor)  # hashing overlaps the caller's next tensor

    def commit(self, metadata: dict[str, str] | None = None) -> None:
        if self._written != len(self._layout):
            raise ValueError(f"shard {self._path.name} is missing {self._layout[self._written][0]}")
        self._submit(self._finish, {**self._metadata, **(metadata or {})})
        self.wait()

    def _finish(self, metadata: dict[str, str]) -> None:
        handle, self._handle = self._handle, None
        try:
            handle.seek(0)
            header = _header(self._layout, metadata)
            if len(header) != self._header_size:
                raise ValueError("final shard metadata must keep the header's length")
            handle.write(header)
            handle.flush()
            os.fsync(handle.fileno())
        finally:
            handle.close()
        os.chmod(self._temporary, 0o666 & ~_UMASK)
        fault_point("before-rename")
        os.replace(self._temporary, self._path)
        forget_temporary(self._temporary)
        _fsync_directory(self._path.parent)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._executor.shutdown(wait=True)
            if self._handle is not None:  # an unfinished shard: its temporary is never trusted
                self._handle.close()
                self._temporary.unlink(missing_ok=True)
                forget_temporary(self._temporary)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def write_index(path: Path, weight_map: dict[str, str], total_size: int, **metadata) -> None:
    """An HF-style `*.safetensors.index.json` with `metadata.total_size`."""
    write_json(path, {"metadata": {"total_size": total_size, **metadata}, "weight_map": weight_map})
