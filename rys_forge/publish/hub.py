"""The Hugging Face Hub side of `publish`: token and offline checks, repo lookup, one-commit upload, confirmation.

`card.publish` gates on verification and renders the card; this module only talks to the Hub: `connect`
(offline mode, the token from `hf auth login` or `HF_TOKEN`, never printed or logged, checked with `whoami`),
`existing_files`, `upload` (the repo and branch created, the files staged by symlinks and sent in one
`upload_folder` commit, then the repo listed and every file's size and hash checked: sha256 for LFS/xet files,
the git blob id for regular ones). Hub client failures become one-line `PublishError`s.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rys_forge.artifacts import VERIFICATION_FILE
from rys_forge.errors import RysForgeError, UsageError, first_line
from rys_forge.files import sha256_file

__all__ = ["LOGIN_HINT", "HubAuthError", "PublishError", "RepoExistsError", "connect", "existing_files", "find_token",
           "offline", "upload", "upload_files"]

LOGIN_HINT = "run `hf auth login` (or set HF_TOKEN to a write token)"


class PublishError(RysForgeError):
    """Publishing failed: offline mode, the Hub refused a request, or the upload could not be confirmed."""


class HubAuthError(PublishError):
    """No Hugging Face token, or the Hub rejected it."""


class RepoExistsError(UsageError):
    """The target repo exists and `exist_ok` was not given."""


def upload_files(folder: Path) -> dict[str, Path]:
    """Files of the export that are uploaded: everything but hidden files/folders and Python caches.

    Raises:
        PublishError: an entry that would be uploaded is not a regular file (a symbolic link, say to the Hub
            token, or a special file); `artifacts.check_verified` refuses those first.
    """
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or "__pycache__" in rel.parts or path.suffix == ".pyc":
            continue
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise PublishError(f"{folder} holds {rel.as_posix()}, which is not a regular file; refusing to upload it")
        if path.is_file():
            files[rel.as_posix()] = path
    return files


def _stage(files: dict[str, Path], root: Path) -> None:
    """Mirror `files` under `root` by symlinks (hard links or copies where links are not allowed)."""
    for rel, source in files.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        source = source.resolve()
        try:
            os.symlink(source, target)
        except OSError:
            try:
                os.link(source, target)
            except OSError:
                shutil.copyfile(source, target)


def offline() -> bool:
    from huggingface_hub import constants

    env = any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE) or env


def find_token(token: str | None) -> str | None:
    if token:
        return token
    import huggingface_hub

    return huggingface_hub.get_token()


@contextlib.contextmanager
def _hub_errors(what: str, endpoint: str) -> Iterator[None]:
    """Hub client failures -> one-line `PublishError`s (the token never appears in them)."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        yield
    except OfflineModeIsEnabled:
        raise PublishError("HF_HUB_OFFLINE is set: publishing needs the network; unset HF_HUB_OFFLINE (and"
                           " TRANSFORMERS_OFFLINE) and retry") from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 401:
            raise HubAuthError(f"the Hub rejected the token while trying to {what} (401): {LOGIN_HINT}") from None
        if status == 403:
            raise HubAuthError(f"the token may not {what} (403): use a token with write access to the namespace") from None
        raise PublishError(f"could not {what}: {first_line(exc)}") from None
    except (OSError, ValueError) as exc:
        raise PublishError(f"could not {what} on {endpoint}: {first_line(exc)}") from None
    except Exception as exc:  # httpx transport errors and the like
        if any(c.__module__.startswith(("httpx", "httpcore", "huggingface_hub")) for c in type(exc).__mro__):
            raise PublishError(f"could not {what} on {endpoint}: {first_line(exc)}") from None
        raise


def _remote_files(api: Any, repo_id: str, revision: str | None) -> list[str]:
    """Files of the branch pushed to; a branch that does not exist yet starts from the default branch."""
    from huggingface_hub.errors import RevisionNotFoundError

    try:
        return sorted(api.list_repo_files(repo_id, revision=revision))
    except RevisionNotFoundError:
        return sorted(api.list_repo_files(repo_id))


def _git_blob_id(path: Path) -> str:
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _confirm_upload(api: Any, repo_id: str, revision: str | None, files: dict[str, Path], hashes: dict[str, str]) -> None:
    """Every uploaded file is in the repo with the local size and hash (LFS/xet: sha256; regular: git blob id)."""
    from huggingface_hub.hf_api import RepoFile

    remote = {e.path: e for e in api.list_repo_tree(repo_id, recursive=True, revision=revision) if isinstance(e, RepoFile)}
    bad = []
    for rel, path in files.items():
        entry = remote.get(rel)
        if entry is None or entry.size != path.stat().st_size:
            bad.append(rel)
        elif entry.lfs is not None:
            if entry.lfs.sha256 != (hashes.get(rel) or sha256_file(path)):
                bad.append(rel)
        elif entry.blob_id != _git_blob_id(path):
            bad.append(rel)
    if bad:
        raise PublishError(f"the upload to {repo_id} could not be confirmed: {', '.join(bad[:5])}"
                           f"{' ...' if len(bad) > 5 else ''} missing or different in the repo; publish again")


def connect(token: str | None, endpoint: str | None) -> tuple[Any, str]:
    """An authenticated `HfApi` and the endpoint, after the offline-mode and token checks."""
    from huggingface_hub import HfApi, constants

    if offline():
        raise PublishError("HF_HUB_OFFLINE is set (offline mode): publishing needs the network; unset HF_HUB_OFFLINE"
                           " (and TRANSFORMERS_OFFLINE) and retry")
    token = find_token(token)
    if not token:
        raise HubAuthError(f"no Hugging Face token found: {LOGIN_HINT}, then publish again")
    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    api = HfApi(endpoint=endpoint, token=token)
    with _hub_errors("check the token", endpoint):
        api.whoami()
    return api, endpoint


def existing_files(api: Any, endpoint: str, repo_id: str, revision: str | None) -> tuple[bool, list[str]]:
    """Whether the repo exists, and the files of the branch pushed to (empty for a new repo)."""
    with _hub_errors(f"look up {repo_id}", endpoint):
        existed = api.repo_exists(repo_id)
        return existed, (_remote_files(api, repo_id, revision) if existed else [])


def upload(api: Any, endpoint: str, repo_id: str, files: dict[str, Path], hashes: dict[str, str], *, message: str,
           private: bool, revision: str | None, exist_ok: bool) -> tuple[str, str | None]:
    """Create the repo (and branch), upload `files` (`{path in repo: local file}`) in one commit, then confirm
    every file's size and hash in the repo (`hashes`: known sha256 by path, saves hashing again).

    Returns:
        The repo's URL (with `/tree/<revision>` for a branch) and the commit's URL.

    Raises:
        HubAuthError, PublishError: a request failed, or the upload could not be confirmed.
    """
    from huggingface_hub import constants

    with _hub_errors(f"create {repo_id}", endpoint):
        repo_url = api.create_repo(repo_id, private=private, exist_ok=exist_ok, repo_type="model")
        if revision and revision != constants.DEFAULT_REVISION:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rys-publish-") as tmp, _hub_errors(f"upload to {repo_id}", endpoint):
        staging = Path(tmp)
        _stage(files, staging)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=staging,
            repo_type="model",
            revision=revision,
            commit_message=message,
            commit_description=f"Verified export: {VERIFICATION_FILE} passed; every file matches its recorded sha256.",
        )
    with _hub_errors(f"list {repo_id} after the upload", endpoint):
        _confirm_upload(api, repo_id, revision, files, hashes)
    url = str(repo_url).rstrip("/")
    if revision and revision != constants.DEFAULT_REVISION:
        url += f"/tree/{revision}"
    return url, getattr(commit, "commit_url", None)
