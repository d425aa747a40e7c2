"""A small Hugging Face Hub-compatible HTTP server for tests, standard library only.

It speaks just enough of the Hub's HTTP API for the real ``huggingface_hub`` client (2.x) to create repos,
commit small files, create branches and tags, read repo info / trees / refs / commits and download files
with ``hf_hub_download``. Storage is a temporary folder with real commit semantics: every commit has a
40-hex sha and a parent, branches and tags point at commits, and any read can name a branch, a tag or a
full commit sha.

What the client needs, read from its source (huggingface_hub 2.4):

- ``create_repo``: ``POST /api/repos/create``; 409 means "exists" (``exist_ok=True`` swallows it).
- ``create_commit`` / ``upload_file`` / ``upload_folder``: ``POST /api/{type}s/{id}/preupload/{rev}`` decides
  "regular" or "lfs" per file, then ``POST /api/{type}s/{id}/commit/{rev}`` (NDJSON, regular files inline as
  base64). We always answer "regular", so no LFS batch or Xet upload is ever attempted, whatever the file
  extension (the real Hub would route ``*.safetensors`` to LFS through ``.gitattributes``). The preupload
  answer carries each file's current git blob oid: the client compares it with its own and drops unchanged
  files; when nothing is left it asks ``repo_info(revision)`` for the head sha instead of committing.
- ``create_branch``: ``POST /api/{type}s/{id}/branch/{name}`` with an optional ``startingPoint``.
- ``create_tag``: ``POST /api/{type}s/{id}/tag/{rev}`` with ``{"tag": ..., "message": ...}``.
- ``repo_info`` / ``model_info``: ``GET /api/{type}s/{id}`` and ``.../revision/{rev}``.
- ``list_repo_files`` / ``list_repo_tree``: ``GET /api/{type}s/{id}/tree/{rev}[/{path}]``.
- ``list_repo_refs`` / ``list_repo_commits``: ``GET .../refs`` and ``.../commits/{rev}``.
- ``hf_hub_download``: ``HEAD`` then ``GET`` on ``/{prefix}{id}/resolve/{rev}/{path}``. HEAD needs
  ``X-Repo-Commit`` and ``ETag`` (else ``FileMetadataError``) and ``Content-Length`` (the expected size);
  errors are told apart only by the ``X-Error-Code`` header (``RepoNotFound``, ``RevisionNotFound``,
  ``EntryNotFound``), and an ``EntryNotFound`` that carries ``X-Repo-Commit`` is cached as ``.no_exist``.
- With telemetry on, the first request of a process also fetches ``/api/agent-harnesses`` (answered with
  an empty registry); a commit touching ``README.md`` first calls ``POST /api/validate-yaml``.

Server-side failures are answered with 400, not 500: the client retries 5xx with exponential backoff
(about 23 s), which would turn a server bug into a slow, confusing test. They are also kept in
``HubServer.errors`` so a test can assert there were none.
"""
from __future__ import annotations

import atexit
import base64
import hashlib
import itertools
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

DEFAULT_USER = "test-user"
# Looks like a real token so client-side validation never objects; it is only ever sent to 127.0.0.1.
DUMMY_TOKEN = "hf_hfpatchTestHubServerDummyToken0000"
DEFAULT_BRANCH = "main"

_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_API_ACTIONS = {"revision", "preupload", "commit", "branch", "tag", "tree", "refs", "commits"}
_GITATTRIBUTES = b"*.bin filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_oid(data: bytes) -> str:
    """The oid git (and the Hub) gives a regular file; the client computes the same to skip unchanged files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _is_commit_sha(rev: str) -> bool:
    return len(rev) == 40 and all(c in "0123456789abcdef" for c in rev)


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class HubError(Exception):
    """An error the Hub would answer with; ``code`` goes to ``X-Error-Code`` where the client needs it."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = headers or {}


@dataclass
class LoggedRequest:
    method: str
    path: str  # as sent (still URL-encoded), without the query string
    query: dict
    route: str  # e.g. "create_repo", "preupload", "commit", "resolve", "model_info", "tree", "unknown"
    status: int
    repo_id: str | None = None
    revision: str | None = None
    authorized: bool = False


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    branches: dict = field(default_factory=dict)  # name -> commit sha
    tags: dict = field(default_factory=dict)  # name -> {"commit": sha, "message": str | None}
    commits: dict = field(default_factory=dict)  # sha -> {"parents", "tree": {path: [oid, size]}, ...}

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in ("repo_type", "repo_id", "private", "created_at", "branches", "tags", "commits")}


class _Store:
    """Repos on disk: one JSON document per repo (refs + commits) and content-addressed blobs.

    Everything is also held in memory; the files make the state inspectable and keep blobs out of RAM.
    One lock serialises all mutations so concurrent commits from the client's threads stay linear.
    """

    def __init__(self, root: str):
        self.root = root
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], _Repo] = {}
        self._counter = itertools.count()
        os.makedirs(os.path.join(root, "blobs"), exist_ok=True)
        os.makedirs(os.path.join(root, "repos"), exist_ok=True)

    # blobs
    def put_blob(self, data: bytes) -> str:
        oid = git_blob_oid(data)
        path = os.path.join(self.root, "blobs", oid)
        if not os.path.exists(path):
            tmp = f"{path}.{threading.get_ident()}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        return oid

    def blob_path(self, oid: str) -> str:
        return os.path.join(self.root, "blobs", oid)

    def read_blob(self, oid: str) -> bytes:
        with open(self.blob_path(oid), "rb") as f:
            return f.read()

    # repos
    def _save(self, repo: _Repo) -> None:
        path = os.path.join(self.root, "repos", repo.repo_type + "s", *repo.repo_id.split("/")) + ".json"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(repo.to_json(), f, indent=1)
        os.replace(tmp, path)

    def create_repo(self, repo_type: str, repo_id: str, private: bool, author: str) -> _Repo:
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                raise HubError(409, f"You already created this {repo_type} repo: {repo_id}")
            repo = _Repo(repo_type, repo_id, private, _now_iso())
            self.repos[(repo_type, repo_id)] = repo
            # Like the Hub: a new repo already has one commit on main holding .gitattributes.
            self.commit(repo, DEFAULT_BRANCH, [("file", ".gitattributes", _GITATTRIBUTES)], "initial commit", "", author)
            return repo

    def delete_repo(self, repo_type: str, repo_id: str) -> None:
        with self.lock:
            if self.repos.pop((repo_type, repo_id), None) is None:
                raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
            path = os.path.join(self.root, "repos", repo_type + "s", *repo_id.split("/")) + ".json"
            if os.path.exists(path):
                os.remove(path)

    def resolve(self, repo: _Repo, revision: str) -> str:
        """branch, then tag, then full commit sha (the Hub's order); raises RevisionNotFound."""
        with self.lock:
            if revision in repo.branches:
                return repo.branches[revision]
            if revision in repo.tags:
                return repo.tags[revision]["commit"]
            if _is_commit_sha(revision) and revision in repo.commits:
                return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def commit(self, repo: _Repo, branch: str, ops: list, summary: str, description: str, author: str,
               parent_commit: str | None = None) -> str:
        with self.lock:
            if branch not in repo.branches:
                if branch in repo.tags or _is_commit_sha(branch):
                    raise HubError(400, f"Invalid rev id: {branch} is not a branch; commits go to branches only")
                if repo.branches:  # the Hub never creates a branch on commit: create_branch comes first
                    raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            head = repo.branches.get(branch)
            if parent_commit is not None and parent_commit != head:
                raise HubError(412, f"A commit has happened since. Please refresh and try again. "
                                    f"(parentCommit {parent_commit} is not the head {head} of {branch})")
            tree = dict(repo.commits[head]["tree"]) if head else {}
            for kind, path, payload in ops:
                if kind == "file":
                    tree[path] = [self.put_blob(payload), len(payload)]
                elif kind == "deletedFile":
                    if path not in tree:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del tree[path]
                elif kind == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    doomed = [p for p in tree if p.startswith(prefix)]
                    if not doomed:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in doomed:
                        del tree[p]
            date = _now_iso()
            # The counter keeps two identical commits in the same millisecond distinct, as git's timestamps mostly do.
            material = json.dumps([head, sorted(tree.items()), summary, description, author, date, next(self._counter)])
            sha = hashlib.sha1(material.encode()).hexdigest()
            repo.commits[sha] = {"parents": [head] if head else [], "tree": tree, "title": summary,
                                 "message": description, "author": author, "date": date}
            repo.branches[branch] = sha
            self._save(repo)
            return sha

    def create_branch(self, repo: _Repo, name: str, starting_point: str | None) -> None:
        with self.lock:
            if name in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{name}")
            sha = self.resolve(repo, starting_point or DEFAULT_BRANCH)
            repo.branches[name] = sha
            self._save(repo)

    def delete_branch(self, repo: _Repo, name: str) -> None:
        with self.lock:
            if name not in repo.branches:
                raise HubError(404, f"Invalid rev id: {name}", "RevisionNotFound")
            if name == DEFAULT_BRANCH:
                raise HubError(403, "Cannot delete the default branch")
            del repo.branches[name]
            self._save(repo)

    def create_tag(self, repo: _Repo, tag: str, revision: str, message: str | None) -> None:
        with self.lock:
            if tag in repo.tags:
                raise HubError(409, f"Reference already exists: refs/tags/{tag}")
            repo.tags[tag] = {"commit": self.resolve(repo, revision), "message": message}
            self._save(repo)

    def delete_tag(self, repo: _Repo, tag: str) -> None:
        with self.lock:
            if repo.tags.pop(tag, None) is None:
                raise HubError(404, f"Invalid rev id: {tag}", "RevisionNotFound")
            self._save(repo)


class HubServer:
    """The test Hub. ``start()`` serves on 127.0.0.1 from a daemon thread; ``stop()`` is bounded and idempotent.

    ``port=0`` picks a free port. The socket is bound in ``__init__`` (so the port is reserved from then on, with no
    race against other processes) but only listens after ``start()``; until then connections are refused, which
    makes a test that forgot the fixture fail fast instead of hanging.
    """

    def __init__(self, port: int = 0, *, root: str | None = None, tokens: dict[str, str] | None = None,
                 max_lifetime_s: float | None = 4 * 3600):
        self._own_root = root is None
        self.root = root or tempfile.mkdtemp(prefix="hfpatch-test-hub-")
        self.store = _Store(os.path.join(self.root, "storage"))
        # token -> user name. A request with an unknown token is refused (401), like the real Hub.
        self.tokens = dict(tokens) if tokens is not None else {DUMMY_TOKEN: DEFAULT_USER}
        self.requests: list[LoggedRequest] = []
        self.errors: list[str] = []  # tracebacks of server-side bugs
        self.max_lifetime_s = max_lifetime_s
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._httpd = _HTTPServer(("127.0.0.1", port), _Handler, bind_and_activate=False)
        self._httpd.hub = self
        try:
            self._httpd.server_bind()
        except BaseException:
            self._httpd.server_close()
            raise
        self.port = self._httpd.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"

    # lifecycle
    def start(self) -> "HubServer":
        if self._stopped:
            raise RuntimeError("this HubServer was stopped; make a new one")
        if self._thread is None:
            self._httpd.server_activate()
            self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                            name=f"hub-server-{self.port}", daemon=True)
            self._thread.start()
            if self.max_lifetime_s:
                # A safety net for a server that outlives its session (e.g. used outside pytest and never stopped).
                timer = threading.Timer(self.max_lifetime_s, self.stop)
                timer.daemon = True
                timer.start()
            atexit.register(self.stop)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._thread is not None:
            # shutdown() waits for serve_forever to notice, which is bounded by poll_interval, but run it on a side
            # thread anyway so that a wedged server can never hang the end of the test session.
            t = threading.Thread(target=self._httpd.shutdown, daemon=True)
            t.start()
            t.join(timeout)
            self._thread.join(timeout)
        self._httpd.server_close()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # helpers for tests
    def new_repo_id(self, prefix: str = "repo", namespace: str = DEFAULT_USER) -> str:
        """A repo id no other test of this session uses (the server and the HF cache are session-wide)."""
        return f"{namespace}/{prefix}-{os.getpid()}-{next(self._ids)}"

    def mark(self) -> int:
        """Position in the request log; pass it to ``since()`` to see only what a step called."""
        return len(self.requests)

    def since(self, mark: int) -> list[LoggedRequest]:
        return self.requests[mark:]

    def routes_since(self, mark: int) -> list[str]:
        # /api/agent-harnesses is client telemetry, not something the code under test asked for.
        return [r.route for r in self.requests[mark:] if r.route != "agent_harnesses"]

    def _repo(self, repo_id: str, repo_type: str = "model") -> _Repo:
        repo = self.store.repos.get((repo_type, repo_id))
        if repo is None:
            raise KeyError(f"no {repo_type} repo {repo_id!r} on the test hub")
        return repo

    def resolve(self, repo_id: str, revision: str = DEFAULT_BRANCH, repo_type: str = "model") -> str:
        """Commit sha that ``revision`` (branch, tag or sha) points at."""
        return self.store.resolve(self._repo(repo_id, repo_type), revision)

    def read_file(self, repo_id: str, path: str, revision: str = DEFAULT_BRANCH, repo_type: str = "model") -> bytes:
        repo = self._repo(repo_id, repo_type)
        oid, _ = repo.commits[self.store.resolve(repo, revision)]["tree"][path]
        return self.store.read_blob(oid)

    def commit_parents(self, repo_id: str, sha: str, repo_type: str = "model") -> list[str]:
        return list(self._repo(repo_id, repo_type).commits[sha]["parents"])


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # idle keep-alive connections must never keep the process alive
    allow_reuse_address = False  # the port we hand out must really be ours
    hub: HubServer

    def server_bind(self):
        # HTTPServer.server_bind calls getfqdn(), a reverse DNS lookup that can stall without network.
        import socketserver

        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


def _chunked_body(rfile) -> bytes:
    out = bytearray()
    while True:
        size = int(rfile.readline().split(b";")[0].strip() or b"0", 16)
        if size == 0:
            while rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return bytes(out)
        out += rfile.read(size)
        rfile.readline()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the client pools connections
    timeout = 30  # drop idle keep-alive connections
    # Headers and body go out in two writes; with Nagle on, delayed ACKs add ~40 ms to every request.
    disable_nagle_algorithm = True
    server: _HTTPServer

    def log_message(self, format, *args):  # noqa: A002 - stdlib signature
        pass  # the request log below is the record; stderr noise would only clutter pytest output

    def do_GET(self):
        self._dispatch()

    def do_HEAD(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_PUT(self):
        self._dispatch()

    def do_DELETE(self):
        self._dispatch()

    # plumbing
    def _dispatch(self) -> None:
        hub = self.server.hub
        split = urlsplit(self.path)
        self._log = LoggedRequest(self.command, split.path, {k: v[-1] for k, v in parse_qs(split.query).items()},
                                  "unknown", 0)
        self._body_cache: bytes | None = None
        self._bad_token: HubError | None = None  # one handler serves many requests on a keep-alive connection
        self._user = self._authenticate()
        self._log.authorized = self._user is not None
        try:
            self._body()  # always drain the request body so keep-alive stays in sync
            self._route(split.path)
        except HubError as e:
            self._error(e)
        except Exception:  # a bug in this server: report it fast (see module docstring) and keep it for the test
            tb = traceback.format_exc()
            hub.errors.append(tb)
            print(f"hub_server: internal error on {self.command} {self.path}\n{tb}", file=sys.stderr)
            self._error(HubError(400, f"test hub server bug: {tb.strip().splitlines()[-1]}"))

    def _authenticate(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        if not auth.lower().startswith("bearer "):
            return None
        token = auth[7:].strip()
        user = self.server.hub.tokens.get(token)
        if user is None:  # refused when the request touches anything, not here: the body must be drained first
            self._bad_token = HubError(401, "Invalid credentials in Authorization header")
        return user

    def _require_user(self) -> str:
        if self._bad_token is not None:
            raise self._bad_token
        if self._user is None:
            raise HubError(401, "Invalid username or password.")
        return self._user

    def _body(self) -> bytes:
        if self._body_cache is None:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                self._body_cache = _chunked_body(self.rfile)
            else:
                n = int(self.headers.get("Content-Length") or 0)
                self._body_cache = self.rfile.read(n) if n else b""
        return self._body_cache

    def _json_body(self) -> dict:
        body = self._body()
        try:
            return json.loads(body) if body else {}
        except ValueError:
            raise HubError(400, "request body is not valid JSON")

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
              content_type: str = "application/json") -> None:
        # Logged before the reply goes out: once the client has its answer, the test may read the log at once.
        self._log.status = status
        self.server.hub.requests.append(self._log)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, obj, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _error(self, e: HubError) -> None:
        headers = dict(e.headers)
        if e.code:
            headers["X-Error-Code"] = e.code
        # Header values must be latin-1 and single-line.
        headers["X-Error-Message"] = e.message.encode("ascii", "replace").decode().replace("\n", " ")
        self._json({"error": e.message}, e.status, headers)

    # routing
    def _route(self, path: str) -> None:
        parts = path.strip("/").split("/")
        m = self.command
        if parts[0] == "api":
            rest = parts[1:]
            if rest == ["whoami-v2"] and m == "GET":
                return self._whoami()
            if rest == ["agent-harnesses"] and m == "GET":
                self._log.route = "agent_harnesses"
                return self._json({"standardEnvVars": [], "harnesses": {}})
            if rest == ["validate-yaml"] and m == "POST":
                self._log.route = "validate_yaml"
                return self._json({"errors": [], "warnings": []})
            if rest == ["repos", "create"] and m == "POST":
                return self._create_repo()
            if rest == ["repos", "delete"] and m == "DELETE":
                return self._delete_repo()
            if rest and rest[0] in _REPO_TYPES:
                return self._repo_api(_REPO_TYPES[rest[0]], [unquote(p) for p in rest[1:]])
            raise HubError(404, f"Not found: {path} (not implemented by the test hub)")
        if m in ("GET", "HEAD"):
            repo_type = "model"
            if parts[0] in ("datasets", "spaces"):
                repo_type, parts = _REPO_TYPES[parts[0]], parts[1:]
            for n in (2, 1):  # "ns/name/resolve/..." first; "name/resolve/..." for canonical ids
                if len(parts) > n + 1 and parts[n] == "resolve":
                    return self._resolve(repo_type, "/".join(parts[:n]), unquote(parts[n + 1]),
                                         unquote("/".join(parts[n + 2:])))
        raise HubError(404, f"Not found: {path} (not implemented by the test hub)")

    def _lookup(self, repo_type: str, repo_id: str) -> _Repo:
        """The repo, or the Hub's answer for a missing / private one (never leak which of the two it is)."""
        self._log.repo_id = repo_id
        if self._bad_token is not None:
            raise self._bad_token
        repo = self.server.hub.store.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and self._user is None):
            status = 404 if self._user is not None else 401
            raise HubError(status, "Repository not found", "RepoNotFound")
        return repo

    def _repo_api(self, repo_type: str, rest: list[str]) -> None:
        # /api/{type}s/{ns}/{name}/{action}/... ; a one-part id when the second part is an action name
        n = 2 if len(rest) >= 2 and rest[1] not in _API_ACTIONS else 1
        if not rest or not rest[0]:
            raise HubError(404, "Not found")
        repo_id, action, args = "/".join(rest[:n]), (rest[n] if len(rest) > n else None), rest[n + 1:]
        m = self.command
        store = self.server.hub.store
        if action is None and m == "GET":
            self._log.route = f"{repo_type}_info"
            return self._info(self._lookup(repo_type, repo_id), DEFAULT_BRANCH)
        if action == "revision" and m == "GET" and args:
            self._log.route = f"{repo_type}_info"
            return self._info(self._lookup(repo_type, repo_id), "/".join(args))
        if action == "preupload" and m == "POST" and args:
            self._log.route = "preupload"
            return self._preupload(repo_type, repo_id, "/".join(args))
        if action == "commit" and m == "POST" and args:
            self._log.route = "commit"
            return self._commit(repo_type, repo_id, "/".join(args))
        if action == "branch" and args and m in ("POST", "DELETE"):
            self._log.route = "create_branch" if m == "POST" else "delete_branch"
            self._require_user()
            repo, name = self._lookup(repo_type, repo_id), "/".join(args)
            self._log.revision = name
            if m == "POST":
                store.create_branch(repo, name, self._json_body().get("startingPoint"))
            else:
                store.delete_branch(repo, name)
            return self._json({})
        if action == "tag" and args and m in ("POST", "DELETE"):
            self._log.route = "create_tag" if m == "POST" else "delete_tag"
            self._require_user()
            repo, rev = self._lookup(repo_type, repo_id), "/".join(args)
            if m == "POST":
                body = self._json_body()
                if not body.get("tag"):
                    raise HubError(400, "missing 'tag' in request body")
                self._log.revision = rev
                store.create_tag(repo, body["tag"], rev, body.get("message"))
            else:
                store.delete_tag(repo, rev)
            return self._json({})
        if action == "refs" and m == "GET":
            self._log.route = "refs"
            return self._refs(self._lookup(repo_type, repo_id))
        if action == "tree" and m == "GET" and args:
            self._log.route = "tree"
            return self._tree(self._lookup(repo_type, repo_id), args[0], "/".join(args[1:]))
        if action == "commits" and m == "GET" and args:
            self._log.route = "commits"
            return self._commits(self._lookup(repo_type, repo_id), "/".join(args))
        raise HubError(404, f"Not found: {self.path} (not implemented by the test hub)")

    # endpoints
    def _whoami(self) -> None:
        self._log.route = "whoami"
        user = self._require_user()
        self._json({"type": "user", "id": user, "name": user, "fullname": user, "orgs": [],
                    "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}})

    def _create_repo(self) -> None:
        self._log.route = "create_repo"
        user = self._require_user()
        body = self._json_body()
        repo_type = body.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise HubError(400, f"repo type {repo_type!r} is not supported by the test hub")
        name = body.get("name")
        if not name:
            raise HubError(400, "missing repo name")
        repo_id = f"{body.get('organization') or user}/{name}"
        self._log.repo_id = repo_id
        private = body.get("visibility") == "private" or bool(body.get("private"))
        url = f"{self.server.hub.endpoint}/{_URL_PREFIX[repo_type]}{repo_id}"
        try:
            self.server.hub.store.create_repo(repo_type, repo_id, private, user)
        except HubError as e:
            e.headers = {}
            self._json({"error": e.message, "url": url}, e.status, {"X-Error-Message": e.message})
            return
        self._json({"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self) -> None:
        self._log.route = "delete_repo"
        self._require_user()
        body = self._json_body()
        repo_id = f"{body.get('organization') or self._user}/{body.get('name')}"
        self._log.repo_id = repo_id
        self.server.hub.store.delete_repo(body.get("type") or "model", repo_id)
        self._json({})

    def _info(self, repo: _Repo, revision: str) -> None:
        self._log.revision = revision
        store = self.server.hub.store
        with store.lock:
            sha = store.resolve(repo, revision)
            commit = repo.commits[sha]
            siblings = [{"rfilename": p} for p in sorted(commit["tree"])]
        self._json({"id": repo.repo_id, "modelId": repo.repo_id, "author": repo.repo_id.split("/")[0],
                    "sha": sha, "private": repo.private, "gated": False, "disabled": False,
                    "lastModified": commit["date"], "createdAt": repo.created_at, "tags": [],
                    "downloads": 0, "likes": 0, "siblings": siblings})

    def _preupload(self, repo_type: str, repo_id: str, revision: str) -> None:
        self._require_user()
        repo = self._lookup(repo_type, repo_id)
        self._log.revision = revision
        if self._log.query.get("create_pr"):
            raise HubError(400, "create_pr is not supported by the test hub")
        store = self.server.hub.store
        with store.lock:
            if revision not in repo.branches:
                store.resolve(repo, revision)  # RevisionNotFound for an unknown name
                raise HubError(400, f"Invalid rev id: {revision} is not a branch; commits go to branches only")
            head_sha = repo.branches[revision]
            tree = repo.commits[head_sha]["tree"]
        files = []
        for f in self._json_body().get("files", []):
            current = tree.get(f["path"])
            files.append({"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                          "oid": current[0] if current else None})
        self._json({"files": files, "commitOid": head_sha})

    def _commit(self, repo_type: str, repo_id: str, revision: str) -> None:
        user = self._require_user()
        repo = self._lookup(repo_type, repo_id)
        self._log.revision = revision
        if self._log.query.get("create_pr"):
            raise HubError(400, "create_pr is not supported by the test hub")
        header, ops = None, []
        for line in self._body().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get("key"), item.get("value") or {}
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"unsupported encoding {value.get('encoding')!r}")
                ops.append(("file", value["path"], base64.b64decode(value["content"])))
            elif key in ("deletedFile", "deletedFolder"):
                ops.append((key, value["path"], None))
            elif key == "lfsFile":
                # preupload never says "lfs", so a well-behaved client cannot get here
                raise HubError(400, f"LFS files are not supported by the test hub: {value.get('path')}")
            else:
                raise HubError(400, f"unsupported commit operation {key!r}")
        if header is None or not header.get("summary"):
            raise HubError(400, "missing commit header / summary")
        sha = self.server.hub.store.commit(repo, revision, ops, header["summary"], header.get("description", ""),
                                           user, parent_commit=header.get("parentCommit"))
        url = f"{self.server.hub.endpoint}/{_URL_PREFIX[repo_type]}{repo_id}/commit/{sha}"
        self._json({"success": True, "commitOid": sha, "commitUrl": url, "hookOutput": ""})

    def _refs(self, repo: _Repo) -> None:
        with self.server.hub.store.lock:
            branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": s} for b, s in repo.branches.items()]
            tags = [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": v["commit"]} for t, v in repo.tags.items()]
        self._json({"branches": branches, "converts": [], "tags": tags, "pullRequests": []})

    def _tree(self, repo: _Repo, revision: str, folder: str) -> None:
        self._log.revision = revision
        store = self.server.hub.store
        with store.lock:
            tree = dict(repo.commits[store.resolve(repo, revision)]["tree"])
        recursive = self._log.query.get("recursive", "").lower() in ("1", "true")
        prefix = folder.strip("/") + "/" if folder.strip("/") else ""
        entries, folders = [], set()
        for path in sorted(tree):
            if not path.startswith(prefix):
                continue
            rel = path[len(prefix):]
            dirs = rel.split("/")[:-1]
            for i in range(len(dirs) if recursive else min(1, len(dirs))):
                folders.add(prefix + "/".join(dirs[: i + 1]))
            if recursive or not dirs:
                oid, size = tree[path]
                entries.append({"type": "file", "oid": oid, "size": size, "path": path})
        if prefix and not entries and not folders:
            raise HubError(404, f"Entry not found: {folder}", "EntryNotFound")
        dir_entries = [{"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0, "path": f}
                       for f in sorted(folders)]
        self._json(dir_entries + entries)

    def _commits(self, repo: _Repo, revision: str) -> None:
        self._log.revision = revision
        store = self.server.hub.store
        out = []
        with store.lock:
            sha = store.resolve(repo, revision)
            while sha:
                c = repo.commits[sha]
                out.append({"id": sha, "title": c["title"], "message": c["message"], "date": c["date"],
                            "authors": [{"user": c["author"]}]})
                sha = c["parents"][0] if c["parents"] else None
        self._json(out)

    def _resolve(self, repo_type: str, repo_id: str, revision: str, filename: str) -> None:
        self._log.route = "resolve"
        self._log.revision = revision
        repo = self._lookup(repo_type, repo_id)
        store = self.server.hub.store
        with store.lock:
            sha = store.resolve(repo, revision)
            entry = repo.commits[sha]["tree"].get(filename)
        if entry is None:
            raise HubError(404, f"Entry not found: {filename}", "EntryNotFound", {"X-Repo-Commit": sha})
        oid, size = entry
        headers = {"X-Repo-Commit": sha, "ETag": f'"{oid}"', "Accept-Ranges": "bytes"}
        if self.command == "HEAD":
            return self._send_head(size, headers)
        with open(store.blob_path(oid), "rb") as f:
            data = f.read()
        start, end = 0, size - 1
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes=") and size:
            first, _, last = rng[6:].split(",")[0].partition("-")
            if first:
                start, end = int(first), min(int(last), size - 1) if last else size - 1
            else:  # "bytes=-N": the last N bytes
                start = max(size - int(last), 0)
            if start >= size or start > end:
                raise HubError(416, "Range Not Satisfiable", headers={"Content-Range": f"bytes */{size}"})
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            return self._send(206, data[start:end + 1], headers, "application/octet-stream")
        self._send(200, data, headers, "application/octet-stream")

    def _send_head(self, size: int, headers: dict) -> None:
        self._log.status = 200
        self.server.hub.requests.append(self._log)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()


# pytest wiring

_pending: HubServer | None = None
_env_root: str | None = None


def configure_hub_env(token: str = DUMMY_TOKEN) -> str:
    """Point huggingface_hub at the local test server and a throwaway cache. Returns the endpoint.

    Call it before anything imports huggingface_hub: the client reads HF_ENDPOINT, the cache paths and the
    feature flags once, at import (``constants.ENDPOINT``, ``HUGGINGFACE_CO_URL_TEMPLATE``, the module-level
    ``HfApi`` behind ``huggingface_hub.upload_file`` & co., the set of trusted Hub origins). If it was imported
    already, those values are patched in place as well. Idempotent.
    """
    global _pending, _env_root
    if _pending is None:
        # Bind now (reserving the port), listen only when the fixture starts the server.
        _pending = HubServer(port=0)
        _env_root = tempfile.mkdtemp(prefix="hfpatch-test-hf-home-")
        atexit.register(shutil.rmtree, _env_root, True)
        atexit.register(_pending.stop)
    endpoint, root = _pending.endpoint, _env_root
    env = {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": os.path.join(root, "home"),  # token file, stored tokens, registry caches: nothing of the user's
        "HF_HUB_CACHE": os.path.join(root, "hub"),
        "HF_XET_CACHE": os.path.join(root, "xet"),
        "HF_ASSETS_CACHE": os.path.join(root, "assets"),
        "HF_TOKEN": token,
        # The server speaks plain HTTP only; with Xet off upload_folder takes its single-commit path.
        "HF_HUB_DISABLE_XET": "1",
        # Telemetry would add a GET /api/agent-harnesses to the first request of the process.
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    }
    os.environ.update(env)
    # These would override or bypass the settings above.
    for var in ("HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_ENABLE_HF_TRANSFER", "HUGGINGFACE_CO_STAGING"):
        os.environ.pop(var, None)
    if "huggingface_hub" in sys.modules:
        _patch_imported_client(endpoint, env)
    return endpoint


def _patch_imported_client(endpoint: str, env: dict) -> None:
    from huggingface_hub import constants

    constants.ENDPOINT = endpoint
    constants.HUGGINGFACE_CO_URL_TEMPLATE = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    constants.HF_HOME = env["HF_HOME"]
    constants.HF_HUB_CACHE = env["HF_HUB_CACHE"]
    constants.HF_XET_CACHE = env["HF_XET_CACHE"]
    constants.HF_ASSETS_CACHE = env["HF_ASSETS_CACHE"]
    constants.HF_TOKEN_PATH = os.path.join(env["HF_HOME"], "token")
    constants.HF_STORED_TOKENS_PATH = os.path.join(env["HF_HOME"], "stored_tokens")
    constants.HF_HUB_DISABLE_XET = True
    constants.HF_HUB_DISABLE_TELEMETRY = True
    constants.HF_HUB_DISABLE_UPDATE_CHECK = True
    hf_api = sys.modules.get("huggingface_hub.hf_api")
    if hf_api is not None:
        hf_api.api.endpoint = endpoint  # the instance behind huggingface_hub.upload_file, create_repo, ...
    http = sys.modules.get("huggingface_hub.utils._http")
    if http is not None and hasattr(http, "_HUB_ORIGINS"):
        http._HUB_ORIGINS = http._HUB_ORIGINS | {http._url_origin(endpoint)}


@pytest.fixture(scope="session")
def hub_server():
    """The local Hub, serving on ``HF_ENDPOINT`` for the whole session; stopped when the session ends.

    Yields the ``HubServer``: ``.endpoint``, ``.requests`` (a ``LoggedRequest`` per call), ``.errors``,
    ``new_repo_id()``, ``mark()`` / ``since()`` / ``routes_since()``, ``resolve()``, ``read_file()``.
    """
    if _pending is None:
        configure_hub_env()
    from huggingface_hub import constants

    if constants.ENDPOINT != _pending.endpoint:
        raise RuntimeError(
            f"huggingface_hub talks to {constants.ENDPOINT}, not to the test hub {_pending.endpoint}: "
            "configure_hub_env() must run before huggingface_hub is imported (see tests/conftest.py)"
        )
    if constants.HF_HUB_OFFLINE:
        raise RuntimeError("HF_HUB_OFFLINE is set: the Hub tests need online mode (against 127.0.0.1 only)")
    _pending.start()
    try:
        yield _pending
    finally:
        _pending.stop()
