"""Hub ids (`org/name[@revision]`) -> a folder in the local Hugging Face cache, and `pull`.

Offline-first: resolving never touches the network, whatever HF_HUB_OFFLINE says; only `pull`
downloads. huggingface_hub is optional: imported here, on first use, with an install hint.
"""

from __future__ import annotations

import re
from pathlib import Path

from alloy.errors import CheckpointError, ConfigError

# The hub's own rules for a repo id: one '/', each part of letters, digits, '-', '_', '.'.
HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")


def parse_hub_id(model: str) -> tuple[str, str | None] | None:
    """(repo_id, revision) when `model` reads as a hub id, else None."""
    match = HUB_ID.fullmatch(model)
    if match is None or match["repo"].endswith((".gguf", ".json", ".safetensors")):
        return None
    return match["repo"], match["revision"]


def resolve_model(model: str | Path) -> Path:
    """A path as given when it exists (or does not read as a hub id); a hub id's snapshot folder
    from the local cache otherwise."""
    path = Path(model)
    if path.exists() or isinstance(model, Path):
        return path
    parsed = parse_hub_id(str(model))
    if parsed is None:
        return path  # the caller says what is wrong with a missing path
    return cached_snapshot(*parsed)


def _hub():
    try:
        import huggingface_hub
        import huggingface_hub.errors  # noqa: F401  (hub.errors below)
    except ImportError:
        raise ConfigError("hub ids need the huggingface_hub package: pip install 'alloy-lm[hub]'") from None
    return huggingface_hub


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The snapshot folder of `repo_id` at `revision` (default: main) in the local cache."""
    hub = _hub()
    try:
        return Path(hub.snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (hub.errors.LocalEntryNotFoundError, hub.errors.RevisionNotFoundError, FileNotFoundError):
        name = repo_id + (f"@{revision}" if revision else "")
        raise CheckpointError(f"{name}: not in the local Hugging Face cache — run `alloy pull {name}`") from None


def pull(model: str) -> Path:
    """Download `org/name[@revision]` into the Hugging Face cache; the snapshot folder."""
    parsed = parse_hub_id(model)
    if parsed is None:
        raise ConfigError(f"{model!r} is not a hub id; expected org/name or org/name@revision")
    hub = _hub()
    repo_id, revision = parsed
    try:
        return Path(hub.snapshot_download(repo_id, revision=revision))
    except (hub.errors.RepositoryNotFoundError, hub.errors.RevisionNotFoundError, hub.errors.GatedRepoError) as err:
        raise CheckpointError(f"{model}: {type(err).__name__} on the Hugging Face hub ({_first_line(err)})") from None
    except Exception as err:  # noqa: BLE001  offline (HF_HUB_OFFLINE), no route, DNS, proxy, timeout...
        raise CheckpointError(f"{model}: cannot download — the Hugging Face hub is unreachable or offline mode "
                              f"is on ({_first_line(err)})") from None


def _first_line(err: Exception) -> str:
    return " ".join(str(err).split())[:160]


def existing_model(model: str | Path) -> Path:
    """`model` resolved (hub id -> cache folder) and checked to be a model folder or GGUF file."""
    path = resolve_model(model)
    if not (path.is_dir() or (path.is_file() and path.suffix == ".gguf")):
        raise ConfigError(f"{model} is not a model directory, GGUF file or hub id (org/name[@revision])")
    return path


def display_name(model: str | Path, path: Path) -> str:
    """What to call a resolved model: its hub id (not the snapshot's commit hash), else the
    folder's or file's name."""
    parsed = None if Path(model).exists() else parse_hub_id(str(model))
    return parsed[0] if parsed else path.resolve().name
