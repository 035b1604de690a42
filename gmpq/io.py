"""Atomic file writes: write to a temporary file in the same folder, fsync, then rename.

A crash mid-write leaves the previous file intact, never a truncated one.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gmpq.errors import UserError

if TYPE_CHECKING:
    from PIL import Image


# A temporary file is ``.<name>.<pid>-<random>.tmp`` beside its target: the writer's process id lets the next run
# tell the leftovers of a killed write (that process is gone) from a write in progress.
_TMP_SUFFIX = ".tmp"


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}-"


def os_error_cause(e: OSError) -> str:
    """What an ``OSError`` means for the user, with its errno name (``ENOSPC``...)."""
    hints = {
        errno.ENOSPC: "no space left on device: free some space or choose another output folder",
        errno.EDQUOT: "disk quota exceeded: free some space or choose another output folder",
        errno.EROFS: "the file system is read-only: choose another output folder",
        errno.EACCES: "permission denied: choose a folder you can write to",
        errno.EPERM: "operation not permitted: choose a folder you can write to",
        errno.ENOTDIR: "a parent of this path is a file, not a folder: choose another output path",
        errno.EEXIST: "a file with this name exists where a folder is needed: choose another output path",
        errno.EISDIR: "this path is a folder, not a file: give a file name",
        errno.ENAMETOOLONG: "the name is too long",
    }
    cause = hints.get(e.errno) or (e.strerror or str(e))
    return f"{cause} [errno {errno.errorcode.get(e.errno, e.errno)}]"


def write_error(path: str | os.PathLike, e: OSError, action: str = "write") -> UserError:
    """A clear ``UserError`` for an ``OSError`` met while writing ``path``: names the file and the cause (disk
    full, read-only file system, permission denied, a file where a folder is needed...)."""
    culprit = f" ({e.filename!s})" if e.filename and str(e.filename) != str(path) and not str(e.filename).endswith(
        _TMP_SUFFIX) else ""
    return UserError(f"cannot {action} {str(path)!r}{culprit}: {os_error_cause(e)}")


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(path.parent, e, "create the folder") from None
    if not path.parent.is_dir():
        raise write_error(path.parent, FileExistsError(errno.EEXIST, "File exists", str(path.parent)),
                          "create the folder")


def _publish(tmp: str, path: Path) -> None:
    """Give the temporary file the permissions a plain ``open()`` would (mkstemp makes it 0600), then rename."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; an ``OSError`` (disk full, read-only, permission) becomes a
    ``UserError`` naming the file and the cause, and the temporary file is removed."""
    path = Path(path)
    _make_parent(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_tmp_prefix(path), suffix=_TMP_SUFFIX)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise write_error(path, e) from None
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` atomically. The object is serialized in memory first, so a full disk is reported as the
    ``OSError`` it is (torch's own writer turns it into ``RuntimeError: basic_ios::clear``)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getbuffer())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: the process exists but belongs to someone else
        return True
    return True


def clean_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files (``.<name>.<pid>-*.tmp``) that killed writes left in ``folder``; a temp file
    whose writer is still running is kept. Returns the removed paths."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.glob(".*" + _TMP_SUFFIX):
        match = re.fullmatch(r"\..+\.(\d+)-[a-z0-9_]+\.tmp|\..+\.[a-z0-9_]{8}\.tmp", p.name)
        if match is None or not p.is_file():
            continue
        pid = match.group(1)
        if pid is not None and _pid_alive(int(pid)):
            continue
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass  # not ours to remove (permissions): harmless, it is a hidden file
    return removed


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path``, remove temporary files left by killed writes, and prove the folder is writable now, so a
    long job fails before it starts, not after."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"output folder {str(path)!r} is an existing file, not a folder; choose another path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path, prefix=".write-test.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UserError(f"output folder {str(path)!r} is not writable: {os_error_cause(e)}") from None
    clean_stale_temps(path)
    return path


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Read a JSON file; errors name the file and the position of the syntax error, or the duplicated key (JSON
    parsers silently keep the last of two equal keys, which hides an edit that did not take effect)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {str(path)!r} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        where = f"line {e.lineno} column {e.colno}"
        raise UserError(f"{what} {str(path)!r} is not valid JSON: {e.msg} at {where}") from None
    except _DuplicateKey as e:
        raise UserError(f"{what} {str(path)!r} has the key {e.args[0]!r} twice in one object; keep one") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} {str(path)!r} is not a UTF-8 text file") from None
    except OSError as e:
        raise UserError(f"cannot read {what} {str(path)!r}: {os_error_cause(e)}") from None


def load_image(path: str | os.PathLike, mode: str = "RGB") -> Image.Image:
    """Decode an image file to ``mode`` ("RGB", or "L" for grayscale); a missing or undecodable file is a
    ``UserError`` naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert(mode)
    except FileNotFoundError:
        raise UserError(f"image {str(path)!r} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"image {str(path)!r} cannot be decoded ({type(e).__name__}: {e}); "
                        f"expected a JPEG or PNG file") from None
