"""Reading and writing the project's JSON documents (configs, inventories, plans) one way.

Errors are one line naming the file; a pydantic validation error becomes "where: what".
Writes go to a temporary file renamed into place, so a reader never sees half a document.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from alloy.errors import ConfigError


def read_json_object(path: str | Path, what: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such {what}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def validation_message(err) -> str:
    """The first problem of a pydantic ValidationError as 'field.path: message'."""
    first = err.errors()[0]
    message = first["msg"].removeprefix("Value error, ")  # a validator's own sentence
    where = ".".join(str(p) for p in first["loc"])
    return f"{where}: {message}" if where else message


def write_text_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    if path.exists() and not path.is_file() and not path.is_dir():
        # /dev/stdout, a FIFO: written through, never replaced by a regular file.
        path.write_text(text)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # pid: ranks may save at once
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        # The user named `path`; the temporary file is ours: the error names theirs.
        raise type(err)(err.errno, err.strerror, str(path)) from None
