"""
The Hub boundary (hub.py, and data/load.py's hub_file) with no internet: a local HTTP server plays
the Hub (its routes, its X-Error-Code headers) or a proxy in front of it, and the real huggingface_hub talks to it.

    python -m pytest -q tests/test_hub.py
"""

import hashlib
import http.client
import http.server
import importlib.metadata
import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import hub as H
import model as M
import tokenizer as T
from data.load import DATASETS, hub_file

SHA_MAIN, SHA_V1 = "a" * 40, "0123456789abcdef" * 2 + "01234567"  # the commits "main" and "v1" point at
PROXY_VARS = tuple(v for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY") for v in (k, k.lower()))


def serve(handler) -> http.server.ThreadingHTTPServer:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


class FakeHub:
    """The Hub's routes for a few repos: repo info, file tree, file resolve (with X-Repo-Commit), and its errors."""

    def __init__(self):
        self.repos, self.log = {}, []  # ("models" | "datasets", id) -> dict(files, gated); requests seen
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def answer(self):
                hub.log.append(f"{self.command} {self.path}")
                status, headers, body = hub.route(self.path.split("?")[0])
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = answer

        self.server = serve(Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def add(self, kind: str, repo_id: str, files: dict, gated: bool = False):
        self.repos[kind, repo_id] = dict(files=files, gated=gated)

    def route(self, path: str):
        error = lambda status, code: (status, {"X-Error-Code": code, "X-Error-Message": code}, b"")  # noqa: E731
        parts = path.strip("/").split("/")
        api = parts[0] == "api"
        kind = parts[1] if api else ("datasets" if parts[0] == "datasets" else "models")
        parts = parts[2:] if api else (parts[1:] if kind == "datasets" else parts)
        if len(parts) < 4 or (api and parts[2] not in ("revision", "tree")) or (not api and parts[2] != "resolve"):
            return 200, {}, b""  # the endpoint's root (reachability) and anything else huggingface_hub asks
        repo = self.repos.get((kind, "/".join(parts[:2])))
        rev, name = parts[3], "/".join(parts[4:])
        sha = {"main": SHA_MAIN, "v1": SHA_V1, SHA_MAIN: SHA_MAIN, SHA_V1: SHA_V1}.get(rev)
        if repo is None:
            return error(404, "RepoNotFound")
        if sha is None:
            return error(404, "RevisionNotFound")
        files = repo["files"]
        if api and parts[2] == "revision":
            info = {"id": "/".join(parts[:2]), "sha": sha, "siblings": [{"rfilename": f} for f in files]}
            return 200, {"Content-Type": "application/json"}, json.dumps(info).encode()
        if api:  # the file tree
            tree = [{"type": "file", "path": f, "size": len(b), "oid": "0" * 40} for f, b in files.items()]
            return 200, {"Content-Type": "application/json"}, json.dumps(tree).encode()
        if repo["gated"]:  # a gated repo's files need an accepted licence
            return error(403, "GatedRepo")
        if name not in files:
            return error(404, "EntryNotFound")
        return 200, {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha1(files[name]).hexdigest()}"'}, files[name]


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No proxy, token or offline flag from the caller's environment; a fresh cache; a fresh HTTP session."""
    import huggingface_hub.utils as hfu
    from huggingface_hub import constants

    for k in PROXY_VARS + ("HF_TOKEN", "HF_ENDPOINT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    reset = getattr(hfu, "close_session", None) or hfu.reset_sessions  # >= 1.0 / 0.x
    reset()  # the session reads proxy variables when it is made
    yield
    reset()


@pytest.fixture
def hub(monkeypatch, make_checkpoint):
    h = FakeHub()
    folder = make_checkpoint("qwen2")
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    h.add("models", "org/tiny", files | {"original/consolidated.00.pth": b"not read", "README.md": b"# tiny"})
    h.add("models", "meta-llama/Meta-Llama-3-8B-Instruct", files, gated=True)
    h.add("datasets", DATASETS["gsm8k"].repo, {DATASETS["gsm8k"].files["test"]: b"PAR1 rows"})
    h.folder = folder
    monkeypatch.setenv("HF_ENDPOINT", h.url)
    yield h
    h.server.shutdown()


# -----------------------------------------------------------------------------
# online or not


class Proxy(http.server.BaseHTTPRequestHandler):
    """A forward proxy: HTTP requests are relayed to `target` (host:port), CONNECT tunnels answered `connect`."""

    target, connect, seen = None, 403, []

    def log_message(self, *a):
        pass

    def do_CONNECT(self):
        type(self).seen.append(f"CONNECT {self.path}")
        self.send_response(self.connect)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def relay(self):
        type(self).seen.append(f"{self.command} {self.path}")
        conn = http.client.HTTPConnection(*self.target.split(":"), timeout=10)
        path = "/" + self.path.split("/", 3)[3] if self.path.count("/") >= 3 else "/"  # http://host/x -> /x
        conn.request(self.command, path, headers={k: v for k, v in self.headers.items() if k.lower() != "host"})
        r = conn.getresponse()
        body = r.read()
        self.send_response(r.status)
        for k, v in r.getheaders():  # a HEAD answer keeps the Content-Length of the body it did not send
            if k.lower() not in ("transfer-encoding", "connection") and (k.lower() != "content-length" or not body):
                self.send_header(k, v)
        if body:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = relay


@pytest.fixture
def only_loopback(monkeypatch):
    """Direct TCP to anything but this machine fails, as on a cluster whose only way out is its proxy."""
    real, blocked = socket.create_connection, []

    def create_connection(address, *a, **kw):
        if address[0] not in ("127.0.0.1", "localhost"):
            blocked.append(address)
            raise OSError(f"direct connection to {address} blocked")
        return real(address, *a, **kw)

    monkeypatch.setattr(socket, "create_connection", create_connection)
    return blocked


def test_https_proxy_is_asked_when_direct_tcp_is_blocked(monkeypatch, only_loopback):
    Proxy.seen, Proxy.connect = [], 403
    proxy = serve(Proxy)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.invalid")
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.server_port}")
    why = H.hub_unreachable()
    proxy.shutdown()
    assert Proxy.seen == ["CONNECT hub.example.invalid:443"]  # the question went to the proxy, not to a raw socket
    assert only_loopback == []
    assert why.startswith("cannot reach the Hugging Face Hub at https://hub.example.invalid")  # the proxy said no


def test_download_through_a_proxy_when_direct_tcp_is_blocked(monkeypatch, hub, only_loopback):
    """The whole path, reachability and download, through HTTP_PROXY to a Hub only the proxy can reach."""
    Proxy.seen, Proxy.target = [], f"127.0.0.1:{hub.server.server_port}"
    proxy = serve(Proxy)
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.example.invalid")  # resolvable by the proxy alone
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.server_port}")
    assert H.hub_reachable()
    path, sha = H.locate("org/tiny")
    proxy.shutdown()
    assert sha == SHA_MAIN and Path(path, "config.json").read_bytes() == (hub.folder / "config.json").read_bytes()
    assert Proxy.seen[0].startswith("HEAD http://hub.example.invalid")  # the reachability question
    assert any("/api/models/org/tiny/revision/main" in s for s in Proxy.seen)
    direct = [a for a in only_loopback if a[0] == "hub.example.invalid"]  # (huggingface_hub 2 makes calls of its own)
    assert direct == []


@pytest.mark.parametrize("flag", ["1", "true", "YES"])
def test_offline_flag_decides_without_a_request(monkeypatch, flag):
    import huggingface_hub.utils as hfu

    def no_session():
        raise AssertionError("HF_HUB_OFFLINE is set: no request may be made")

    monkeypatch.setattr(hfu, "get_session", no_session)
    monkeypatch.setenv("HF_HUB_OFFLINE", flag)
    assert H.hub_unreachable() == "HF_HUB_OFFLINE is set" and not H.hub_reachable()
    with pytest.raises(SystemExit) as e:
        H.resolve("someorg/somemodel")
    msg = str(e.value)
    assert "could not download 'someorg/somemodel': HF_HUB_OFFLINE is set" in msg and "local Hub cache" in msg
    assert "`hf download someorg/somemodel --exclude" in msg and "--local-dir DIR" in msg and "--model DIR" in msg


def test_unanswered_hub_fails_fast(monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    t = time.perf_counter()
    with pytest.raises(H.HubError, match=f"cannot reach the Hugging Face Hub at http://127.0.0.1:{port}"):
        hub_file("gsm8k", "test")
    assert time.perf_counter() - t < 10


def test_a_proxy_that_cannot_reach_the_hub_counts_as_offline(monkeypatch, hub):
    """A 502 from a proxy means no Hub: the local cache answers, here with the copy downloaded while online."""
    path, sha = H.locate("org/tiny", "v1")
    n = len(hub.log)

    class Bad(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_HEAD(self):
            self.send_response(502)
            self.send_header("Content-Length", "0")
            self.end_headers()

    bad = serve(Bad)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{bad.server_port}")
    assert H.hub_unreachable() == f"the Hugging Face Hub at http://127.0.0.1:{bad.server_port} answered HTTP 502"
    assert H.locate("org/tiny", "v1") == (path, sha)
    bad.shutdown()
    assert len(hub.log) == n


# -----------------------------------------------------------------------------
# revisions and the commits they resolve to


def test_revision_is_passed_and_its_commit_recorded(monkeypatch, hub):
    path, sha = H.locate("org/tiny", "v1")
    assert sha == SHA_V1 and Path(path).name == SHA_V1 and "GET /api/models/org/tiny/revision/v1" in hub.log
    assert H.locate("org/tiny")[1] == SHA_MAIN  # no revision: main, another commit here
    got = {p.name for p in Path(path).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= got and not {"original", "README.md"} & got

    net = M.load_model("org/tiny", device="cpu", revision="v1")
    assert net.source == {"id": "org/tiny", "revision": "v1", "sha": SHA_V1}
    ref = M.load_model(str(hub.folder), device="cpu")
    assert ref.source == {"id": str(hub.folder), "revision": None, "sha": None}  # a local folder has no commit
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), ref.state_dict().values()))
    assert T.Tokenizer("org/tiny", revision="v1").encode("12 plus 30") == T.Tokenizer(str(hub.folder)).encode(
        "12 plus 30"
    )
    cfg, cfg_sha = H.read_hub_config("org/tiny", "v1")
    assert cfg == M.load_config(str(hub.folder)) and cfg_sha == SHA_V1

    # offline, the pinned revision still resolves to the same commit, from the cache alone
    n = len(hub.log)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert H.locate("org/tiny", "v1") == (path, SHA_V1) and H.locate("org/tiny", SHA_V1) == (path, SHA_V1)
    assert len(hub.log) == n
    with pytest.raises(SystemExit, match="download 'org/tiny' at revision v2: HF_HUB_OFFLINE is set.*--revision v2"):
        H.locate("org/tiny", "v2")


def test_dataset_file_revision_and_provenance(hub, tmp_path):
    src = DATASETS["gsm8k"]
    path = hub_file("gsm8k", "test", revision="v1")
    assert Path(path).read_bytes() == b"PAR1 rows" and H.snapshot_sha(path) == SHA_V1
    assert f"HEAD /datasets/{src.repo}/resolve/v1/{src.files['test']}" in hub.log
    model_path, _ = H.locate("org/tiny")
    local = tmp_path / "train.jsonl"
    local.write_text("{}\n")
    got = H.provenance(
        model=("org/tiny", None, model_path), data=(src.repo, "v1", path), eval_data=(str(local), None, str(local))
    )
    assert got == {
        "model": {"id": "org/tiny", "revision": None, "sha": SHA_MAIN},
        "data": {"id": src.repo, "revision": "v1", "sha": SHA_V1},
        "eval_data": {"id": str(local), "revision": None, "sha": None},
    }
    json.dumps(got)  # ready for args.json


def test_snapshot_sha_reads_only_cache_paths(tmp_path):
    snap = tmp_path / "models--org--x" / "snapshots" / SHA_V1
    assert H.snapshot_sha(str(snap)) == SHA_V1 and H.snapshot_sha(str(snap / "sub" / "f.json")) == SHA_V1
    assert H.snapshot_sha(str(tmp_path / "snapshots" / SHA_V1)) is None  # not inside a repo folder of the cache
    assert H.snapshot_sha(str(tmp_path / "models--org--x" / "snapshots" / "main")) is None
    assert H.snapshot_sha("Qwen/Qwen2.5-7B-Instruct") is None


def test_revision_on_a_local_folder_is_an_error(hub):
    with pytest.raises(ValueError, match="applies to a Hub id"):
        H.locate(str(hub.folder), "v1")


# -----------------------------------------------------------------------------
# failures that say what to do


def test_gated_model_names_the_licence_page_and_login(hub):
    with pytest.raises(SystemExit) as e:
        H.resolve("meta-llama/Meta-Llama-3-8B-Instruct")
    msg = str(e.value)
    assert "meta-llama/Meta-Llama-3-8B-Instruct is gated" in msg
    assert "accept its licence on https://huggingface.co/meta-llama/Meta-Llama-3-8B-Instruct" in msg
    assert "`hf auth login`" in msg and "HF_TOKEN" in msg


def test_wrong_id_revision_or_file_says_so(hub):
    with pytest.raises(SystemExit, match="no model 'org/nope' on the Hub: check the id"):
        H.resolve("org/nope")
    with pytest.raises(SystemExit, match="org/tiny has no revision 'v9': pass a branch, tag or commit"):
        H.resolve("org/tiny", "v9")
    with pytest.raises(SystemExit, match="org/tiny has no file 'nope.json'"):
        H.hub_download("org/tiny", filename="nope.json")
    with pytest.raises(SystemExit, match="no dataset 'org/nope'.*https://huggingface.co/datasets/org/nope"):
        H.hub_download("org/nope", filename="x.parquet", repo_type="dataset")


def test_refused_token_says_log_in(monkeypatch, hub):
    refused = (401, {"X-Error-Message": "Invalid credentials in Authorization header"}, b"")  # a revoked token
    monkeypatch.setattr(hub, "route", lambda path: refused)
    with pytest.raises(SystemExit, match=r"the Hub refused org/tiny \(HTTP 401\).*hf auth login"):
        H.resolve("org/tiny")


def hf_cli(*args, **kw) -> subprocess.CompletedProcess:
    """The installed `hf` console script, run through its entry point (no reliance on PATH)."""
    ep = next(e for e in importlib.metadata.distribution("huggingface_hub").entry_points if e.name == "hf")
    mod, fn = ep.value.split(":")
    code = f"import sys; from {mod} import {fn}; sys.argv[0] = 'hf'; sys.exit({fn}())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120, **kw)


def test_the_named_cli_exists_and_its_command_works(hub, tmp_path):
    """The `hf download` line of the offline message, run as printed against the (fake) Hub, gives a loadable folder."""
    scripts = {e.name for e in importlib.metadata.distribution("huggingface_hub").entry_points}
    assert "hf" in scripts
    assert hf_cli("auth", "login", "--help").returncode == 0
    helptext = hf_cli("download", "--help").stdout
    assert all(flag in helptext for flag in ("--repo-type", "--revision", "--exclude", "--local-dir"))

    cmd = H.download_command("org/tiny", revision="v1").replace("DIR", str(tmp_path / "dl"))
    assert cmd.startswith("hf download org/tiny")
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS} | {"HF_ENDPOINT": hub.url}
    r = hf_cli(*shlex.split(cmd)[1:], env=env)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "dl" / "original").exists()
    net = M.load_model(str(tmp_path / "dl"), device="cpu")
    ref = M.load_model(str(hub.folder), device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), ref.state_dict().values()))

    cmd = H.download_command(DATASETS["gsm8k"].repo, DATASETS["gsm8k"].files["test"], repo_type="dataset")
    r = hf_cli(*shlex.split(cmd.replace("DIR", str(tmp_path / "ds")))[1:], env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "ds" / DATASETS["gsm8k"].files["test"]).read_bytes() == b"PAR1 rows"
