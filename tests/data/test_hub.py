"""`clipdistill data get|list` against a fake Hub (a local folder laid out like clip-benchmark/wds_*),
data-root resolution, and the demo's refusal when its datasets are missing. No network."""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers.cli import one_line_error

from clipdistill.cli.main import main
from clipdistill.data import hub
from clipdistill.data.shards import dataset_info, iter_samples
from clipdistill.errors import UserError
from clipdistill.paths import data_root, fetch_root


class FakeHub:
    """Replaces `hub._download`: copies matching files from `folder/wds_NAME`, skipping those already
    present (as huggingface_hub does); `fail_after` files it raises `error` instead."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.copied: list[str] = []
        self.reused: list[str] = []
        self.fail_after: int | None = None
        self.error: Exception = ConnectionError("connection reset")

    def __call__(self, repo_id: str, patterns: list[str], local_dir: Path) -> list[str]:
        src = self.folder / repo_id.split("/", 1)[1]
        assert src.is_dir(), f"the fake hub has no {repo_id}"
        files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
        files = [f for f in files if hub._matches(f, patterns)]
        for rel in files:
            dest = local_dir / rel
            if dest.exists():
                self.reused.append(rel)
                continue
            if self.fail_after is not None and len(self.copied) >= self.fail_after:
                raise self.error
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / rel, dest)
            self.copied.append(rel)
        return files


@pytest.fixture
def fake_hub(make_dataset, monkeypatch, tmp_path):
    """wds_cifar10 (test: 6 samples in 2 .tar.gz shards, train: 8 in 2; no dataset_type.txt, as in
    CLIP_benchmark where classification is the default) and wds_flickr8k (train 10 in 2 shards, test 4;
    no dev split)."""
    make_dataset("wds_cifar10", n=6, shards=2, gz=True, split="test", classes=("cat", "dog", "frog"))
    make_dataset("wds_cifar10", n=8, shards=2, gz=True, split="train", classes=("cat", "dog", "frog"))
    (tmp_path / "data" / "wds_cifar10" / "dataset_type.txt").unlink()
    make_dataset("wds_flickr8k", kind="retrieval", n=10, shards=2, split="train")
    make_dataset("wds_flickr8k", kind="retrieval", n=4, split="test")
    fake = FakeHub(tmp_path / "data")
    monkeypatch.setattr(hub, "_download", fake)
    return fake


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.delenv("CLIPDISTILL_DATA", raising=False)
    monkeypatch.setenv("CLIPDISTILL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "root"


def _transport_error() -> type[Exception]:
    """The connection error of the HTTP client huggingface_hub uses (httpx2, httpx or requests)."""
    for module, name in (
        ("httpx2", "ConnectError"),
        ("httpx", "ConnectError"),
        ("requests.exceptions", "ConnectionError"),
    ):
        try:
            return getattr(importlib.import_module(module), name)
        except ImportError:
            continue
    pytest.skip("no HTTP client found")


def test_get_installs_a_complete_folder_the_toolkit_reads(fake_hub, root, capsys):
    assert main(["data", "get", "cifar10", "--root", str(root)]) == 0
    assert "cifar10 <- clip-benchmark/wds_cifar10: test (new), train (new)" in capsys.readouterr().out
    assert sorted(p.name for p in root.iterdir()) == ["cifar10"]  # the staging folder is gone
    info = dataset_info("cifar10", root)
    assert info.kind == "classification" and info.classnames == ["cat", "dog", "frog"]
    assert info.splits() == ["test", "train"]
    assert [s.label for s in iter_samples(info.shards("test"))] == [0, 1, 2, 0, 1, 2]
    assert len(list(iter_samples(info.shards("train")))) == 8

    assert main(["data", "list", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert (
        "| cifar10 | classification | test (6 in 2 shards), train (8 in 2 shards) | clip-benchmark/wds_cifar10 |"
        in out
    )
    assert "| imagenet-1k-sample | imagenet1k |" in out

    fake_hub.copied.clear()
    assert main(["data", "get", "cifar10", "--root", str(root)]) == 0  # complete: no download at all
    assert fake_hub.copied == [] and "test (already local), train (already local)" in capsys.readouterr().out


def test_only_requested_splits_then_a_new_split_moves_in(fake_hub, root):
    first = hub.get_dataset("cifar10", ["test"], root)
    assert first.added == ["test"]
    assert {f.split("/")[0] for f in fake_hub.copied} == {
        "test",
        "classnames.txt",
        "zeroshot_classification_templates.txt",
    }
    test_inode = (root / "cifar10" / "test").stat().st_ino
    second = hub.get_dataset("cifar10", ["train", "test"], root)
    assert second.added == ["train"] and second.kept == ["test"]
    assert (root / "cifar10" / "test").stat().st_ino == test_inode  # untouched
    assert dataset_info("cifar10", root).splits() == ["test", "train"]


def test_hub_and_local_names_both_resolve(fake_hub, root, make_dataset, tmp_path):
    assert hub.resolve("imagenet1k") is hub.resolve("imagenet-1k-sample")
    assert (
        hub.resolve("dtd").local == "dtd-10"
        and hub.resolve("cifar100-916").repo_id == "clip-benchmark/wds_cifar100"
    )
    make_dataset("wds_imagenet1k", n=3, classes=("tench", "goldfish", "shark"))
    assert hub.get_dataset("imagenet1k", root=root).folder == root / "imagenet-1k-sample"
    assert dataset_info("imagenet-1k-sample", root).classnames == ["tench", "goldfish", "shark"]
    with pytest.raises(UserError, match="did you mean 'cifar10'"):
        hub.resolve("cifar11")


def test_interrupted_download_leaves_no_dataset_and_resumes(fake_hub, root, capsys):
    fake_hub.fail_after = 3
    rc = main(["data", "get", "cifar10", "--root", str(root)])
    one_line_error(capsys, rc, "cannot reach the Hugging Face Hub", "--data-root")
    assert not (root / "cifar10").exists()
    partial = sorted(p.name for p in (root / ".partial-cifar10" / "download").rglob("*") if p.is_file())
    assert len(partial) == 3
    fake_hub.fail_after = None
    assert main(["data", "get", "cifar10", "--root", str(root)]) == 0
    assert len(fake_hub.reused) == 3  # the second call picked up the first one's files
    assert not (root / ".partial-cifar10").exists()
    assert dataset_info("cifar10", root).splits() == ["test", "train"]


def test_shard_count_disagreeing_with_nshards_is_refused(fake_hub, root, tmp_path, capsys):
    (tmp_path / "data" / "wds_cifar10" / "test" / "nshards.txt").write_text("3")
    rc = main(["data", "get", "cifar10", "--splits", "test", "--root", str(root)])
    one_line_error(capsys, rc, "split 'test'", "nshards.txt says 3 shards", "0..1 (2 files)")
    assert not (root / "cifar10").exists()


def test_split_absent_from_the_hub_is_refused(fake_hub, root, capsys):
    rc = main(["data", "get", "cifar10", "--splits", "val", "--root", str(root)])
    one_line_error(capsys, rc, "has no split val on the Hub")


def test_dev_is_carved_from_train_when_the_hub_has_none(fake_hub, root, tmp_path):
    result = hub.get_dataset("flickr8k", root=root, dev_size=3)
    assert result.added == ["dev", "test", "train"] and result.dev_split["dev_samples"] == 3
    info = dataset_info("flickr8k", root)
    dev = [s.key for s in iter_samples(info.shards("dev"))]
    train = [s.key for s in iter_samples(info.shards("train"))]
    assert len(dev) == 3 and len(train) == 7 and not set(dev) & set(train)
    assert sorted(dev + train) == [f"s{i:07d}" for i in range(10)]
    assert len(info.shards("train")) == 2
    assert all(s.captions for s in iter_samples(info.shards("dev")))
    assert hub.verify_split(info.root / "dev") == 1
    again = hub.get_dataset("flickr8k", root=tmp_path / "other", dev_size=3)
    assert again.dev_split["dev_keys"] == sorted(dev)  # seeded: the same draw everywhere


def test_dev_alone_brings_the_reduced_train(fake_hub, root):
    hub.get_dataset("flickr8k", ["train", "test"], root)
    assert len(list(iter_samples(dataset_info("flickr8k", root).shards("train")))) == 10
    result = hub.get_dataset("flickr8k", ["dev"], root, dev_size=2)
    assert sorted(result.added) == ["dev", "train"]
    info = dataset_info("flickr8k", root)
    train = {s.key for s in iter_samples(info.shards("train"))}
    assert len(train) == 8 and not train & {s.key for s in iter_samples(info.shards("dev"))}
    assert (info.root / "dev_split.json").exists() and not list(info.root.glob(".old-*"))


@pytest.mark.parametrize("error", ["connect", "offline", "local_entry"])
def test_no_network_is_one_line_and_exit_2(fake_hub, root, capsys, error):
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    if error == "connect":
        exc = _transport_error()("[Errno -3] Temporary failure in name resolution")
    else:
        exc = {
            "offline": OfflineModeIsEnabled("offline"),
            "local_entry": LocalEntryNotFoundError("cannot find"),
        }[error]
    fake_hub.fail_after, fake_hub.error = 0, exc
    rc = main(["data", "get", "cifar10", "--root", str(root)])
    one_line_error(capsys, rc, "cannot reach the Hugging Face Hub", "--data-root DIR")
    assert not (root / "cifar10").exists()


def test_unreachable_endpoint_fails_fast_through_huggingface_hub(root, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    start = time.monotonic()
    rc = main(["data", "get", "cifar10", "--root", str(root)])
    assert time.monotonic() - start < 10
    one_line_error(capsys, rc, "cannot reach the Hugging Face Hub", "127.0.0.1:9", "--data-root DIR")
    assert not (root / "cifar10").exists()


class _MiniHub(BaseHTTPRequestHandler):
    """The three Hub routes `hub._download` uses: dataset info (file list), and HEAD/GET of a file at a
    revision; `fail` names a file whose GET answers 404 (a download cut short)."""

    repos: Path
    fail = ""
    gets: list[str] = []
    sha = "0" * 40

    def log_message(self, *args) -> None:
        pass

    def _file(self) -> Path | None:
        parts = self.path.split("?")[0].split("/")  # /datasets/ORG/REPO/resolve/REV/PATH
        if len(parts) > 6 and parts[1] == "datasets" and parts[4] == "resolve":
            return self.repos / parts[3] / "/".join(parts[6:])
        return None

    def _send(self, status: int, body: bytes = b"", etag: str = "", head: bool = False) -> None:
        self.send_response(status)
        if status == 200 and etag:
            self.send_header("X-Repo-Commit", self.sha)
            self.send_header("ETag", f'"{etag}"')
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        f = self._file()
        ok = f is not None and f.is_file()
        data = f.read_bytes() if ok else b""
        self._send(200 if ok else 404, data, hashlib.sha1(data).hexdigest(), head=True)

    def do_GET(self) -> None:
        if self.path.startswith("/api/datasets/"):
            repo = self.repos / self.path.split("?")[0].split("/")[4]
            files = [
                {"rfilename": p.relative_to(repo).as_posix()} for p in sorted(repo.rglob("*")) if p.is_file()
            ]
            return self._send(200, json.dumps({"id": repo.name, "sha": self.sha, "siblings": files}).encode())
        f = self._file()
        if f is None or not f.is_file() or f.name == self.fail:
            return self._send(404)
        self.gets.append(f.name)
        data = f.read_bytes()
        self._send(200, data, hashlib.sha1(data).hexdigest())


def test_real_download_path_resumes_against_a_local_hub(make_dataset, root, tmp_path, monkeypatch, capsys):
    make_dataset("wds_mnist", n=6, shards=3, gz=True, classes=[str(i) for i in range(10)])
    _MiniHub.repos, _MiniHub.fail = tmp_path / "data", "2.tar.gz"
    server = ThreadingHTTPServer(("127.0.0.1", 0), _MiniHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    try:
        rc = main(["data", "get", "mnist", "--root", str(root)])
        one_line_error(capsys, rc, "clip-benchmark/wds_mnist")
        assert not (root / "mnist").exists() and "0.tar.gz" in _MiniHub.gets
        _MiniHub.fail, _MiniHub.gets = "", []
        assert main(["data", "get", "mnist", "--root", str(root)]) == 0
    finally:
        server.shutdown()
        server.server_close()
    assert "0.tar.gz" not in _MiniHub.gets and "2.tar.gz" in _MiniHub.gets  # finished files were kept
    assert len(list(iter_samples(dataset_info("mnist", root).shards("test")))) == 6


def test_data_root_resolution_order(tmp_path, monkeypatch):
    monkeypatch.delenv("CLIPDISTILL_DATA", raising=False)
    monkeypatch.setenv("CLIPDISTILL_CACHE", str(tmp_path / "cache"))
    explicit, env, shared = tmp_path / "explicit", tmp_path / "env", tmp_path / "ws" / "shared" / "data"
    for d in (explicit, env, shared, tmp_path / "ws" / "main" / "sub", tmp_path / "elsewhere"):
        d.mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "ws" / "main" / "sub")
    assert data_root() == shared  # found upward from the working directory
    monkeypatch.setenv("CLIPDISTILL_DATA", str(env))
    assert data_root() == env
    assert data_root(explicit) == explicit
    monkeypatch.delenv("CLIPDISTILL_DATA")
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(UserError, match="clipdistill data get"):
        data_root()  # nothing anywhere: the message says how to fetch
    (tmp_path / "cache" / "data").mkdir(parents=True)
    assert data_root() == tmp_path / "cache" / "data"
    # `data get` writes to --root, $CLIPDISTILL_DATA, the cache; never into a ../shared/data it found
    monkeypatch.chdir(tmp_path / "ws" / "main" / "sub")
    assert fetch_root() == tmp_path / "cache" / "data"
    monkeypatch.setenv("CLIPDISTILL_DATA", str(env))
    assert fetch_root() == env and fetch_root(explicit) == explicit


def test_demo_without_its_datasets_names_the_fetch_command(root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no ../shared/data above tmp_path
    rc = main(["demo", "--out", str(tmp_path / "demo")])
    one_line_error(
        capsys,
        rc,
        "`clipdistill data get flickr8k cifar10 imagenet-1k-sample dtd-10 mnist`",
        "--data-root DIR",
    )
    assert not (tmp_path / "demo").exists()  # refused before any work


def test_demo_names_only_what_is_missing_and_download_fetches_it(
    fake_hub, make_dataset, tmp_path, monkeypatch, capsys
):
    monkeypatch.delenv("CLIPDISTILL_DATA", raising=False)
    monkeypatch.setenv("CLIPDISTILL_CACHE", str(tmp_path / "cache"))
    local = make_dataset("imagenet-1k-sample", n=2)  # tmp_path/data, which also holds the fake hub
    for name in ("dtd-10", "mnist"):
        make_dataset(name, n=2)
    make_dataset("cifar10", n=2, split="train")
    rc = main(["demo", "--data-root", str(local), "--out", str(tmp_path / "demo")])
    err = one_line_error(capsys, rc, "flickr8k (train, test, dev); cifar10 (test)")
    assert f"`clipdistill data get flickr8k cifar10 --root {local}`" in err
    fetched = hub.require({"cifar10": ["test"], "flickr8k": ["train", "test"]}, local, download=True)
    assert [(r.name, r.added) for r in fetched] == [("cifar10", ["test"]), ("flickr8k", ["test", "train"])]
    assert hub.missing_splits({"cifar10": ["test", "train"], "flickr8k": ["train", "test"]}, local) == {}
