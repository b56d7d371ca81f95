"""The output-safety rule every command follows before it writes.

- An output is never one of the command's inputs and never contains one (paths compared resolved,
  symlinks followed); a directory that is replaced whole (an export) is never the current directory
  or one of its parents.
- `--overwrite` replaces only what that command itself made, recognised by its own marker (an
  export's `config.json` "sve" entry, a report's `report.json`, a Σ bank's metadata (its kind,
  `bank.BANK_OUTPUT`, lives with the bank format), the journal's record of a predictions
  file (`writing.journal`), a run's files), and never a directory that holds anything else.
- Two commands writing one output are serialised: `output_lock` holds a lock on the output's parent
  directory while the output is made and renamed into place, so the second one finds the first's
  result (and refuses it without `--overwrite`); temporaries of killed writers are removed then.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from sve_cli.errors import OutputExistsError, SveError
from sve_cli.writing import in_journal, is_bookkeeping, sweep_temporaries, visible_entries


def resolved(path: Path | str) -> Path:
    return Path(path).expanduser().resolve()


def refuse_inputs(out: Path, inputs: Iterable[Path | str | None], option: str = "--out") -> None:
    """One clear error when `out` is one of `inputs` or holds one of them."""
    target = resolved(out)
    for item in inputs:
        if item is None or str(item) == "":
            continue
        source = resolved(item)
        if target == source:
            raise SveError(f"{option} {out} is one of this command's inputs ({item}); choose another {option}")
        if target in source.parents:
            raise SveError(f"{option} {out} contains {item}, an input of this command; choose another {option}")


def refuse_unusual(out: Path, directory: bool, option: str = "--out") -> None:
    """One line, at once, for an existing `--out` that is a broken symbolic link, not a regular file or
    directory (opening a pipe to look inside would block), or a file where a directory is written."""
    if out.is_symlink() and not out.exists():
        raise OutputExistsError(f"{option} {out} is a broken symbolic link; sve never replaces it: choose another {option}")
    if out.exists() and not out.is_dir() and not out.is_file():
        raise OutputExistsError(f"{option} {out} is not a regular file or directory (a pipe, socket or device); "
                                f"sve never writes there: choose another {option}")
    if directory and out.exists() and not out.is_dir():
        raise OutputExistsError(f"{option} {out} is a file, not a directory")


@dataclass(frozen=True)
class OutputKind:
    """What a command writes, and how to recognise an earlier one of its own."""

    noun: str  # "an sve export", …: said in messages
    is_directory: bool
    recognise: Callable[[Path], bool]  # True when `path` is this command's own earlier output
    own_entries: Callable[[Path], set[str] | None] = lambda path: None  # a directory's own names (None: any)
    replaced_whole: bool = True  # False: the command writes its own files into the directory


def check_output(out: Path, kind: OutputKind, overwrite: bool, inputs: Iterable[Path | str | None] = (),
                 option: str = "--out") -> bool:
    """Refuse what the rule forbids; True when `out` exists and `--overwrite` will replace it. `option` is
    how the command line names `out` (`--report` for a report)."""
    refuse_inputs(out, inputs, option)
    cwd = Path.cwd().resolve()
    if kind.is_directory and kind.replaced_whole and (resolved(out) == cwd or resolved(out) in cwd.parents):
        raise SveError(f"{option} {out} is the current directory or one of its parents; choose another {option}")
    if not out.exists() and not out.is_symlink():
        return False
    refuse_unusual(out, directory=kind.is_directory, option=option)
    if not kind.is_directory and out.is_dir():
        raise OutputExistsError(f"{option} {out} is a directory, not a file")
    if kind.is_directory and not visible_entries(out):
        return False  # an empty directory (or one holding only sve's lock): nothing to lose
    if not kind.recognise(out):
        raise OutputExistsError(f"{out} exists and is not {kind.noun}; sve never replaces it: choose another {option}")
    own = kind.own_entries(out) if kind.is_directory else None
    if own is not None:
        foreign = foreign_entries(out, own) if kind.replaced_whole else sorted(
            p.name for p in visible_entries(out) if p.name not in own)
        if foreign:
            raise OutputExistsError(f"{out} holds files sve did not write there (e.g. {foreign[0]}); "
                                    f"sve never replaces it: choose another {option}")
    if not overwrite:
        raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it")
    return True


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on `out`'s parent directory for the block (a second writer waits), then
    remove what killed writers of `out` left there (sve's own temporaries only: `writing.is_own_temporary`)."""
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        sweep_temporaries(parent, of=out.name)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def _json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def tool_files(directory: Path, name: str, section: str | None = None) -> set[str] | None:
    """The `files` list an sve manifest (`name`, optionally under `section`) records — paths relative to
    `directory`, `/`-separated (an export's `2_Dense/model.safetensors`) — or None."""
    payload = _json(directory / name)
    if isinstance(payload, dict) and section:
        payload = payload.get(section)
    files = payload.get("files") if isinstance(payload, dict) else None
    if not isinstance(files, list):
        return None
    return {f for f in files if isinstance(f, str) and f and not f.startswith("/")
            and all(part not in ("", ".", "..") for part in f.split("/"))} | {name}


def foreign_entries(directory: Path, own: set[str]) -> list[str]:
    """Every entry under `directory` (symlinks not followed) that is not one of the `own` files and does
    not lead to one: a user's file in an export's `2_Dense/`, a symlink, a pipe, an empty folder."""
    folders = {"/".join(path.split("/")[:depth]) for path in own for depth in range(1, path.count("/") + 1)}
    foreign = []
    for root, directories, files in os.walk(directory):
        relative = Path(root).relative_to(directory)
        for entry in sorted(directories) + sorted(files):
            path = (relative / entry).as_posix()
            if relative == Path(".") and is_bookkeeping(directory / entry):
                continue  # sve's lock and temporaries
            kept = path in folders if entry in directories and not (Path(root) / entry).is_symlink() else (
                path in own and (Path(root) / entry).is_file() and not (Path(root) / entry).is_symlink())
            if not kept:
                foreign.append(path)
        directories[:] = [d for d in directories if (relative / d).as_posix() in folders]
    return foreign


def _is_sve_export(directory: Path) -> bool:
    config = _json(directory / "config.json")
    return isinstance(config, dict) and isinstance(config.get("sve"), dict) \
        and str(config["sve"].get("tool", "")).startswith("sve")


def _is_sve_report(directory: Path) -> bool:
    report = _json(directory / "report.json")
    return isinstance(report, dict) and str(report.get("tool", "")).startswith("sve")


def _is_sve_predictions(path: Path) -> bool:
    """A predictions file `sve predict` wrote: the file sve's journal recorded at this path (a CSV or
    JSONL carries no marker inside; columns that look like sve's are not one), or a parquet file with
    sve's schema marker."""
    if in_journal(path, "outputs"):
        return True
    if path.suffix.lower() != ".parquet":
        return False
    try:
        import pyarrow.parquet as pq

        return b"sve" in (pq.read_schema(path).metadata or {})
    except Exception:  # OSError, or pyarrow's own errors for a file that is not parquet
        return False


EXPORT = OutputKind("an sve export", True, _is_sve_export, lambda path: tool_files(path, "config.json", "sve"))
REPORT = OutputKind("an sve report", True, _is_sve_report, lambda path: tool_files(path, "report.json"), False)
PREDICTIONS = OutputKind("an sve predictions file", False, _is_sve_predictions)
