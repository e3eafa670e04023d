"""Issue 23 acceptance: every CLI subcommand, fed a bad input, exits 2 with exactly one line on stderr
(no traceback, no warning before it) and writes nothing under its output path.

Each case is (class, id, argv builder, output path); the builder receives a `Data` of tiny fixtures
(an image-caption set `caps`, a classification set `toy`, a run config, a damaged teacher cache...).
The classes are the issue's: unknown names, missing or wrong-type paths, zero/negative/NaN numbers,
empty or corrupt files, non-UTF-8 text.
"""

from __future__ import annotations

import logging
import sys
import tarfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers.cli import deadline

sys.path.insert(0, str(Path(__file__).resolve().parent / "train"))
import tiny_models  # noqa: E402

from clipdistill.cli.main import main  # noqa: E402


@dataclass
class Data:
    tmp: Path
    root: Path  # data root: caps (retrieval, train + test), toy (classification, test)
    cfg: Path  # a valid distill config (tiny student, fake teacher) writing to tmp/run
    out: Path  # the output path cases write to (must stay untouched)
    file: Path  # an existing plain file

    def config(self, **changes) -> Path:
        """A distill config with `changes` (dotted keys), written next to the base one."""
        data = yaml.safe_load(self.cfg.read_text())
        for key, value in changes.items():
            node = data
            *parents, last = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[last] = value
        path = self.tmp / f"cfg{len(list(self.tmp.glob('cfg*.yaml')))}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    def dataset(
        self,
        name: str,
        *,
        kind: str = "retrieval",
        shard: bytes | None = None,
        nshards: str = "1",
        classnames: bytes = b"cat\ndog\n",
    ) -> Path:
        """A one-split (`train`) dataset whose shard holds `shard` (None: an empty tar)."""
        folder = self.root / name
        (folder / "train").mkdir(parents=True)
        (folder / "dataset_type.txt").write_text(kind)
        if kind == "classification":
            (folder / "classnames.txt").write_bytes(classnames)
            (folder / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.")
        (folder / "train" / "nshards.txt").write_text(nshards)
        if shard is None:
            with tarfile.open(folder / "train" / "0.tar", "w"):
                pass
        else:
            (folder / "train" / "0.tar").write_bytes(shard)
        return folder

    def embeddings(self, *, nan: bool) -> Path:
        x = np.random.default_rng(0).normal(size=(10, 8)).astype(np.float32)
        if nan:
            x[3, 2] = np.nan
        path = self.tmp / "emb.npz"
        np.savez(path, embeddings=x, keys=np.array([f"k{i}" for i in range(10)]))
        return path

    def damaged_cache(self) -> Path:
        """A teacher cache of caps:train whose first image.npy is cut short."""
        from clipdistill.data.loader import resolve_shards
        from clipdistill.data.teacher_cache import build_cache

        shards, _ = resolve_shards("caps:train", self.root)
        cache = self.tmp / "cache"
        build_cache(tiny_models.FakeTeacher(24), shards, cache, augmentations=1, batch_size=16)
        image = next(cache.glob("shards/*/image.npy"))
        image.write_bytes(image.read_bytes()[:200])
        return cache


@pytest.fixture
def data(tmp_path, make_dataset) -> Data:
    tiny_models.register()
    root = make_dataset("caps", kind="retrieval", n=16, shards=2, split="train")
    make_dataset("caps", kind="retrieval", n=8, split="test")
    make_dataset("toy", kind="classification", n=6, classes=("cat", "dog", "bird"), split="test")
    cfg = tmp_path / "base.yaml"
    cfg.write_text(yaml.safe_dump(tiny_models.base_config(root, tmp_path / "out", steps=2)))
    (tmp_path / "plain.txt").write_text("a plain file\n")
    return Data(tmp=tmp_path, root=root, cfg=cfg, out=tmp_path / "out", file=tmp_path / "plain.txt")


def distill(d: Data, *extra: str, **changes) -> list[str]:
    return ["distill", "--config", str(d.config(**changes) if changes else d.cfg), *extra]


def ev(d: Data, *extra: str, dataset: str = "toy") -> list[str]:
    return [
        "eval",
        "--model",
        "student:vit-t-32",
        "--dataset",
        dataset,
        "--data-root",
        str(d.root),
        "--quiet",
        *extra,
    ]


def cache(d: Data, *extra: str, data: str = "caps:train") -> list[str]:
    return [
        "cache-teacher",
        "--teacher",
        "fake:24",
        "--data",
        data,
        "--data-root",
        str(d.root),
        "--out",
        str(d.out),
        *extra,
    ]


def bench(*extra: str) -> list[str]:
    return ["bench-latency", "--model", "student:vit-t-32", "--no-onnx", *extra]


def export(d: Data, checkpoint: str, *extra: str) -> list[str]:
    return ["export", "--checkpoint", checkpoint, "--format", "openclip", "--out", str(d.out), *extra]


def demo(d: Data, *extra: str) -> list[str]:
    return [
        "demo",
        "--out",
        str(d.out),
        "--data-root",
        str(d.root),
        "--teacher-dir",
        str(d.tmp / "teacher"),
        *extra,
    ]


def _write(path: Path, content: bytes) -> str:
    path.write_bytes(content)
    return str(path)


UNKNOWN, PATH, NUMBER, FILE, TEXT = (
    "unknown name",
    "missing or wrong-type path",
    "zero/negative/NaN number",
    "empty or corrupt file",
    "non-UTF-8 text",
)
Builder = Callable[[Data], list[str]]
CASES: list[tuple[str, str, Builder]] = [
    # --- distill
    (UNKNOWN, "distill-loss-term", lambda d: distill(d, losses={"crdd": 1.0})),
    (UNKNOWN, "distill-config-key", lambda d: distill(d, "optim.lrr=1")),
    (UNKNOWN, "distill-train-dataset", lambda d: distill(d, "data.train=[cpas:train]")),
    (UNKNOWN, "distill-train-split", lambda d: distill(d, "data.train=[caps:val]")),
    (UNKNOWN, "distill-eval-dataset", lambda d: distill(d, "eval.datasets=[cpas:test]")),
    (UNKNOWN, "distill-eval-split", lambda d: distill(d, "eval.datasets=[caps:val]")),
    (UNKNOWN, "distill-teacher-prefix", lambda d: distill(d, "teacher.spec=nosuch:x")),
    (UNKNOWN, "distill-student-text", lambda d: distill(d, "student.text=mine")),
    (UNKNOWN, "distill-student-init", lambda d: distill(d, "student.init=imagenet")),
    (
        UNKNOWN,
        "distill-student-init-not-for-preset",
        lambda d: distill(d, "student.spec=student:vit-t-32", "student.init=pretrained"),
    ),
    (PATH, "distill-config-missing", lambda d: ["distill", "--config", str(d.tmp / "none.yaml")]),
    (PATH, "distill-config-dir", lambda d: ["distill", "--config", str(d.tmp)]),
    (PATH, "distill-output-dir-is-file", lambda d: distill(d, f"output_dir={d.file}")),
    (PATH, "distill-output-dir-under-file", lambda d: distill(d, f"output_dir={d.file}/run")),
    (PATH, "distill-keep-missing", lambda d: distill(d, "--keep", str(d.tmp / "none.txt"))),
    (PATH, "distill-teacher-cache-missing", lambda d: distill(d, f"teacher.cache={d.tmp / 'nocache'}")),
    (PATH, "distill-openclip-folder-missing", lambda d: distill(d, "teacher.spec=openclip:/nonexistent")),
    (NUMBER, "distill-steps-0", lambda d: distill(d, "steps=0")),
    (NUMBER, "distill-steps-negative", lambda d: distill(d, "steps=-3")),
    (NUMBER, "distill-lr-0", lambda d: distill(d, "optim.lr=0")),
    (NUMBER, "distill-lr-nan", lambda d: distill(d, "optim.lr=.nan")),
    (NUMBER, "distill-batch-0", lambda d: distill(d, "data.batch_size=0")),
    (NUMBER, "distill-threads-0", lambda d: distill(d, "threads=0")),
    (NUMBER, "distill-all-weights-0", lambda d: distill(d, losses={"clip": 0.0})),
    (NUMBER, "distill-weight-nan", lambda d: distill(d, losses={"clip": float("nan")})),
    (NUMBER, "distill-workers-negative", lambda d: distill(d, "data.workers=-1")),
    (NUMBER, "distill-student-freeze-negative", lambda d: distill(d, "student.freeze=-1")),
    (NUMBER, "distill-student-image-size-8", lambda d: distill(d, "student.image_size=8")),
    (
        FILE,
        "distill-keep-matches-nothing",
        lambda d: distill(d, "--keep", _write(d.tmp / "keep.txt", b"nokey\n")),
    ),
    (FILE, "distill-keep-empty", lambda d: distill(d, "--keep", _write(d.tmp / "keep.txt", b""))),
    (FILE, "distill-empty-tar", lambda d: (d.dataset("hollow"), distill(d, "data.train=[hollow:train]"))[1]),
    (
        FILE,
        "distill-zero-byte-shard",
        lambda d: (d.dataset("zero", shard=b""), distill(d, "data.train=[zero:train]"))[1],
    ),
    (
        FILE,
        "distill-garbage-shard",
        lambda d: (d.dataset("junk", shard=b"junk" * 300), distill(d, "data.train=[junk:train]"))[1],
    ),
    (
        FILE,
        "distill-nshards-not-integer",
        lambda d: (d.dataset("ns", nshards="two"), distill(d, "data.train=[ns:train]"))[1],
    ),
    (
        FILE,
        "distill-config-invalid-yaml",
        lambda d: ["distill", "--config", _write(d.tmp / "bad.yaml", b"a: [1,\n")],
    ),
    (
        FILE,
        "distill-config-not-a-mapping",
        lambda d: ["distill", "--config", _write(d.tmp / "bad.yaml", b"- 1\n- 2\n")],
    ),
    (FILE, "distill-truncated-cache", lambda d: distill(d, f"teacher.cache={d.damaged_cache()}")),
    (FILE, "distill-resume-without-checkpoint", lambda d: distill(d, "--resume")),
    (
        TEXT,
        "distill-config-latin1",
        lambda d: [
            "distill",
            "--config",
            _write(d.tmp / "l1.yaml", "steps: 2 # caf\xe9\n".encode("latin-1")),
        ],
    ),
    # --- eval
    (
        UNKNOWN,
        "eval-model-prefix",
        lambda d: ["eval", "--model", "nope:x", "--dataset", "toy", "--data-root", str(d.root)],
    ),
    (UNKNOWN, "eval-dataset", lambda d: ev(d, dataset="tyo")),
    (UNKNOWN, "eval-split", lambda d: ev(d, "--split", "val")),
    (UNKNOWN, "eval-task", lambda d: ev(d, "--task", "base2nvel")),
    (
        UNKNOWN,
        "eval-student-preset",
        lambda d: ["eval", "--model", "student:nosuch", "--dataset", "toy", "--data-root", str(d.root)],
    ),
    (
        PATH,
        "eval-data-root-missing",
        lambda d: [
            "eval",
            "--model",
            "student:vit-t-32",
            "--dataset",
            "toy",
            "--data-root",
            str(d.tmp / "no"),
        ],
    ),
    (PATH, "eval-output-is-dir", lambda d: (d.out.mkdir(), ev(d, "--output", str(d.out)))[1]),
    (PATH, "eval-output-under-file", lambda d: ev(d, "--output", f"{d.file}/rec.json")),
    (NUMBER, "eval-every-0", lambda d: ev(d, "--every", "0")),
    (NUMBER, "eval-batch-0", lambda d: ev(d, "--batch-size", "0")),
    (NUMBER, "eval-threads-0", lambda d: ev(d, "--threads", "0")),
    (
        FILE,
        "eval-classnames-empty",
        lambda d: (
            d.dataset("cls", kind="classification", classnames=b"\n"),
            ev(d, "--split", "train", dataset="cls"),
        )[1],
    ),
    (
        FILE,
        "eval-nshards-not-integer",
        lambda d: (
            d.dataset("ns", kind="classification", nshards="x"),
            ev(d, "--split", "train", dataset="ns"),
        )[1],
    ),
    (
        FILE,
        "eval-dataset-type-unknown",
        lambda d: (d.dataset("odd", kind="pictures"), ev(d, "--split", "train", dataset="odd"))[1],
    ),
    (
        TEXT,
        "eval-classnames-latin1",
        lambda d: (
            d.dataset("cls", kind="classification", classnames="caf\xe9\n".encode("latin-1")),
            ev(d, "--split", "train", dataset="cls"),
        )[1],
    ),
    # --- cache-teacher
    (UNKNOWN, "cache-dataset", lambda d: cache(d, data="cpas:train")),
    (
        UNKNOWN,
        "cache-teacher-prefix",
        lambda d: [
            "cache-teacher",
            "--teacher",
            "nope:x",
            "--data",
            "caps:train",
            "--data-root",
            str(d.root),
            "--out",
            str(d.out),
        ],
    ),
    (
        PATH,
        "cache-out-is-file",
        lambda d: [
            "cache-teacher",
            "--teacher",
            "fake:24",
            "--data",
            "caps:train",
            "--data-root",
            str(d.root),
            "--out",
            str(d.file),
        ],
    ),
    (PATH, "cache-data-glob-matches-nothing", lambda d: cache(d, data=str(d.tmp / "none" / "*.tar"))),
    (NUMBER, "cache-augmentations-0", lambda d: cache(d, "--augmentations", "0")),
    (NUMBER, "cache-batch-0", lambda d: cache(d, "--batch-size", "0")),
    (NUMBER, "cache-dclip-2-views", lambda d: cache(d, "--dclip", "--augmentations", "2")),
    (
        FILE,
        "cache-dclip-on-classification",
        lambda d: cache(d, "--dclip", "--augmentations", "1", data="toy:test"),
    ),
    (
        FILE,
        "cache-nshards-not-integer",
        lambda d: (d.dataset("ns", nshards="1.5"), cache(d, data="ns:train"))[1],
    ),
    # --- export
    (PATH, "export-checkpoint-missing", lambda d: export(d, str(d.tmp / "none.pt"))),
    (
        PATH,
        "export-out-is-file",
        lambda d: ["export", "--checkpoint", "student:vit-t-32", "--format", "onnx", "--out", str(d.file)],
    ),
    (UNKNOWN, "export-spec-prefix", lambda d: export(d, "nope:x")),
    (
        FILE,
        "export-checkpoint-not-a-checkpoint",
        lambda d: export(d, _write(d.tmp / "junk.pt", b"not a pickle at all")),
    ),
    (FILE, "export-checkpoint-empty", lambda d: export(d, _write(d.tmp / "empty.pt", b""))),
    # --- bench-latency
    (NUMBER, "bench-repeats-0", lambda d: bench("--repeats", "0")),
    (NUMBER, "bench-repeats-large-0", lambda d: bench("--repeats-large", "0")),
    (NUMBER, "bench-batch-0", lambda d: bench("--batch-sizes", "0")),
    (NUMBER, "bench-threads-0", lambda d: bench("--threads", "0")),
    (NUMBER, "bench-warmup-negative", lambda d: bench("--warmup", "-1")),
    (PATH, "bench-json-is-dir", lambda d: bench("--json", str(d.tmp))),
    (
        PATH,
        "bench-results-missing",
        lambda d: bench("--results", str(d.tmp / "none.json"), "--plot", str(d.out / "p.png")),
    ),
    (UNKNOWN, "bench-model-prefix", lambda d: ["bench-latency", "--model", "nope:x", "--no-onnx"]),
    # --- balance / cluster
    (
        NUMBER,
        "balance-nan-embeddings",
        lambda d: [
            "balance",
            "--embeddings",
            str(d.embeddings(nan=True)),
            "--beta",
            "0.3",
            "--out",
            str(d.out),
            "--no-plots",
        ],
    ),
    (
        NUMBER,
        "balance-beta-out-of-range",
        lambda d: [
            "balance",
            "--embeddings",
            str(d.embeddings(nan=False)),
            "--beta",
            "5",
            "--out",
            str(d.out),
        ],
    ),
    (
        NUMBER,
        "balance-recall-0",
        lambda d: [
            "balance",
            "--embeddings",
            str(d.embeddings(nan=False)),
            "--beta",
            "0.3",
            "--recall",
            "0",
            "--out",
            str(d.out),
        ],
    ),
    (
        NUMBER,
        "cluster-nan-embeddings",
        lambda d: [
            "cluster",
            "--embeddings",
            str(d.embeddings(nan=True)),
            "--k",
            "2",
            "--out",
            str(d.out),
            "--no-plots",
        ],
    ),
    (
        NUMBER,
        "cluster-k-0",
        lambda d: [
            "cluster",
            "--embeddings",
            str(d.embeddings(nan=False)),
            "--k",
            "0",
            "--out",
            str(d.out),
            "--no-plots",
        ],
    ),
    (
        PATH,
        "balance-embeddings-missing",
        lambda d: ["balance", "--embeddings", str(d.tmp / "none.npz"), "--beta", "0.3", "--out", str(d.out)],
    ),
    (
        FILE,
        "balance-embeddings-corrupt",
        lambda d: [
            "balance",
            "--embeddings",
            _write(d.tmp / "bad.npz", b"not an npz"),
            "--beta",
            "0.3",
            "--out",
            str(d.out),
        ],
    ),
    # --- teacher build
    (
        NUMBER,
        "teacher-build-epochs-0",
        lambda d: [
            "teacher",
            "build",
            "--data",
            "caps",
            "--data-root",
            str(d.root),
            "--out",
            str(d.out),
            "--epochs",
            "0",
        ],
    ),
    (
        UNKNOWN,
        "teacher-build-dataset",
        lambda d: ["teacher", "build", "--data", "cpas", "--data-root", str(d.root), "--out", str(d.out)],
    ),
    (
        FILE,
        "teacher-build-classification-set",
        lambda d: ["teacher", "build", "--data", "toy", "--data-root", str(d.root), "--out", str(d.out)],
    ),
    (
        PATH,
        "teacher-build-out-is-file",
        lambda d: [
            "teacher",
            "build",
            "--data",
            "caps",
            "--data-root",
            str(d.root),
            "--out",
            str(d.file),
            "--epochs",
            "1",
        ],
    ),
    # --- losses / compare
    (
        TEXT,
        "losses-check-latin1",
        lambda d: [
            "losses",
            "--check",
            _write(d.tmp / "l1.yaml", "losses: {clip: 1.0} # caf\xe9\n".encode("latin-1")),
        ],
    ),
    (PATH, "losses-check-dir", lambda d: ["losses", "--check", str(d.tmp)]),
    (
        UNKNOWN,
        "losses-check-unknown-term",
        lambda d: ["losses", "--check", _write(d.tmp / "r.yaml", b"losses: {crdd: 1}\n")],
    ),
    (FILE, "compare-not-json", lambda d: ["compare", _write(d.tmp / "r.json", b"{nope")]),
    (
        TEXT,
        "compare-latin1",
        lambda d: ["compare", _write(d.tmp / "r.json", '{"a": "caf\xe9"}'.encode("latin-1"))],
    ),
    # --- data get / list (refused before the Hub is asked)
    (UNKNOWN, "data-get-dataset", lambda d: ["data", "get", "cifar1O", "--root", str(d.out)]),
    (
        UNKNOWN,
        "data-get-split",
        lambda d: ["data", "get", "cifar10", "--splits", "test,tr*in", "--root", str(d.out)],
    ),
    (PATH, "data-get-root-is-file", lambda d: ["data", "get", "cifar10", "--root", str(d.file)]),
    (PATH, "data-list-root-missing", lambda d: ["data", "list", "--root", str(d.tmp / "none")]),
    # --- demo (refused before the teacher is built)
    (UNKNOWN, "demo-student-preset", lambda d: demo(d, "--student", "student:nosuch")),
    (UNKNOWN, "demo-student-not-a-preset", lambda d: demo(d, "--student", "openclip:ViT-B-32")),
    (NUMBER, "demo-epochs-negative", lambda d: demo(d, "--epochs", "-1")),
    # --- students
    (
        PATH,
        "students-check-weights-missing",
        lambda d: ["students", "--check", "--weights", str(d.tmp / "none.pth")],
    ),
]


def _listing(path: Path) -> list[str] | bytes | None:
    if path.is_file():
        return path.read_bytes()
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.is_dir() else None


@pytest.mark.parametrize(("kind", "argv"), [(k, b) for k, _, b in CASES], ids=[i for _, i, _ in CASES])
def test_bad_input_gives_one_line_and_exit_2(data, kind, argv, capsys, caplog):
    args = argv(data)
    watched = [data.out, data.file, data.tmp / "out"]
    before = [_listing(p) for p in watched]
    capsys.readouterr()
    with deadline(60, "the command"), caplog.at_level(logging.WARNING):
        rc = main(args)
    err = capsys.readouterr().err.strip()
    assert rc == 2, f"{args}: exit {rc}, stderr {err[-1500:]}"
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err[-1500:]
    assert err.startswith("clipdistill ") and ": error: " in err, err
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not warnings, f"more than one line on stderr: {warnings}"
    assert [_listing(p) for p in watched] == before, "the refused command wrote under its output path"


def test_the_table_covers_every_class_and_command():
    assert set(Counter(kind for kind, _, _ in CASES)) == {UNKNOWN, PATH, NUMBER, FILE, TEXT}
    commands = {i.split("-")[0] for _, i, _ in CASES}
    assert commands == {
        "distill",
        "eval",
        "cache",
        "export",
        "bench",
        "balance",
        "cluster",
        "teacher",
        "losses",
        "compare",
        "data",
        "demo",
        "students",
    }
