"""Atomic file writes: write to a temporary file in the same folder, fsync, then rename.

A crash mid-write leaves the previous file intact, never a truncated one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gmpq.errors import UserError

if TYPE_CHECKING:
    from PIL import Image


def _publish(tmp: str, path: Path) -> None:
    """Give the temporary file the permissions a plain ``open()`` would (mkstemp makes it 0600), then rename."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        _publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` and prove it is writable now, so a long job fails before it starts, not after."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path, prefix=".write-test.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UserError(f"output folder {str(path)!r} is not writable: {e.strerror or e}") from None
    return path


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Read a JSON file; errors name the file and the position of the syntax error."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {str(path)!r} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        where = f"line {e.lineno} column {e.colno}"
        raise UserError(f"{what} {str(path)!r} is not valid JSON: {e.msg} at {where}") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} {str(path)!r} is not a UTF-8 text file") from None


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode an image file to RGB; a missing or undecodable file is a ``UserError`` naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"image {str(path)!r} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"image {str(path)!r} cannot be decoded ({type(e).__name__}: {e}); "
                        f"expected a JPEG or PNG file") from None
