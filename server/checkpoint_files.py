"""A checkpoint's files written atomically into ``checkpoints/``, here or by a helper process.

``write_checkpoint_folder`` is the layout: the files under a temporary name, each one and the folder
fsynced, the folder renamed into place, ``LATEST`` replaced, the oldest folders pruned.
``write_checkpoint`` then appends the round's lines (``metrics.jsonl``, ``timings.jsonl``) and
fsyncs them, so a line never names a round whose checkpoint a crash could lose, and the lines of
every earlier round are durable before the next checkpoint is written (a checkpoint's
``state.json`` holds only the history that is not in ``metrics.jsonl`` yet).

``CheckpointFilesProcess`` runs ``write_checkpoint`` in a child process (``python -m
flowerbed.server.checkpoint_files``). A checkpoint is some forty system calls, and a thread that
makes them hands the interpreter's lock back and forth with the training thread at each one: on a
round of 100 small clients that cost the training about 2 ms a round. The child takes the files
through a pipe and writes them with its own interpreter; the thread that waits for it blocks once.

The child reads a checkpoint's whole frame before it writes anything, so a parent that dies
mid-frame leaves no partial checkpoint. It writes for its parent only: before each step that
commits something (the folder's rename, ``LATEST``, the lines) it checks that its parent is alive,
and stops otherwise, so a restarted run never races a dead run's writer. It exits when its input
closes, starts with Ctrl-C ignored (its parent waits for the checkpoint in hand on the way out),
and imports little: it starts in tens of milliseconds.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import BinaryIO

from flowerbed.exception import RunError
from flowerbed.process_control import popen_ignoring_interrupt

_HEADER = struct.Struct("<I")  # the byte length of a frame's JSON header


class LinesNotAppended(RunError):
    """The checkpoint is durable, but appending its lines failed."""


class ParentGone(Exception):
    """The child's parent has exited: nothing more is committed for it."""


def fsync_dir(path: Path) -> None:
    """Make the entries of folder ``path`` (a new file, a rename) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _round_number(folder: Path) -> int:
    return int(folder.name.removeprefix("round-"))


def write_checkpoint_folder(
    root: Path, name: str, files: dict[str, bytes], keep: int, proceed: Callable[[], None] = lambda: None
) -> Path:
    """Write ``files`` as ``root/name/`` atomically, point ``root/LATEST`` at it, keep the newest ``keep``.

    Durable when this returns: every file, the folder's rename and ``LATEST`` are fsynced. A crash at
    any moment leaves either the previous or the new folder named by ``LATEST``, never a half-written
    one. ``proceed`` is called before the rename and before ``LATEST`` changes; it may raise to stop.
    """
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / name, root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for file_name, data in files.items():
        _write_bytes(tmp / file_name, data)
    fsync_dir(tmp)  # the folder's entries, before the folder is renamed into place
    proceed()
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync_dir(root)  # the rename, before LATEST may name it
    _write_bytes(root / ".LATEST.tmp", name.encode())
    proceed()
    os.replace(root / ".LATEST.tmp", root / "LATEST")
    fsync_dir(root)
    for old in sorted(root.glob("round-*"), key=_round_number)[:-keep]:  # by number: round-10000 is newer
        shutil.rmtree(old, ignore_errors=True)
    return final


def append_lines(lines: Iterable[tuple[Path, bytes]]) -> None:
    """Append each text to its file in a single ``write``, durably (a crash can at worst leave a torn last line).

    Durable when this returns: each file is fsynced, and the folder of a file this created.
    """
    for path, data in lines:
        created = not path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:  # a short write (a full disk, a file size limit) goes on, then raises
                written = os.write(fd, view)
                if not written:
                    raise OSError(errno.ENOSPC, "no byte could be appended", str(path))
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_dir(path.parent)


def write_checkpoint(
    root: Path,
    name: str,
    files: dict[str, bytes],
    keep: int,
    lines: Sequence[tuple[Path, bytes]] = (),
    proceed: Callable[[], None] = lambda: None,
) -> Path:
    """``write_checkpoint_folder``, then, once the folder is durable, ``append_lines(lines)``.

    Raises
    ------
    LinesNotAppended
        The folder is durable, but a line could not be appended.
    """
    written = write_checkpoint_folder(root, name, files, keep, proceed)
    proceed()
    try:
        append_lines(lines)
    except OSError as exc:
        raise LinesNotAppended(f"{written} is durable, but appending its round's lines failed: {exc}") from exc
    return written


class CheckpointFilesProcess:
    """A child process that runs ``write_checkpoint`` for its parent, one checkpoint at a time."""

    def __init__(self) -> None:
        self._child = popen_ignoring_interrupt(
            [sys.executable, "-P", "-m", "flowerbed.server.checkpoint_files", str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )

    @property
    def returncode(self) -> int | None:
        """The child's exit code, or ``None`` while it runs."""
        return self._child.poll()

    def write(
        self, root: Path, name: str, files: dict[str, bytes], keep: int, lines: Sequence[tuple[Path, bytes]] = ()
    ) -> Path:
        """``write_checkpoint`` in the child; its failure is raised here (an ``OSError`` as itself).

        Raises
        ------
        OSError
            The child's write failed with it.
        LinesNotAppended
            As ``write_checkpoint``.
        RunError
            The child stopped, or failed otherwise.
        """
        frame = {
            "root": os.path.abspath(root),
            "name": name,
            "keep": keep,
            "files": [[n, len(d)] for n, d in files.items()],
            "lines": [[os.path.abspath(path), len(d)] for path, d in lines],
        }
        header = json.dumps(frame).encode()
        assert self._child.stdin is not None and self._child.stdout is not None
        try:
            self._child.stdin.write(_HEADER.pack(len(header)) + header)
            for data in [*files.values(), *(d for _, d in lines)]:
                self._child.stdin.write(data)
            self._child.stdin.flush()
            answer = self._child.stdout.readline()
        except (BrokenPipeError, ValueError):
            answer = b""
        except BaseException:  # cut off mid-frame: the stream is out of step, so the child goes
            self._child.kill()
            raise
        if not answer:
            self._child.kill()
            raise RunError(
                f"the checkpoint writer process stopped (exit code {self._child.wait()}) before it wrote {root / name}"
            )
        return _outcome(json.loads(answer), root / name)

    def close(self, timeout: float = 30.0) -> None:
        """Close the child's input and wait for it to exit (killed after ``timeout`` seconds); idempotent."""
        if self._child.stdin is not None and not self._child.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self._child.stdin.close()
        try:
            self._child.wait(timeout)
        except subprocess.TimeoutExpired:
            self._child.kill()
            self._child.wait()
        if self._child.stdout is not None:
            self._child.stdout.close()


def _outcome(answer: dict, target: Path) -> Path:
    """The written folder of the child's answer, or its failure raised as ``write_checkpoint`` raises it."""
    if "written" in answer and "error" not in answer:
        return Path(answer["written"])
    if answer.get("stage") == "lines":
        raise LinesNotAppended(answer["error"])
    if answer.get("errno") is not None:
        error = OSError(answer["errno"], answer["message"], answer.get("filename"), None, answer.get("filename2"))
        error.add_note(f"raised by the checkpoint writer process: {answer['error']}")
        raise error
    raise RunError(f"the checkpoint writer process failed writing {target}: {answer['error']}")


def _read_exactly(stream: BinaryIO, size: int) -> bytes | None:
    data = stream.read(size)
    return data if len(data) == size else None


def _read_frame(source: BinaryIO) -> tuple[dict, dict[str, bytes], list[tuple[Path, bytes]]] | None:
    """The next frame of ``source`` whole (its header, files and lines), or ``None`` if it ends first."""
    head = _read_exactly(source, _HEADER.size)
    header = _read_exactly(source, _HEADER.unpack(head)[0]) if head is not None else None
    if header is None:
        return None
    frame = json.loads(header)
    files: dict[str, bytes] = {}
    lines: list[tuple[Path, bytes]] = []
    for file_name, size in frame["files"]:
        if (data := _read_exactly(source, size)) is None:
            return None
        files[file_name] = data
    for path, size in frame["lines"]:
        if (data := _read_exactly(source, size)) is None:
            return None
        lines.append((Path(path), data))
    return frame, files, lines


def _serve(source: BinaryIO, sink: BinaryIO, proceed: Callable[[], None] = lambda: None) -> None:
    """Write each frame of ``source`` as a checkpoint and answer it on ``sink``, until ``source`` ends.

    A frame cut short (its parent stopped mid-frame) writes nothing.
    """
    while (read := _read_frame(source)) is not None:
        frame, files, lines = read
        answer: dict[str, object]
        try:
            written = write_checkpoint(Path(frame["root"]), frame["name"], files, frame["keep"], lines, proceed)
            answer = {"written": str(written)}
        except LinesNotAppended as exc:
            answer = {"error": str(exc), "stage": "lines"}
        except OSError as exc:
            answer = {"error": repr(exc), "errno": exc.errno, "message": exc.strerror}
            answer.update(filename=exc.filename, filename2=exc.filename2)
        except ParentGone:
            return
        except Exception as exc:  # reported to the parent, which stops the run
            answer = {"error": repr(exc)}
        sink.write(json.dumps(answer).encode() + b"\n")
        sink.flush()


def _parent_alive(parent: int) -> Callable[[], None]:
    def proceed() -> None:
        if os.getppid() != parent:
            raise ParentGone

    return proceed


def main() -> None:
    """The child's loop: frames on stdin, one answer line each on stdout, for the parent named in argv."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _serve(sys.stdin.buffer, sys.stdout.buffer, _parent_alive(int(sys.argv[1])))


if __name__ == "__main__":
    main()
