"""Fetch CLIP_benchmark webdataset sets from the Hugging Face Hub (`clipdistill data get|list`, issue 27).

CLIP_benchmark publishes its sets as dataset repos `clip-benchmark/wds_<name>` in the layout that
`data.shards` reads: top-level `classnames.txt`, `zeroshot_classification_templates.txt`,
`dataset_type.txt`, and per split `nshards.txt` plus shards `0.tar` ... `N-1.tar`.

`DATASETS` is the one name table: each entry maps the local folder name the toolkit uses to its
CLIP_benchmark name, both ways (`resolve` accepts either). Three local names stand for *subsets* of
the Hub sets, made where the full sets could not be copied (see the shared data README):
`imagenet-1k-sample` (one image per class) <- `imagenet1k` (the 50,000-image validation set),
`dtd-10` (10 of 47 classes, 100 images) <- `dtd` (the full test split), `cifar100-916` (first 916
test images) <- `cifar100` (all 10,000). `data get` installs the full Hub set under the local name,
so the evaluation code finds it, and records the source in `source.json`; numbers on it are not
comparable with the README's, which are on the subsets.

Fetching is resumable and never leaves a half dataset under its final name: files go to
`ROOT/.partial-NAME/download` (reused, and resumed file by file, by the next call), the finished
folder is assembled in `ROOT/.partial-NAME/assembled` and moved into place with `os.replace`; when
`ROOT/NAME` exists already, only the new splits move in, one `os.replace` each.

Split checking (`verify_split`, against `nshards.txt`) and the carving of Flickr8k's missing `dev`
split out of `train` (`carve_dev_split`, recorded in `dev_split.json`) live in `data.splits`.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from clipdistill.data.splits import (
    carve_dev_split,
    count_samples,
    is_complete,
    shard_files,
    verify_split,
)
from clipdistill.errors import UserError, unknown_name
from clipdistill.paths import fetch_root, find_data_root

log = logging.getLogger(__name__)

HUB_ORG = "clip-benchmark"
TOP_FILES = ("classnames.txt", "zeroshot_classification_templates.txt", "dataset_type.txt")
# Seconds to wait for the Hub's first answer: offline, `data get` must fail fast, not hang.
CONNECT_TIMEOUT = 5.0


@dataclass(frozen=True)
class HubDataset:
    """One fetchable set: the toolkit's local name, the CLIP_benchmark name, default splits."""

    local: str
    hub: str
    kind: str  # "classification" | "retrieval"
    splits: tuple[str, ...]  # fetched when --splits is not given: the splits the toolkit uses
    note: str = ""
    dev_size: int = 1000  # samples carved out of train when the Hub has no dev split

    @property
    def repo_id(self) -> str:
        return f"{HUB_ORG}/wds_{self.hub}"


# fmt: off
_TABLE = (  # local name, CLIP_benchmark name, type, default splits, how the local set relates to the Hub's
    HubDataset("flickr8k", "flickr8k", "retrieval", ("train", "dev", "test"),
               "no dev split on the Hub: dev is a seeded 1,000-sample draw from train"),
    HubDataset("flickr30k", "flickr30k", "retrieval", ("test",)),
    HubDataset("mscoco_captions", "mscoco_captions", "retrieval", ("test",)),
    HubDataset("cifar10", "cifar10", "classification", ("test", "train"),
               "the shared copy has the first 20,000 of the 50,000 train images"),
    HubDataset("cifar100-916", "cifar100", "classification", ("test",),
               "the shared copy is the first 916 test images; the Hub set has all 10,000"),
    HubDataset("mnist", "mnist", "classification", ("test",)),
    HubDataset("imagenet-1k-sample", "imagenet1k", "classification", ("test",),
               "the shared copy is one image per class; the Hub set is the 50,000-image validation set"),
    HubDataset("dtd-10", "dtd", "classification", ("test",),
               "the shared copy is 100 images of 10 classes; the Hub set is the full 47-class test split"),
)
# fmt: on
DATASETS: dict[str, HubDataset] = {d.local: d for d in _TABLE}
_BY_HUB = {d.hub: d for d in DATASETS.values()}


def resolve(name: str) -> HubDataset:
    """The table entry for a local name (`imagenet-1k-sample`) or a CLIP_benchmark name (`imagenet1k`)."""
    entry = DATASETS.get(name) or _BY_HUB.get(name.removeprefix("wds_"))
    if entry is None:
        raise unknown_name("dataset to fetch", name, sorted({*DATASETS, *_BY_HUB}))
    return entry


@dataclass
class FetchResult:
    """What `get_dataset` did for one set."""

    name: str
    repo_id: str
    folder: Path
    added: list[str] = field(default_factory=list)  # splits moved into place by this call
    kept: list[str] = field(default_factory=list)  # requested splits that were local already
    dev_split: dict | None = None  # the dev_split.json record when dev was carved out of train


@dataclass
class LocalDataset:
    """A dataset folder under a data root, for `clipdistill data list`."""

    name: str
    kind: str
    splits: dict[str, tuple[int, int]]  # split -> (shards, samples)
    source: str = ""  # the Hub repo it was fetched from, when recorded


# -- the one function that touches the network (tests replace it) ---------------------------------


def _download(repo_id: str, patterns: list[str], local_dir: Path) -> list[str]:
    """Download the files of dataset repo `repo_id` matching `patterns` into `local_dir`.

    Returns the matching repo paths. Files finished by an earlier call are kept and partial ones
    resumed (huggingface_hub's local-dir metadata). Honours $HF_ENDPOINT at call time.
    """
    from huggingface_hub import HfApi, hf_hub_download
    from tqdm import tqdm

    for name in ("httpx", "httpx2"):  # they log every request at INFO: one line per shard buries the bar
        if logging.getLogger(name).level == logging.NOTSET:
            logging.getLogger(name).setLevel(logging.WARNING)
    endpoint = os.environ.get("HF_ENDPOINT") or None
    # dataset_info makes one request without retries, so an unreachable Hub fails within the timeout.
    info = HfApi(endpoint=endpoint).dataset_info(repo_id, timeout=CONNECT_TIMEOUT)
    files = sorted(s.rfilename for s in info.siblings or [] if _matches(s.rfilename, patterns))
    for path in tqdm(files, desc=repo_id, unit="file", disable=None):
        hf_hub_download(
            repo_id,
            path,
            repo_type="dataset",
            revision=info.sha,
            local_dir=local_dir,
            endpoint=endpoint,
            etag_timeout=CONNECT_TIMEOUT,
        )
    return files


def _matches(path: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


def _patterns(splits: Iterable[str]) -> list[str]:
    return [*TOP_FILES, *(f"{s}/*" for s in splits)]


def _fetch(repo_id: str, patterns: list[str], local_dir: Path) -> list[str]:
    """`_download` with the Hub's failures turned into one-line UserErrors."""
    try:
        return _download(repo_id, patterns, local_dir)
    except Exception as err:  # huggingface_hub/httpx/requests raise many types; classified below
        mapped = _hub_error(err, repo_id)
        if mapped is err:
            raise
        raise mapped from err


def _hub_error(err: Exception, repo_id: str) -> Exception:
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    page = f"https://huggingface.co/datasets/{repo_id}"
    if isinstance(err, RepositoryNotFoundError):
        return UserError(
            f"no dataset repo {repo_id} on the Hugging Face Hub ({page}); `clipdistill data list` shows the names"
        )
    if isinstance(err, OfflineModeIsEnabled):
        reason = "HF_HUB_OFFLINE is set"
    elif isinstance(err, HfHubHTTPError):
        return UserError(f"the Hugging Face Hub refused {repo_id}: {_one_line(err)}")
    elif isinstance(err, LocalEntryNotFoundError) or _is_connection_error(err):
        reason = _one_line(err) or type(err).__name__
    else:
        return err
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    return UserError(
        f"cannot reach the Hugging Face Hub ({endpoint}) to fetch {repo_id} ({reason}); without network, "
        "pass --data-root DIR (or set CLIPDISTILL_DATA) to a local copy of the datasets"
    )


def _is_connection_error(err: Exception) -> bool:
    """Connection refused, DNS failure or timeout."""
    if isinstance(err, ConnectionError | TimeoutError):
        return True
    # httpx (huggingface_hub >= 1.0) and requests errors, matched by name so neither is imported here.
    names = {c.__name__ for c in type(err).__mro__}
    return bool(names & {"TransportError", "ConnectError", "ConnectTimeout", "Timeout", "TimeoutException"})


def _one_line(err: Exception) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 200 else text[:197] + "..."


# -- fetching ------------------------------------------------------------------------------------


def get_dataset(
    name: str,
    splits: Iterable[str] | None = None,
    root: str | Path | None = None,
    *,
    dev_size: int | None = None,
) -> FetchResult:
    """Fetch `name` (local or CLIP_benchmark name) into `root` (default: `paths.fetch_root`).

    splits: default the entry's `splits`. Splits already under `ROOT/<local name>` are kept, not
    fetched again. Raises UserError (one line) when the Hub is unreachable, a split is absent from
    it, or a split's shard count disagrees with its `nshards.txt`.
    """
    entry = resolve(name)
    base = fetch_root(root)
    base.mkdir(parents=True, exist_ok=True)
    final = base / entry.local
    wanted = list(dict.fromkeys(splits or entry.splits))
    result = FetchResult(entry.local, entry.repo_id, final)
    result.kept = [s for s in wanted if is_complete(final / s)]
    todo = [s for s in wanted if s not in result.kept]
    if not todo:
        return result

    staging = base / f".partial-{entry.local}"
    download = staging / "download"
    files = _fetch(entry.repo_id, _patterns(todo), download)
    on_hub = {f.split("/", 1)[0] for f in files if "/" in f}
    carve = "dev" in todo and "dev" not in on_hub
    if carve and "train" not in on_hub:
        files += _fetch(entry.repo_id, _patterns(["train"]), download)
        on_hub = {f.split("/", 1)[0] for f in files if "/" in f}
    absent = [s for s in todo if s not in on_hub and not (carve and s == "dev")]
    if absent or (carve and "train" not in on_hub):
        missing = absent or ["train (to carve dev from)"]
        raise UserError(
            f"{entry.repo_id} has no split {', '.join(missing)} on the Hub; pass --splits with splits it has "
            f"(https://huggingface.co/datasets/{entry.repo_id}/tree/main)"
        )
    for split in sorted(on_hub):
        verify_split(download / split, entry.repo_id)

    assembled = staging / "assembled"
    if assembled.exists():
        shutil.rmtree(assembled)  # an interrupted assembly: rebuilt from the download
    assembled.mkdir(parents=True)
    if carve:
        result.dev_split = carve_dev_split(download / "train", assembled, dev_size or entry.dev_size)
    for split in todo:
        if not (assembled / split).exists():
            os.replace(download / split, assembled / split)
    for top in TOP_FILES:
        if (download / top).exists():
            os.replace(download / top, assembled / top)
    if not (assembled / "dataset_type.txt").exists():
        (assembled / "dataset_type.txt").write_text(entry.kind)  # CLIP_benchmark's default is classification
    _write_source(assembled, entry, final)

    result.added = _install(assembled, final, replace={"train"} if carve else set())
    shutil.rmtree(staging)
    log.info("%s: %s in %s", entry.local, ", ".join(result.added), final)
    return result


def _write_source(assembled: Path, entry: HubDataset, final: Path) -> None:
    path = final / "source.json"
    record = (
        json.loads(path.read_text())
        if path.exists()
        else {"repo": entry.repo_id, "hub_name": entry.hub, "splits": []}
    )
    new = sorted(p.name for p in assembled.iterdir() if p.is_dir())
    record["splits"] = sorted({*record["splits"], *new})
    record["note"] = entry.note
    (assembled / "source.json").write_text(json.dumps(record, indent=2) + "\n")


def _install(assembled: Path, final: Path, replace: set[str]) -> list[str]:
    """Move the assembled folder to `final` (one os.replace), or, when `final` exists, each new split."""
    splits = sorted(p.name for p in assembled.iterdir() if p.is_dir())
    if not final.exists():
        os.replace(assembled, final)
        return splits
    added = []
    for split in splits:
        target = final / split
        if target.exists() and split not in replace and is_complete(target):
            continue
        if target.exists():
            old = final / f".old-{split}-{os.getpid()}"
            os.replace(target, old)
            os.replace(assembled / split, target)
            shutil.rmtree(old)
        else:
            os.replace(assembled / split, target)
        added.append(split)
    for path in assembled.iterdir():
        if path.is_file() and (
            path.name in ("source.json", "dev_split.json") or not (final / path.name).exists()
        ):
            os.replace(path, final / path.name)
    return added


# -- what is local -------------------------------------------------------------------------------


def local_datasets(root: str | Path | None = None) -> tuple[Path, list[LocalDataset]]:
    """The data root (`paths.find_data_root`) and the datasets in it, with shard and sample counts."""
    base = find_data_root(root)
    found = []
    for folder in sorted(base.iterdir()) if base.is_dir() else []:
        if folder.name.startswith(".") or not (folder / "dataset_type.txt").exists():
            continue
        splits = {
            s.name: (len(shard_files(s)), count_samples(s))
            for s in sorted(folder.iterdir())
            if s.is_dir() and shard_files(s)
        }
        source = (
            json.loads((folder / "source.json").read_text()).get("repo", "")
            if (folder / "source.json").exists()
            else ""
        )
        found.append(
            LocalDataset(folder.name, (folder / "dataset_type.txt").read_text().strip(), splits, source)
        )
    return base, found


# -- datasets a command needs --------------------------------------------------------------------


def missing_splits(needs: dict[str, list[str]], root: str | Path | None = None) -> dict[str, list[str]]:
    """The splits of `needs` (dataset -> splits) not complete under the data root."""
    base = find_data_root(root)
    missing = {}
    for name, splits in needs.items():
        absent = [s for s in splits if not is_complete(base / name / s)]
        if absent:
            missing[name] = absent
    return missing


def fetch_command(missing: dict[str, list[str]], root: Path) -> str:
    """The `clipdistill data get` line that fetches `missing` into `root`."""
    cmd = "clipdistill data get " + " ".join(missing)
    default_splits = all(set(s) <= set(resolve(n).splits) for n, s in missing.items())
    if not default_splits:
        cmd += " --splits " + ",".join(dict.fromkeys(s for splits in missing.values() for s in splits))
    if root != fetch_root():
        cmd += f" --root {root}"
    return cmd


def require(
    needs: dict[str, list[str]],
    root: str | Path | None = None,
    *,
    download: bool = False,
    purpose: str = "this command",
) -> list[FetchResult]:
    """Check that `needs` are local before any work; fetch them (download=True) or raise one line naming
    the `clipdistill data get` command."""
    base = find_data_root(root)
    missing = missing_splits(needs, base)
    if not missing:
        return []
    if download:
        return [get_dataset(name, splits, base) for name, splits in missing.items()]
    what = "; ".join(f"{n} ({', '.join(s)})" for n, s in missing.items())
    raise UserError(
        f"{purpose} needs datasets missing under {base}: {what}; fetch them with "
        f"`{fetch_command(missing, base)}`, or pass --data-root DIR pointing at a local copy"
    )
