"""
Hub access for model.py and data/: is the Hub reachable, download a snapshot or one file at a revision (pinned
to the commit it resolved to), and failures that say what to do. Nothing here knows about models or datasets.

    path, sha = hub_download("Qwen/Qwen2.5-7B-Instruct", revision=None)   # a snapshot folder and its commit
    folder, sha = locate(name_or_path, revision)                           # a local folder as is (sha None)
"""

import os

# Choices (*ours*):
# a. Online or not is asked of huggingface_hub's own HTTP session (so HTTPS_PROXY, HF_ENDPOINT and its TLS settings
#    apply, as for the download itself): one request, a few seconds' timeout, no retries. HF_HUB_OFFLINE: no request.
# b. Offline, the local Hub cache answers (huggingface_hub's retries would only add ~25 s before the same failure).
# c. Every download reports its commit (a cache snapshot folder is named after it) so a run can store what it read;
#    a local folder has none.
# d. A failure says what to do: accept a gated licence and log in, fix the id or revision, or download elsewhere with
#    `hf download` (the CLI of huggingface-hub >= 0.34, the floor in requirements.txt).

HUB_PATTERNS = ("*.json", "*.safetensors", "*.jinja")  # the files load_model and Tokenizer read


class HubError(SystemExit):
    """A Hub request that failed, carrying the sentence that says what to do (no traceback when uncaught)."""


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")  # read now, not at import


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hub cannot be used now (a phrase), or None when it answers (choice a)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    flag = os.environ.get("HF_HUB_OFFLINE")  # as it is now; huggingface_hub read it once, at import
    if constants.HF_HUB_OFFLINE if flag is None else flag.strip().upper() in ("1", "ON", "YES", "TRUE"):
        return "HF_HUB_OFFLINE is set"
    url = hub_endpoint()
    try:
        status = get_session().head(url, timeout=timeout).status_code
    except Exception as e:  # requests, httpx or httpx2 errors, by huggingface_hub version: any means no answer
        return f"cannot reach the Hugging Face Hub at {url} ({type(e).__name__})"
    if status >= 500 or status == 407:  # a proxy that cannot reach the Hub, or wants credentials, answers for it
        return f"the Hugging Face Hub at {url} answered HTTP {status}"
    return None


def hub_reachable(timeout: float = 3.0) -> bool:
    return hub_unreachable(timeout) is None


def download_command(repo_id: str, filename: str | None = None, revision: str | None = None, repo_type="model") -> str:
    """The `hf download` line that fetches the same files on another machine, into DIR. One --exclude, not our three
    --include patterns: 0.x's CLI keeps the last of repeated --include, 1.x takes `--include a b` as a, file b."""
    cmd = ["hf download", repo_id] + ([filename] if filename else [])
    cmd += [f"--repo-type {repo_type}"] if repo_type != "model" else []
    cmd += [f"--revision {revision}"] if revision else []
    cmd += [] if filename else ['--exclude "original/*"']  # Llama's second copy of the weights (.pth), unread here
    return " ".join(cmd + ["--local-dir DIR"])


def hub_message(e: Exception, repo_id, filename=None, revision=None, repo_type="model", why=None, then="") -> str:
    """The sentence for a failed download (choice d): `why` is hub_unreachable()'s phrase, `then` how to use DIR."""
    from huggingface_hub import errors

    what = repr(repo_id + (f"/{filename}" if filename else "")) + (f" at revision {revision}" if revision else "")
    page = "https://huggingface.co/" + ("datasets/" if repo_type == "dataset" else "") + repo_id
    login = "log in here with `hf auth login` or set HF_TOKEN to a read token (https://huggingface.co/settings/tokens)"
    fetch = f"Download it on a machine with internet (`{download_command(repo_id, filename, revision, repo_type)}`), "
    fetch += f"copy DIR here and {then}."
    status = getattr(getattr(e, "response", None), "status_code", None)
    if why is not None or isinstance(e, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)):
        return f"could not download {what}: {why or 'offline'}, and it is not in the local Hub cache. {fetch}"
    if isinstance(e, errors.GatedRepoError):  # a subclass of RepositoryNotFoundError: test it first
        return f"{repo_id} is gated: accept its licence on {page} (signed in), then {login}."
    if isinstance(e, errors.RevisionNotFoundError):
        return f"{repo_id} has no revision {revision!r}: pass a branch, tag or commit listed on {page}/commits/main."
    if isinstance(e, errors.RepositoryNotFoundError):
        return f"no {repo_type} {repo_id!r} on the Hub: check the id (it should open at {page}); if private, {login}."
    if isinstance(e, errors.EntryNotFoundError):
        return f"{repo_id} has no file {filename!r}" + (f" at revision {revision}" if revision else "") + "."
    if status in (401, 403):
        return f"the Hub refused {repo_id} (HTTP {status}): if it is gated, accept its licence on {page}; then {login}."
    return f"could not download {what} from the Hugging Face Hub ({type(e).__name__}: {e}). {fetch}"


def snapshot_sha(path: str) -> str | None:
    """The commit a path inside the Hub cache belongs to (…/models--org--name/snapshots/<sha>/…), else None."""
    parts = os.path.abspath(path).split(os.sep)
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and parts[i - 1].startswith(("models--", "datasets--")):
            sha = parts[i + 1]
            return sha if len(sha) == 40 and all(c in "0123456789abcdef" for c in sha) else None
    return None


def hub_download(
    repo_id: str, revision: str | None = None, filename: str | None = None, repo_type="model", then="pass --model DIR"
) -> tuple[str, str]:
    """(local path, commit sha) of one file, or of the files load_model reads (a snapshot folder), of a Hub repo at
    `revision` (default: main): downloaded, or from the local Hub cache when offline. Failure: HubError."""
    import huggingface_hub

    why = hub_unreachable()
    kw = dict(repo_type=repo_type, revision=revision, endpoint=hub_endpoint(), local_files_only=why is not None)
    try:
        if filename:
            path = huggingface_hub.hf_hub_download(repo_id, filename, **kw)
        else:
            path = huggingface_hub.snapshot_download(repo_id, allow_patterns=list(HUB_PATTERNS), **kw)
    except Exception as e:
        raise HubError(hub_message(e, repo_id, filename, revision, repo_type, why, then)) from None
    sha = snapshot_sha(path)
    assert sha is not None, f"huggingface_hub returned {path}, not a path inside a cache snapshot"
    return path, sha


def is_hub_id(name: str) -> bool:
    return not name.startswith((".", "/", "~")) and name.count("/") == 1 and not os.path.exists(name)


def locate(name_or_path: str, revision: str | None = None) -> tuple[str, str | None]:
    """(local folder, commit sha): a local folder as is (sha None); a Hub id at `revision`, downloading only the
    files we read."""
    name_or_path = os.path.expanduser(name_or_path)
    if os.path.isdir(name_or_path):
        if revision:
            raise ValueError(f"revision {revision!r} applies to a Hub id, but {name_or_path!r} is a local folder")
        return name_or_path, None
    if not is_hub_id(name_or_path):
        raise ValueError(
            f"model {name_or_path!r} is neither a local folder nor a Hub id like 'Qwen/Qwen2.5-7B-Instruct'"
        )
    return hub_download(name_or_path, revision or None)


def resolve(name_or_path: str, revision: str | None = None) -> str:
    """The local folder of a local folder or a Hub id (at `revision`)."""
    return locate(name_or_path, revision)[0]


def source_record(name_or_path: str, revision: str | None = None, path: str | None = None) -> dict:
    """What a run stores to trace an input: {"id", "revision", "sha"}, sha the commit `path` (a cache snapshot folder
    or a file in one) came from, None outside the Hub cache."""
    return {"id": name_or_path, "revision": revision, "sha": snapshot_sha(path or name_or_path)}


def provenance(**sources: tuple) -> dict:
    """{"model": {"id", "revision", "sha"}, "data": {...}, ...} from name=(id or path, revision, local path), ready
    for args.json and adapter metadata."""
    return {k: source_record(*v) for k, v in sources.items()}


def read_hub_config(repo_id: str, revision: str | None = None) -> tuple:
    """(Config, commit sha) of a Hub id from its config.json alone, no weights (memory plans, parameter counts)."""
    from model import load_config

    path, sha = hub_download(repo_id, revision, filename="config.json")
    return load_config(os.path.dirname(path)), sha
