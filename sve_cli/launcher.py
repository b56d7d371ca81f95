"""`sve train RECIPE --nproc N`: torchrun's elastic agent, started here, with one line per failure.

Plain `torchrun … -m sve_cli train` works too, but torchrun then prints its own ChildFailedError
report (a traceback and a table) after the rank's `error:` line, every rank prints the same line,
and a rank whose peer died prints the communication library's traceback. Here the agent runs in this
process with its log quiet; each rank records its one-line message in a folder named by
`SVE_RANK_MESSAGES` instead of printing it (rank 0 prints too, at once); and when ranks fail this
process prints each distinct message once, a rank killed by a signal in one line, and a rank that
only lost its peer only when nothing else explains the failure.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import tempfile
import uuid
from pathlib import Path

MESSAGES = "SVE_RANK_MESSAGES"  # the folder where each rank records its one-line message
PEER_LOST = "lost contact with another rank"


def record_rank_message(text: str, peer_lost: bool = False) -> bool:
    """Under `sve train --nproc`, record this rank's message for the launcher; True when the rank should
    not also print it (every rank but rank 0, and any rank's lost-peer message)."""
    folder = os.environ.get(MESSAGES)
    if not folder:
        return False
    rank = os.environ.get("RANK", "0")
    try:
        (Path(folder) / f"rank-{rank}.json").write_text(json.dumps({"text": text, "peer_lost": peer_lost}))
    except OSError:
        return False  # the launcher is gone: say it here
    return rank != "0" or peer_lost


def _failure_lines(failures: dict, folder: Path) -> list[str]:
    """One line per distinct cause: the ranks' recorded messages (rank 0's already printed), then ranks
    that ended without one (a signal, or a traceback above); lost-peer messages only when alone."""
    messages = {}
    for path in sorted(folder.glob("rank-*.json")):
        try:
            messages[int(path.stem.removeprefix("rank-"))] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a rank killed while writing it: its exit code speaks for it
    causes = {rank: m for rank, m in messages.items() if not m["peer_lost"]}
    lines: list[str] = []
    seen = {causes[0]["text"]} if 0 in causes else set()
    for rank, message in sorted(causes.items()):
        if message["text"] not in seen:
            seen.add(message["text"])
            lines.append(f"rank {rank}: {message['text']}")
    stopped = []  # ranks the agent stopped (SIGTERM) once another had failed: consequences, not causes
    for rank, failure in sorted(failures.items()):
        if rank in messages:
            continue
        code = failure.exitcode
        if code == -signal.SIGTERM:
            stopped.append(f"rank {rank} was stopped (SIGTERM)")
        elif code < 0:
            hint = " (often the out-of-memory killer)" if -code == signal.SIGKILL else ""
            lines.append(f"rank {rank} was stopped by {signal.Signals(-code).name}{hint}")
        else:
            lines.append(f"rank {rank} failed with exit code {code} (its traceback is above)")
    if lines or seen:
        return lines
    peers = [f"rank {rank}: {m['text']}" for rank, m in sorted(messages.items())]
    return (peers or stopped)[:1]


def check_ranks(nproc: int, device: str) -> None:
    """One line when this machine cannot run `nproc` ranks: one per GPU, or at most one per CPU core."""
    import torch

    from sve_cli.errors import SveError

    if device != "cpu" and torch.cuda.is_available():
        if nproc > torch.cuda.device_count():
            raise SveError(f"--nproc {nproc}: this machine has {torch.cuda.device_count()} GPU(s); start one rank "
                           "per GPU (more machines: run torchrun on each)")
    elif nproc > (os.cpu_count() or 1):
        raise SveError(f"--nproc {nproc} is more than this machine's {os.cpu_count()} CPU cores (and it has no GPU): "
                       "ranks would only wait for each other; choose at most one per core")


def launch(nproc: int, arguments: list[str]) -> list[str] | None:
    """Run `python -m sve_cli ARGUMENTS` on `nproc` local processes: None when every rank succeeded, else
    the lines still to print (empty when rank 0 already said it all)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in ("torch.distributed.elastic", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)  # the agent's own log: replaced by our lines
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    with tempfile.TemporaryDirectory(prefix="sve-ranks-") as folder:
        previous = os.environ.get(MESSAGES)
        os.environ[MESSAGES] = folder
        try:
            elastic_launch(config, sys.executable)("-m", "sve_cli", *arguments)
        except ChildFailedError as error:
            return _failure_lines(error.failures, Path(folder))
        finally:
            if previous is None:
                os.environ.pop(MESSAGES, None)
            else:
                os.environ[MESSAGES] = previous
    return None
