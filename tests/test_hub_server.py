"""The real huggingface_hub client against the local test Hub (tests/hub_server.py).

These pin down the server's behaviour that the recipe Hub tests rely on: commits, branches, tags, downloads
by any revision, the client's cache and offline mode, and the exceptions the client raises for missing things.
"""
import os
import socket
import time

import httpx2
import pytest
import torch
from huggingface_hub import (
    HfApi,
    constants,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.torch import load_file, save_file

from hub_server import DUMMY_TOKEN, HubServer, git_blob_oid


@pytest.fixture
def api(hub_server):
    return HfApi()


@pytest.fixture(autouse=True)
def _no_server_bugs(hub_server):
    before = len(hub_server.errors)
    yield
    assert hub_server.errors[before:] == [], "the test hub hit an internal error"


def _repo(api, hub_server, prefix="repo", **kwargs):
    repo_id = hub_server.new_repo_id(prefix)
    api.create_repo(repo_id, **kwargs)
    return repo_id


def test_client_is_configured_for_the_local_hub(hub_server):
    # The conftest must have run before huggingface_hub was imported, or the client would talk to huggingface.co.
    assert constants.ENDPOINT == hub_server.endpoint
    assert hub_server.endpoint.startswith("http://127.0.0.1:")
    assert constants.HUGGINGFACE_CO_URL_TEMPLATE.startswith(hub_server.endpoint + "/")
    assert os.environ["HF_TOKEN"] == DUMMY_TOKEN
    home = os.path.expanduser("~")
    assert not constants.HF_HUB_CACHE.startswith(os.path.join(home, ".cache"))
    assert constants.HF_HUB_DISABLE_XET


def test_create_repo_exist_ok(api, hub_server):
    repo_id = hub_server.new_repo_id("create")
    mark = hub_server.mark()
    url = api.create_repo(repo_id)
    assert url.repo_id == repo_id and url.startswith(hub_server.endpoint)
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(repo_id)
    assert err.value.response.status_code == 409
    assert api.create_repo(repo_id, exist_ok=True).repo_id == repo_id
    assert hub_server.routes_since(mark) == ["create_repo"] * 3
    # Like the Hub, a new repo starts with one commit holding .gitattributes.
    assert api.list_repo_files(repo_id) == [".gitattributes"]
    assert len(api.list_repo_commits(repo_id)) == 1


def test_module_level_functions_use_the_local_hub(hub_server):
    # huggingface_hub.create_repo & co. are bound to an HfApi made at import time, with the endpoint of that moment.
    import huggingface_hub

    repo_id = hub_server.new_repo_id("module-level")
    huggingface_hub.create_repo(repo_id)
    huggingface_hub.upload_file(path_or_fileobj=b"x", path_in_repo="f.txt", repo_id=repo_id)
    assert hub_server.read_file(repo_id, "f.txt") == b"x"


def test_commits_have_shas_and_parents(api, hub_server):
    repo_id = _repo(api, hub_server)
    initial = hub_server.resolve(repo_id)
    mark = hub_server.mark()
    c1 = api.upload_file(path_or_fileobj=b"one", path_in_repo="a.txt", repo_id=repo_id, commit_message="first")
    c2 = api.upload_file(path_or_fileobj=b"two", path_in_repo="a.txt", repo_id=repo_id, commit_message="second")
    # Small files need only preupload (-> "regular") and the commit itself: no LFS batch, no Xet.
    assert hub_server.routes_since(mark) == ["preupload", "commit"] * 2
    assert len(c1.oid) == 40 and int(c1.oid, 16) >= 0 and c1.oid != c2.oid
    assert hub_server.commit_parents(repo_id, c2.oid) == [c1.oid]
    assert hub_server.commit_parents(repo_id, c1.oid) == [initial]
    assert [c.commit_id for c in api.list_repo_commits(repo_id)] == [c2.oid, c1.oid, initial]
    assert [c.title for c in api.list_repo_commits(repo_id)][:2] == ["second", "first"]
    assert api.model_info(repo_id).sha == c2.oid
    assert api.model_info(repo_id, revision=c1.oid).sha == c1.oid
    assert api.repo_info(repo_id, revision=c1.oid).sha == c1.oid


def test_unchanged_file_is_not_committed_again(api, hub_server):
    repo_id = _repo(api, hub_server)
    c1 = api.upload_file(path_or_fileobj=b"same", path_in_repo="a.txt", repo_id=repo_id)
    mark = hub_server.mark()
    c2 = api.upload_file(path_or_fileobj=b"same", path_in_repo="a.txt", repo_id=repo_id)
    # preupload reports the file's current git oid; the client sees it unchanged and only asks for the head sha.
    assert hub_server.routes_since(mark) == ["preupload", "model_info"]
    assert c2.oid == c1.oid


def test_safetensors_of_a_few_kb_is_a_regular_file(api, hub_server, tmp_path):
    repo_id = _repo(api, hub_server)
    tensors = {"table": torch.arange(2048, dtype=torch.int32).reshape(256, 8)}
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    assert 4_000 < path.stat().st_size < 20_000
    mark = hub_server.mark()
    api.upload_file(path_or_fileobj=str(path), path_in_repo="w.safetensors", repo_id=repo_id)
    assert hub_server.routes_since(mark) == ["preupload", "commit"]
    assert hub_server.read_file(repo_id, "w.safetensors") == path.read_bytes()
    local = hf_hub_download(repo_id, "w.safetensors", cache_dir=tmp_path / "cache")
    assert torch.equal(load_file(local)["table"], tensors["table"])


def test_upload_folder_and_list_files(api, hub_server, tmp_path):
    repo_id = _repo(api, hub_server)
    (tmp_path / "sub").mkdir()
    (tmp_path / "top.json").write_text("{}")
    (tmp_path / "sub" / "inner.txt").write_text("inner")
    api.upload_folder(folder_path=tmp_path, repo_id=repo_id)
    assert sorted(api.list_repo_files(repo_id)) == [".gitattributes", "sub/inner.txt", "top.json"]
    top = {e.path for e in api.list_repo_tree(repo_id)}
    assert top == {".gitattributes", "sub", "top.json"}
    # delete_patterns lists the remote files (tree) and deletes in the same commit.
    (tmp_path / "top.json").unlink()
    api.upload_folder(folder_path=tmp_path, repo_id=repo_id, delete_patterns="*.json")
    assert sorted(api.list_repo_files(repo_id)) == [".gitattributes", "sub/inner.txt"]


def test_upload_folder_with_xet_enabled_still_commits_regular_files(api, hub_server, tmp_path, monkeypatch):
    # With hf_xet installed and not disabled, upload_folder takes its pipelined path; it must still only need
    # preupload + commit when the server says "regular".
    pytest.importorskip("hf_xet")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    repo_id = _repo(api, hub_server)
    (tmp_path / "a.txt").write_text("a")
    mark = hub_server.mark()
    api.upload_folder(folder_path=tmp_path, repo_id=repo_id)
    assert hub_server.routes_since(mark) == ["preupload", "commit"]
    assert hub_server.read_file(repo_id, "a.txt") == b"a"


def test_branches_and_tags(api, hub_server):
    repo_id = _repo(api, hub_server)
    c1 = api.upload_file(path_or_fileobj=b"v1", path_in_repo="f.txt", repo_id=repo_id)
    api.create_tag(repo_id, tag="v1", tag_message="first release")
    api.create_branch(repo_id, branch="dev")
    c2 = api.upload_file(path_or_fileobj=b"v2", path_in_repo="f.txt", repo_id=repo_id, revision="dev")
    refs = api.list_repo_refs(repo_id)
    assert {b.name: b.target_commit for b in refs.branches} == {"main": c1.oid, "dev": c2.oid}
    assert {t.name: t.target_commit for t in refs.tags} == {"v1": c1.oid}
    # A branch started from a tag, a tag on a commit sha.
    api.create_branch(repo_id, branch="from-tag", revision="v1")
    api.create_tag(repo_id, tag="dev-head", revision=c2.oid)
    assert hub_server.resolve(repo_id, "from-tag") == c1.oid
    assert hub_server.resolve(repo_id, "dev-head") == c2.oid

    with pytest.raises(HfHubHTTPError) as err:
        api.create_branch(repo_id, branch="dev")
    assert err.value.response.status_code == 409
    api.create_branch(repo_id, branch="dev", exist_ok=True)
    with pytest.raises(HfHubHTTPError) as err:
        api.create_tag(repo_id, tag="v1")
    assert err.value.response.status_code == 409
    api.create_tag(repo_id, tag="v1", exist_ok=True)
    with pytest.raises(RevisionNotFoundError):
        api.create_branch(repo_id, branch="x", revision="no-such-rev")
    with pytest.raises(RevisionNotFoundError):
        api.create_tag(repo_id, tag="x", revision="no-such-rev")
    # As on the Hub, a commit never creates a branch: create_branch first.
    with pytest.raises(RevisionNotFoundError):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="f.txt", repo_id=repo_id, revision="no-such-branch")
    api.delete_branch(repo_id, branch="from-tag")
    api.delete_tag(repo_id, tag="dev-head")
    refs = api.list_repo_refs(repo_id)
    assert {b.name for b in refs.branches} == {"main", "dev"} and {t.name for t in refs.tags} == {"v1"}


def test_parent_commit_guards_against_concurrent_commits(api, hub_server):
    repo_id = _repo(api, hub_server)
    c1 = api.upload_file(path_or_fileobj=b"1", path_in_repo="f.txt", repo_id=repo_id)
    api.upload_file(path_or_fileobj=b"2", path_in_repo="f.txt", repo_id=repo_id, parent_commit=c1.oid)
    with pytest.raises(HfHubHTTPError) as err:
        api.upload_file(path_or_fileobj=b"3", path_in_repo="f.txt", repo_id=repo_id, parent_commit=c1.oid)
    assert err.value.response.status_code == 412


def test_download_by_branch_tag_and_commit(api, hub_server, tmp_path):
    repo_id = _repo(api, hub_server)
    c1 = api.upload_file(path_or_fileobj=b"content v1", path_in_repo="dir/f.txt", repo_id=repo_id)
    api.create_tag(repo_id, tag="v1")
    api.create_branch(repo_id, branch="dev")
    c2 = api.upload_file(path_or_fileobj=b"content v2", path_in_repo="dir/f.txt", repo_id=repo_id)
    c3 = api.upload_file(path_or_fileobj=b"content dev", path_in_repo="dir/f.txt", repo_id=repo_id, revision="dev")
    cache = tmp_path / "cache"

    def get(revision):
        path = hf_hub_download(repo_id, "dir/f.txt", revision=revision, cache_dir=cache)
        with open(path, "rb") as f:
            return f.read(), path

    expected = {
        None: (b"content v2", c2.oid), "main": (b"content v2", c2.oid), "v1": (b"content v1", c1.oid),
        "dev": (b"content dev", c3.oid), c1.oid: (b"content v1", c1.oid), c3.oid: (b"content dev", c3.oid),
    }
    for revision, (content, sha) in expected.items():
        data, path = get(revision)
        assert data == content, revision
        # The cache is keyed by the X-Repo-Commit the server returned.
        assert f"{os.sep}snapshots{os.sep}{sha}{os.sep}" in path, revision

    # HEAD carries what the client needs: the commit, the git blob oid as ETag, the size.
    meta = get_hf_file_metadata(hf_hub_url(repo_id, "dir/f.txt", revision="v1"))
    assert (meta.commit_hash, meta.etag, meta.size) == (c1.oid, git_blob_oid(b"content v1"), len(b"content v1"))

    # A cached file asked for by commit sha needs no request at all; by branch only a HEAD (no GET).
    mark = hub_server.mark()
    assert get(c1.oid)[0] == b"content v1"
    assert hub_server.routes_since(mark) == []
    assert get("main")[0] == b"content v2"
    assert [(r.method, r.route) for r in hub_server.since(mark)] == [("HEAD", "resolve")]


def test_offline_mode_hits_the_cache(api, hub_server, tmp_path, monkeypatch):
    repo_id = _repo(api, hub_server)
    api.upload_file(path_or_fileobj=b"cached", path_in_repo="f.txt", repo_id=repo_id)
    api.upload_file(path_or_fileobj=b"never fetched", path_in_repo="g.txt", repo_id=repo_id)
    cache = tmp_path / "cache"
    online = hf_hub_download(repo_id, "f.txt", cache_dir=cache)

    mark = hub_server.mark()
    assert hf_hub_download(repo_id, "f.txt", cache_dir=cache, local_files_only=True) == online
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hf_hub_download(repo_id, "f.txt", cache_dir=cache) == online
    assert hf_hub_download(repo_id, "f.txt", revision="main", cache_dir=cache) == online
    with pytest.raises(LocalEntryNotFoundError):
        hf_hub_download(repo_id, "g.txt", cache_dir=cache)
    assert hub_server.since(mark) == []
    with open(online, "rb") as f:
        assert f.read() == b"cached"


def test_missing_file_repo_and_revision_raise_the_client_errors(api, hub_server, tmp_path):
    repo_id = _repo(api, hub_server)
    api.upload_file(path_or_fileobj=b"x", path_in_repo="f.txt", repo_id=repo_id)
    cache = tmp_path / "cache"
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "missing.txt", cache_dir=cache)
    # The client records the miss for that commit, as it does with the real Hub.
    assert list((cache / f"models--{repo_id.replace('/', '--')}" / ".no_exist").glob("*/missing.txt"))
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(hub_server.new_repo_id("absent"), "f.txt", cache_dir=cache)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(hub_server.new_repo_id("absent"))
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "f.txt", revision="no-such-branch", cache_dir=cache)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "f.txt", revision="0" * 40, cache_dir=cache)
    with pytest.raises(RevisionNotFoundError):
        api.model_info(repo_id, revision="no-such-branch")
    with pytest.raises(EntryNotFoundError):
        api.list_repo_tree(repo_id, path_in_repo="no-such-dir").__iter__().__next__()


def test_private_repo_needs_a_valid_token(api, hub_server, tmp_path):
    repo_id = _repo(api, hub_server, private=True)
    api.upload_file(path_or_fileobj=b"secret", path_in_repo="f.txt", repo_id=repo_id)
    assert api.model_info(repo_id).private is True
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(repo_id, "f.txt", token=False, cache_dir=tmp_path / "anon")
    path = hf_hub_download(repo_id, "f.txt", cache_dir=tmp_path / "auth")
    with open(path, "rb") as f:
        assert f.read() == b"secret"
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(token="hf_notAValidTokenForThisHub").model_info(repo_id)
    assert err.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(hub_server.new_repo_id(), token=False)
    assert err.value.response.status_code == 401


def test_whoami(api, hub_server):
    assert api.whoami()["name"] == "test-user"


def test_range_requests(api, hub_server):
    # The client sends Range only to resume an interrupted download; make sure that path would work.
    repo_id = _repo(api, hub_server)
    api.upload_file(path_or_fileobj=b"0123456789", path_in_repo="f.bin", repo_id=repo_id)
    url = hf_hub_url(repo_id, "f.bin")
    r = httpx2.get(url, headers={"Range": "bytes=4-"})
    assert r.status_code == 206 and r.content == b"456789"
    assert r.headers["Content-Range"] == "bytes 4-9/10"
    assert httpx2.get(url, headers={"Range": "bytes=20-"}).status_code == 416


def test_server_lifecycle_is_bounded_and_loopback_only(tmp_path):
    server = HubServer(port=0, root=str(tmp_path / "srv"))
    host, port = server._httpd.server_address
    assert host == "127.0.0.1"
    # Bound but not listening yet: refused at once, so a test without the fixture fails fast instead of hanging.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, port), timeout=2).close()
    with server:
        conn = socket.create_connection((host, port), timeout=2)  # an idle keep-alive client must not block stop()
        assert httpx2.get(f"{server.endpoint}/api/models/nobody/nothing").status_code == 401
        t0 = time.monotonic()
    server.stop()  # idempotent
    assert time.monotonic() - t0 < 3
    assert not server._thread.is_alive()
    conn.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, port), timeout=2).close()


def test_configure_after_huggingface_hub_was_imported(tmp_path):
    # If something imports huggingface_hub before the conftest runs, configure_hub_env() patches what the client
    # captured at import. Checked in a fresh interpreter, since this one imported it in the right order.
    import subprocess
    import sys

    script = f"""
import sys
sys.path.insert(0, {os.path.dirname(__file__)!r})
import huggingface_hub
from huggingface_hub import HfApi, hf_hub_download
import hub_server
endpoint = hub_server.configure_hub_env()
with hub_server._pending.start() as server:
    huggingface_hub.create_repo("test-user/late")
    HfApi().upload_file(path_or_fileobj=b"late", path_in_repo="f.txt", repo_id="test-user/late")
    path = hf_hub_download("test-user/late", "f.txt")
    assert open(path, "rb").read() == b"late"
    assert path.startswith(huggingface_hub.constants.HF_HUB_CACHE), path
    assert [r.route for r in server.requests] == ["create_repo", "preupload", "commit", "resolve", "resolve"]
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
