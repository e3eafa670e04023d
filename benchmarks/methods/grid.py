"""The grid as data: methods and their recipes, our variants, tracks, student settings, evaluation sets and
the budget every cell shares (spec section 11). Nothing here runs anything."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


class Method(NamedTuple):
    """A row of the grid: its loss recipe, whether it is a published method, and what it is.

    `source` is a recipe file in configs/, an inline `losses` section, or (our variants) the options that
    change `configs/relational.yaml` (`clip` there is the task loss's weight, the others the relational
    term's options; see `runner.recipe`)."""

    source: str | dict
    published: bool
    about: str


# The default grid: every published method, the no-teacher baseline and ours. DCLIP's meta-teacher head is
# trained once per track on the teacher's tokens and its enriched embeddings stored beside the track's
# teacher cache (models/dclip_teacher.py), so its cells train from the cache like the others.
GRID_METHODS: dict[str, Method] = {
    "no_teacher": Method("baseline.yaml", False, "CLIP loss only, no distillation"),
    "hinton_kd": Method({"clip": 1.0, "kd": 1.0}, True, "CLIP loss + Hinton KD on the CLIP logits"),
    "clip_kd": Method("clip_kd.yaml", True, "CLIP-KD best: CRD + ICL + FD"),
    "clip_kd_crd": Method("clip_kd_crd.yaml", True, "CLIP-KD: CRD"),
    "clip_kd_fd": Method("clip_kd_fd.yaml", True, "CLIP-KD: FD"),
    "clip_kd_mfd": Method("clip_kd_mfd.yaml", True, "CLIP-KD: MFD"),
    "clip_kd_gd": Method("clip_kd_gd.yaml", True, "CLIP-KD: GD"),
    "clip_kd_icl": Method("clip_kd_icl.yaml", True, "CLIP-KD: ICL"),
    "clip_kd_afd": Method("clip_kd_afd.yaml", True, "CLIP-KD: AFD"),
    "tinyclip": Method("tinyclip.yaml", True, "TinyCLIP affinity mimicking"),
    "clip_cid": Method("clip_cid.yaml", True, "CLIP-CID: semantic balance + cluster + instance"),
    "comkd": Method("comkd.yaml", True, "ComKD-CLIP: IFAlign + EduAttention + KL"),
    "dclip": Method("dclip.yaml", True, "DCLIP"),
    "mobileclip": Method("mobileclip.yaml", True, "MobileCLIP-style KD from the teacher cache"),
    "relational": Method("relational.yaml", False, "ours: relational (cross- and intra-modal, memory bank)"),
}
_VARIANT = "ours, a variant of configs/relational.yaml"
# Iteration on our method (issue 6): option variants of `configs/relational.yaml`, run at seed 0 and
# ranked on Flickr8k dev retrieval only; the best one (if not the default) then runs the other seeds.
VARIANTS: dict[str, Method] = {
    "relational_nobank": Method({"bank_size": 0}, False, _VARIANT),
    "relational_cross": Method({"relations": ["i2t", "t2i"]}, False, _VARIANT),
    "relational_intra1": Method({"w_i2i": 1.0}, False, _VARIANT),
    "relational_w2": Method({"weight": 2.0}, False, _VARIANT),
    "relational_tau10": Method({"tau_intra_t": 0.1, "tau_intra_s": 0.1}, False, _VARIANT),
    # round 2: the two best single changes of round 1 (by dev) together
    "relational_tau10_w2": Method({"tau_intra_t": 0.1, "tau_intra_s": 0.1, "weight": 2.0}, False, _VARIANT),
    # round 3, setting `both` only (t2t is zero there in `image`: the student's text tower is the teacher's):
    # the text-text relation at the weight of the others, for the student's own text tower and the corpus texts
    "relational_tau10_t2t1": Method({"tau_intra_t": 0.1, "tau_intra_s": 0.1, "w_t2t": 1.0}, False, _VARIANT),
    # round 4 (setting `image`, track A): one change each to relational_tau10 along the axes the issue names that
    # rounds 1-2 left open: bank size (1,024; 8,192 = every sample a 64 x 128 run sees), a softer intra-modal
    # and a softer cross-modal temperature, half the weight, and no task loss at all (`clip` is the CLIP task
    # loss's weight; AdamW is scale-invariant, so a task weight of 0.5 would repeat `weight: 2`)
    "relational_tau10_bank1k": Method(
        {"tau_intra_t": 0.1, "tau_intra_s": 0.1, "bank_size": 1024}, False, _VARIANT
    ),
    "relational_tau10_bank8k": Method(
        {"tau_intra_t": 0.1, "tau_intra_s": 0.1, "bank_size": 8192}, False, _VARIANT
    ),
    "relational_tau20": Method({"tau_intra_t": 0.2, "tau_intra_s": 0.2}, False, _VARIANT),
    "relational_tau10_x10": Method(
        {"tau_intra_t": 0.1, "tau_intra_s": 0.1, "tau_cross_t": 0.1, "tau_cross_s": 0.1}, False, _VARIANT
    ),
    "relational_tau10_w05": Method({"tau_intra_t": 0.1, "tau_intra_s": 0.1, "weight": 0.5}, False, _VARIANT),
    "relational_tau10_notask": Method({"tau_intra_t": 0.1, "tau_intra_s": 0.1, "clip": 0.0}, False, _VARIANT),
}
# every method a cell may name, in table order: the grid, then our variants
METHODS: dict[str, Method] = GRID_METHODS | VARIANTS
GRID = list(GRID_METHODS)
# track -> data: image-caption sets, caption-less sets drawn beside every batch (mixed batches), class filter
TRACKS: dict[str, dict] = {
    "A": {"train": ["flickr8k:train"]},
    "B": {"train": ["flickr8k:train"], "unpaired": ["cifar10:train"]},
    "b2n": {"train": ["flickr8k:train"], "unpaired": ["cifar10:train"], "filter": "classes=base"},
}
# caption-less images per step in tracks B and b2n (beside the budget's batch of image-caption pairs)
UNPAIRED_BATCH = 64
# setting `both`: generic unpaired texts per step for the student's text tower (WordNet 3.0 glosses, Debian's
# wordnet-base: `apt-get install wordnet-base`), never a list built from evaluation class names
TEXT_CORPUS = ["wordnet"]
TEXT_BATCH = 64
SETTINGS = {"image": "teacher", "both": "own"}
# dataset -> (split, every n-th sample, task metrics kept)
EVAL = {
    "cifar10": ("test", 5),
    "imagenet-1k-sample": ("test", 1),
    "dtd-10": ("test", 1),
    "mnist": ("test", 10),
    "flickr8k": ("test", 1),
    "flickr8k-dev": ("dev", 1),
}
# base-to-novel on CIFAR-10 (issue 9): base = first 5 classes in class order, each half against its own prompts
B2N = {"dataset": "cifar10", "split": "test", "every": 5}
B2N_KEY = "cifar10-b2n"
ZEROSHOT = [
    ("cifar10", "acc1"),
    ("imagenet-1k-sample", "acc1"),
    ("imagenet-1k-sample", "acc5"),
    ("dtd-10", "acc1"),
    ("mnist", "acc1"),
]
RETRIEVAL = [
    ("flickr8k", "text_retrieval_recall@1"),
    ("flickr8k", "text_retrieval_recall@5"),
    ("flickr8k", "text_retrieval_recall@10"),
    ("flickr8k", "image_retrieval_recall@1"),
    ("flickr8k", "image_retrieval_recall@5"),
    ("flickr8k", "image_retrieval_recall@10"),
]
# CIFAR-10 linear probe of the frozen image embeddings (issue 9): fitted on every 4th train image (5,000),
# tested on every 5th test image (2,000, the zero-shot subset); a pass of its own (the `probe` subcommand).
PROBE = {"dataset": "cifar10", "split": "test", "every": 5, "train_split": "train", "train_every": 4}
PROBE_KEY = "cifar10-linear-probe"
# the founding study (issue 9): TinyCLIP-style vs CLIP-KD's best vs ours, same teacher and budget
FOUNDING = ["tinyclip", "clip_kd", "relational"]
# semantic balance radius and k-means clusters for ~6k images (spec 4). beta 0.6 (cosine > 0.82) joins only
# near-duplicates: it keeps 98.3% of Flickr8k train (benchmarks/results/balance_shared.md); below 0.5 nothing is joined.
CLIP_CID = {"beta": 0.6, "k": 100}
# the teacher of the cells finished before cells recorded their teacher's fingerprint (track A)
LEGACY_TEACHER = "6aa835a6155ee8f2"
# a recorded cell re-run with the rebuilt teacher must reproduce every figure within this many points
EQUIV_TOL = 0.1


@dataclass(frozen=True)
class Budget:
    """What every cell shares (spec section 11)."""

    student: str = "student:vit-t-32"
    steps: int = 64
    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 10
    threads: int = 2


def budget_name(budget: Budget) -> str:
    return f"{budget.student.removeprefix('student:')}-{budget.steps}"


@dataclass(frozen=True)
class Cell:
    method: str
    track: str
    setting: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}-{self.track}-{self.setting}-s{self.seed}"


def variant_options(method: str) -> dict:
    """The options our variant `method` changes in configs/relational.yaml ({} for any other method)."""
    return VARIANTS[method].source if method in VARIANTS else {}
