"""The distillation engine (issue 7; docs/methods.md sections 0, 7 and 9): `train(cfg)` turns a teacher (online or
cached), a student, shards and a loss recipe into a trained student, on one process or under torchrun.

One optimisation step:
1. k = `optim.accum_steps` micro-batches per rank arrive from the data pipeline (data/loader.py);
   the teacher's outputs come from the cache or from the online teacher (no grad, once per micro-batch).
2. `accumulate.cached_backward` embeds the student, computes the Distiller's full-batch loss (gathered
   over ranks, docs/methods.md section 0) on the embeddings, and backpropagates into the student micro-batch by
   micro-batch (GradCache). A non-finite loss stops the run here, before any weight changes, naming
   the term and the step; the last checkpoint stays the last good one.
3. Gradient scaling for DDP: each rank's loss is the full-batch loss but its per-row gradients reach
   only the local rows, and DDP averages over ranks, so per-row gradients are multiplied by the world
   size while the scale's and the Distiller's (which see every row) are not; the Distiller's are
   averaged by hand (identical on every rank). The result equals the single-process gradient of the
   concatenated batch.
4. Gradient clipping, AdamW step, warmup + cosine schedule, then `Distiller.update` (memory banks).

Mixed batches: with `data.unpaired` every step also draws as many micro-batches of caption-less images
(their own stream, data position and teacher cache; the class filter applies to them too), which go
through the student's image tower in the same forward as the pairs and reach the terms that use them
(`Term.unpaired_loss`); with `data.texts` the step's corpus texts (a pure function of seed, step, rank
and micro-batch) ride along the captions through the student's text tower, the teacher's text tower
embedding them online.

Rank 0 alone logs (TensorBoard: every term, lr per group, images/s, epoch, skipped samples, eval
metrics), shows the progress bar, writes checkpoints (atomic, with every rank's RNG and data position)
and the JSON summary.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from clipdistill.data.augment import AugmentPolicy, stable_seed
from clipdistill.data.loader import (
    DataState,
    StreamConfig,
    count_samples,
    make_loader,
    resolve_shards,
    worker_error_message,
)
from clipdistill.data.teacher_cache import TeacherCache, teacher_parts
from clipdistill.errors import UserError
from clipdistill.losses.base import Outputs
from clipdistill.losses.distiller import Distiller
from clipdistill.train import build
from clipdistill.train.accumulate import cached_backward
from clipdistill.train.checkpoint import (
    check_resumable,
    has_checkpoint,
    load_checkpoint,
    load_model_and_optimizer_state,
    merge_data_states,
    model_and_optimizer_state,
    own_streams,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from clipdistill.train.config import TrainConfig
from clipdistill.train.distributed import (
    DistInfo,
    all_gather_object,
    all_reduce_mean_,
    barrier,
    cleanup,
    clip_grad_norm,
    fsdp_ignored,
    init_distributed,
    no_sync_context,
    wrap,
)
from clipdistill.train.lock import RunLock, remove_stale_temp_files
from clipdistill.train.report import RunLogger, write_summary

log = logging.getLogger(__name__)


class NonFiniteLoss(UserError):
    """The loss (or gradient) became NaN or inf: the run stops, its last checkpoint is kept."""


class _Terminated(BaseException):
    """SIGTERM arrived (a BaseException, like KeyboardInterrupt, so no `except Exception` swallows it)."""


_SIGTERM_OWNER: list[int] = []  # the pid that installed `_on_sigterm` (forked DataLoader workers inherit it)


def _on_sigterm(signum, frame) -> None:
    if _SIGTERM_OWNER and os.getpid() != _SIGTERM_OWNER[-1]:  # a worker: die as SIGTERM would
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    raise _Terminated


def train(cfg: TrainConfig, *, resume: bool = False) -> dict:
    """Run (or resume) a distillation; returns the summary (also written to output_dir/summary.json).

    Rank 0 holds an exclusive lock on output_dir for the whole run (`train.lock.RunLock`), so a second
    run into the same folder is refused instead of silently mixing files with the first.
    """
    info = init_distributed(cfg.distributed.backend, cfg.device, cfg.distributed.timeout_s)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
        _SIGTERM_OWNER.append(os.getpid())
    try:
        with RunLock(cfg.output_dir) if info.is_main else nullcontext():
            return Run(cfg, info, resume=resume).run()
    except _Terminated:
        log.error("stopped by SIGTERM before the first step; nothing to resume, start the run again")
        raise SystemExit(128 + signal.SIGTERM) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
            _SIGTERM_OWNER.pop()
        torch.set_num_threads(threads)  # process-wide settings go back to what the caller had
        torch.use_deterministic_algorithms(deterministic)
        cleanup()


class Run:
    """One training run's state (models, optimiser, data, logging); `run()` does the loop."""

    def __init__(self, cfg: TrainConfig, info: DistInfo, *, resume: bool = False) -> None:
        self.cfg, self.info, self.out = cfg, info, Path(cfg.output_dir)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        if has_checkpoint(self.out) and not resume:
            raise UserError(f"'{self.out}' already holds a run; pass --resume to continue it or choose another output_dir")
        if info.is_main:  # we hold the output_dir lock: temporary files there belong to killed runs
            remove_stale_temp_files(self.out)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.device = info.device
        self.mode = cfg.teacher_mode
        self._build_data_sources()
        self._check_eval_datasets()
        self._build_models()
        self._check_streams()
        self._build_optimiser()
        self._plan_steps()
        self.step = 0
        self.last_logs: dict = {}
        self.finished = False
        self.data_state = DataState(streams=info.world * max(1, cfg.data.workers))
        self.data_state_u = DataState(streams=info.world * max(1, cfg.data.workers))
        self.last_eval: dict = {}
        if resume:
            self._restore(load_checkpoint(self.out))
            # a finished run: --resume has nothing to do and must not rewrite its summary
            self.finished = self.step >= self.total_steps and (self.out / "summary.json").is_file()
        self.loader = make_loader(self.stream_cfg, self.cache, self.data_state if resume else None)
        self.loader_u = None
        if self.stream_cfg_u is not None:
            self.loader_u = make_loader(self.stream_cfg_u, self.cache_u, self.data_state_u if resume else None)

    # --- setup --------------------------------------------------------------------------------------

    def _build_data_sources(self) -> None:
        cfg = self.cfg
        self.shards, kinds = [], []
        for spec in cfg.data.train:
            paths, kind = resolve_shards(spec, cfg.data.root)
            self.shards += paths
            kinds.append(kind)
        self.text = all(k != "classification" for k in kinds)
        self.cache = TeacherCache(cfg.teacher.cache) if cfg.teacher.cache else None
        self.keep_labels, self.keep_keys = build.data_filter(cfg.data)
        # mixed batches: caption-less images beside every batch (data.unpaired)
        self.unpaired_shards = [p for spec in cfg.data.unpaired for p in resolve_shards(spec, cfg.data.root)[0]]
        self.cache_u = None
        if self.unpaired_shards and cfg.teacher.unpaired_cache:
            self.cache_u = TeacherCache(cfg.teacher.unpaired_cache)

    def _build_models(self) -> None:
        from clipdistill.losses.config import parse_loss_config
        from clipdistill.models.factory import create_model

        cfg, dev = self.cfg, self.device
        self.teacher = create_model(cfg.teacher.spec).to(dev).eval() if cfg.teacher.spec else None
        if self.teacher is not None:
            self.teacher.requires_grad_(False)
            if self.mode == "online" and self.cache is None and getattr(self.teacher, "feature_cache", None) is not None:
                self.teacher.feature_cache = None  # fresh random views never repeat: storing them only costs disk
        teacher_dim = self.cache.info.embed_dim if self.cache is not None else getattr(self.teacher, "embed_dim", None)
        self.student = build.build_student(cfg.student.spec, cfg.student.text, self.teacher, teacher_dim or 0,
                                           **cfg.student.build_kwargs()).to(dev)
        self.own_text = cfg.student.text == "own"
        loss_cfg = parse_loss_config(cfg.losses)
        needs = _needs_of(loss_cfg)
        s_pooled = build.pooled_width(self.student, dev) if "student_pooled" in needs else None
        if "teacher_pooled" in needs:
            t_pooled = self.cache.info.pooled_dim if self.mode == "cached" else build.pooled_width(self.teacher, dev)
        else:
            t_pooled = None
        self.distiller = Distiller(loss_cfg, self.student.embed_dim, teacher_dim or self.student.embed_dim,
                                   student_pooled_dim=s_pooled, teacher_pooled_dim=t_pooled,
                                   unpaired_weight=cfg.data.unpaired_weight, text_weight=cfg.data.text_weight).to(dev)
        self.needs = self.distiller.needs
        self.distiller.check(self.mode, self._available())
        if self.cache is not None:
            self.cache.check(
                shards=self.shards,
                teacher=teacher_parts(self.teacher) if self.teacher is not None else None,
                policy=cfg.data.policy(),
                pooled="teacher_pooled" in self.needs and self.mode == "cached",
                text=self.text,
            )
        extras = None
        dclip = self.distiller.terms["dclip"] if "dclip" in self.distiller.terms else None
        if dclip is not None and self.mode == "cached" and dclip.head is None:
            from clipdistill.models.dclip_teacher import EXTRAS, has_dclip_extras

            if not has_dclip_extras(self.cache):
                raise UserError(
                    f"term 'dclip' trains from a teacher cache only with the meta-teacher's enriched embeddings; build them with "
                    f"`clipdistill cache-teacher --teacher SPEC --data ... --augmentations 1 --dclip --out {self.cache.root}`, "
                    "or run the teacher online with losses.dclip.head"
                )
            extras = dict(EXTRAS)
        if self.cache_u is not None:
            self.cache_u.check(
                shards=self.unpaired_shards,
                teacher=teacher_parts(self.teacher) if self.teacher is not None else None,
                policy=cfg.data.policy(),
                pooled="teacher_pooled" in self.needs,
            )
            if self.cache is not None and self.cache_u.info.parts.get("weights") != self.cache.info.parts.get("weights"):
                raise UserError(f"teacher.unpaired_cache '{self.cache_u.root}' and teacher.cache '{self.cache.root}' were "
                                "built from different teachers; build both with the same --teacher")
        if not self.text and self.own_text and "clip" in self.distiller.terms:
            raise UserError("the training data has no captions (classification shards): drop losses.clip or train on image-caption data")
        mfd = self.distiller.terms["mfd"] if "mfd" in self.distiller.terms else None
        self.forward_module = build.StudentForward(
            self.student,
            own_text=self.own_text and self.text,
            pooled="student_pooled" in self.needs,
            tokens="image_tokens" in self.needs,
            mask_ratio=float(mfd.opts["mask_ratio"]) if mfd is not None else None,
        )
        self.fsdp = bool(cfg.distributed.fsdp and self.info.distributed)
        self.wrapped = wrap(self.forward_module, self.info, fsdp=self.fsdp)
        self.teacher_scale = self.cache.info.logit_scale if self.cache is not None else None
        policy = cfg.data.policy() or (self.cache.info.policy if self.cache is not None else AugmentPolicy())
        views = {"student": self.student.image_config}
        if self.mode == "online":
            views["teacher"] = self.teacher.image_config
        world = self.info.world
        self.stream_cfg = StreamConfig(
            shards=self.shards, batch_size=self._micro(cfg.data.batch_size, "data.batch_size"), views=views, policy=policy,
            seed=cfg.seed, rank=self.info.rank, world=world, workers=cfg.data.workers,
            shuffle_buffer=cfg.data.shuffle_buffer, text=self.text,
            pooled="teacher_pooled" in self.needs and self.mode == "cached",
            labels=self.keep_labels, keys=self.keep_keys, extras=extras,
        )
        self.corpus: list[str] = []
        if cfg.data.texts:
            from clipdistill.data.texts import load_corpora

            if not self.text:
                raise UserError("data.texts needs image-caption data in data.train (the texts' relations use the batch's images)")
            self.corpus = load_corpora(cfg.data.texts)
            self.text_micro = self._micro(cfg.data.text_batch_size or cfg.data.batch_size, "data.text_batch_size")
        self.stream_cfg_u = None
        if self.unpaired_shards:
            policy_u = cfg.data.policy() or (self.cache_u.info.policy if self.cache_u is not None else AugmentPolicy())
            self.stream_cfg_u = StreamConfig(
                shards=self.unpaired_shards, batch_size=self._micro(cfg.data.unpaired_batch_size or cfg.data.batch_size,
                                                                    "data.unpaired_batch_size"), views=views, policy=policy_u,
                seed=cfg.seed, rank=self.info.rank, world=world, workers=cfg.data.workers,
                shuffle_buffer=cfg.data.shuffle_buffer, text=False,
                pooled="teacher_pooled" in self.needs and self.mode == "cached",
                labels=self.keep_labels,  # the keep-list names data.train samples; the class filter applies to both
                what="data.unpaired",
            )

    def _check_eval_datasets(self) -> None:
        """Resolve every eval.datasets entry (dataset, split) now, not after training."""
        from clipdistill.data.shards import dataset_info
        from clipdistill.train.evaluate import parse_dataset

        for spec in self.cfg.eval.datasets:
            name, split = parse_dataset(spec)
            try:
                dataset_info(name, self.cfg.data.root).shards(split)
            except UserError as err:
                raise UserError(f"eval.datasets entry '{spec}': {err}") from None
        for name, every in self.cfg.eval.subsample.items():
            if isinstance(every, bool) or not isinstance(every, int) or every < 1:
                raise UserError(f"eval.subsample.{name} = {every!r} must be a whole number >= 1 (every n-th sample)")

    def _check_streams(self) -> None:
        """Refuse, before step 0, data that cannot give each of its streams (ranks x workers) one record:
        a stream without records would wait forever."""
        cfg = self.cfg
        streams = self.info.world * max(1, cfg.data.workers)
        sources = [("data.train", cfg.data.train, self.shards, self.keep_keys)]
        if self.unpaired_shards:
            sources.append(("data.unpaired", cfg.data.unpaired, self.unpaired_shards, None))
        for what, specs, shards, keys in sources:
            n = count_samples(shards, self.keep_labels, keys, at_most=streams)
            if n == 0 and (self.keep_labels is not None or keys is not None):
                raise UserError(f"the data filter (filter={cfg.data.filter!r}, keep={cfg.data.keep!r}) keeps no sample of "
                                f"{what} {specs}; check the keep-list's keys and the filter")
            if n == 0:
                raise UserError(f"{what} {specs} holds no readable sample ({len(shards)} shard(s), empty or unreadable); "
                                "check the shards or choose another split")
            if n < streams:
                raise UserError(f"{what} {specs} has {n} sample(s), fewer than its {streams} data streams "
                                "(ranks x data.workers); lower data.workers or add data")

    def _micro(self, size: int, what: str) -> int:
        """One rank's micro-batch of a global batch `size` (refused unless ranks x accum_steps divides it)."""
        world, accum = self.info.world, self.cfg.optim.accum_steps
        if size % (world * accum):
            raise UserError(f"{what} {size} is not divisible by ranks x accum_steps = {world} x {accum}; change one")
        return size // (world * accum)

    def _available(self) -> set[str]:
        have = {"cluster_centres", "student_pooled"}
        if self.text:
            have.add("teacher_text")
            if self.own_text:
                have.add("student_text")
        if self.mode == "online":
            have |= {"teacher_pooled", "image_tokens", "teacher_image_tokens", "text_tokens"}
        elif self.cache is not None and self.cache.info.pooled_dim:
            have.add("teacher_pooled")
        if build.vision_transformer(self.student) is not None:
            have.add("masked_view")
        return have

    def _build_optimiser(self) -> None:
        o = self.cfg.optim
        groups = build.param_groups(self.student, self.distiller, o)
        self.optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        self.params = [p for g in groups for p in g["params"]]
        # Gradients synchronised by hand (identical on every rank; averaged to keep them bit-identical).
        self.replicated = [p for p in self.distiller.parameters() if p.requires_grad]
        if self.fsdp:
            self.replicated += [p for p in fsdp_ignored(self.forward_module) if p.requires_grad]

    def _plan_steps(self) -> None:
        cfg = self.cfg
        if cfg.steps is not None:
            self.total_steps = cfg.steps
            self.dataset_size = self._dataset_size() if self.cache is not None else None
        else:
            self.dataset_size = self._dataset_size()
            self.total_steps = max(1, math.ceil(cfg.epochs * self.dataset_size / cfg.data.batch_size))
        o = cfg.optim
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: build.lr_factor(s, self.total_steps, o.warmup_steps, o.schedule, o.min_lr_ratio)
        )

    def _dataset_size(self) -> int:
        if self.keep_labels is not None or self.keep_keys is not None:
            size = count_samples(self.shards, self.keep_labels, self.keep_keys)
            if size == 0:
                raise UserError(f"the data filter (filter={self.cfg.data.filter!r}, keep={self.cfg.data.keep!r}) keeps no sample of {self.cfg.data.train}")
            return size
        if self.cache is not None:
            from clipdistill.data.loader import shard_name

            names = {shard_name(p) for p in self.shards}
            return sum(int(s["samples"]) for s in self.cache.info.shards if s["name"] in names)
        return count_samples(self.shards)

    # --- checkpoints ----------------------------------------------------------------------------------

    def _checkpoint(self) -> dict:
        """Save a checkpoint (rank 0 writes; every rank contributes); returns the full student state."""
        student_state, optim_state = model_and_optimizer_state(
            self.student, self.forward_module, self.distiller, self.optimizer, fsdp=self.fsdp)
        workers = max(1, self.cfg.data.workers)
        mine = own_streams(self.data_state.state_dict(), self.info.rank, workers)
        mine_u = own_streams(self.data_state_u.state_dict(), self.info.rank, workers)
        states = all_gather_object({"rng": rng_state(), "data": mine, "data_unpaired": mine_u})
        if not self.info.is_main:
            return student_state
        data = merge_data_states([st["data"] for st in states])
        save_checkpoint(self.out, {
            "step": self.step,
            "student": student_state,
            "distiller": self.distiller.state_dict(),
            "optimizer": optim_state,
            "scheduler": self.scheduler.state_dict(),
            "scaler": None,  # bf16 and fp32 need no loss scaling
            "rng": [st["rng"] for st in states],
            "data": data,
            "data_unpaired": merge_data_states([st["data_unpaired"] for st in states]),
            "world": self.info.world,
            "config": self.cfg.to_dict(),
            "eval": self.last_eval,
            "logs": self.last_logs,
        })
        self.last_checkpoint_step = self.step
        return student_state

    def _restore(self, ckpt: dict) -> None:
        check_resumable(ckpt.get("config", {}), self.cfg.to_dict())
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        load_model_and_optimizer_state(ckpt, self.student, self.forward_module, self.distiller, self.optimizer, fsdp=self.fsdp)
        self.distiller.load_state_dict(ckpt["distiller"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.step = int(ckpt["step"])
        self.last_eval = ckpt.get("eval", {})
        self.last_logs = dict(ckpt.get("logs") or {})
        self._apply_changed_optim(ckpt.get("config", {}).get("optim", {}), fresh)
        rngs = ckpt["rng"]
        set_rng_state(rngs[self.info.rank] if self.info.rank < len(rngs) else rngs[0])
        self.data_state = self._restored_data(ckpt["data"])
        if ckpt.get("data_unpaired") is not None:
            self.data_state_u = self._restored_data(ckpt["data_unpaired"])
        if ckpt.get("world") != self.info.world:
            log.warning("resuming a %s-process run on %d processes: the data order changes", ckpt.get("world"), self.info.world)
        self.last_checkpoint_step = self.step
        log.info("resumed from step %d", self.step)

    def _apply_changed_optim(self, before: dict, fresh: list[dict]) -> None:
        """Optimiser settings changed since the checkpoint (e.g. a lower optim.lr after a NaN) take effect
        from the resumed step on; loading the optimiser and scheduler state would silently restore the
        old ones."""
        now = self.cfg.to_dict()["optim"]
        changed = [k for k in now if k != "accum_steps" and k in before and before[k] != now[k]]
        if not changed:
            return
        for group, new in zip(self.optimizer.param_groups, fresh):
            for key in ("initial_lr", "weight_decay", "betas", "eps"):
                if key in new:
                    group[key] = new[key]
        sched = self.scheduler
        sched.base_lrs = [g["initial_lr"] for g in self.optimizer.param_groups]
        for group, base, factor in zip(self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * factor(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        if self.info.is_main:
            log.warning("--resume: applying the changed optimiser settings from step %d: %s", self.step,
                        "; ".join(f"optim.{k} {before[k]!r} -> {now[k]!r}" for k in changed))

    def _restored_data(self, raw: dict) -> DataState:
        state = DataState.from_state(raw)
        if not self.info.is_main:  # totals live on rank 0 and are summed again at the next checkpoint
            state.samples, state.skipped.reasons = 0, {}
        return state

    # --- one step -------------------------------------------------------------------------------------

    def _autocast(self):
        if self.cfg.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _teacher_outputs(self, micro: list[dict], *, unpaired: bool = False) -> Outputs | None:
        if self.mode == "none":
            return None
        parts = []
        for b in micro:
            if self.mode == "cached":
                parts.append(build.cached_teacher_outputs(b, self.teacher_scale, self.device))
            else:
                with self._autocast():
                    parts.append(build.online_teacher_outputs(
                        self.teacher, b["views"]["teacher"].to(self.device), None if unpaired else b["captions"],
                        pooled="teacher_pooled" in self.needs,
                        image_tokens=not unpaired and bool(self.needs & {"image_tokens", "teacher_image_tokens"}),
                        text_tokens=not unpaired and "text_tokens" in self.needs,
                    ))
        return build.concat_outputs(parts)

    def _corpus_texts(self, n_micro: int) -> list[list[str]] | None:
        """This step's corpus texts per micro-batch: a pure function of (seed, step, rank, micro)."""
        if not self.corpus:
            return None
        from clipdistill.data.texts import sample_texts

        return [sample_texts(self.corpus, self.text_micro, self.cfg.seed, self.step, self.info.rank, i) for i in range(n_micro)]

    @torch.no_grad()
    def _teacher_texts(self, corpus: list[list[str]], teacher: Outputs | None) -> Outputs:
        """The teacher's text embeddings of the corpus texts (its text tower online, also in cached mode)."""
        texts = [t for part in corpus for t in part]
        with self._autocast():
            emb = self.teacher.text_features(self.teacher.tokenize(texts).to(self.device)).embedding.float()
        scale = teacher.scale if teacher is not None else self.teacher.logit_scale().detach().float()
        return Outputs(image=None, text=emb, scale=scale)

    def _check(self, loss: torch.Tensor, logs: dict) -> None:
        if torch.isfinite(loss):
            return
        bad = next((k for k, v in logs.items() if k != "loss" and "/" not in k and not torch.isfinite(v).all()), None)
        bad = bad or next((k for k, v in logs.items() if k != "loss" and not torch.isfinite(v).all()), "loss")
        raise NonFiniteLoss(
            f"loss is {loss.item()} at step {self.step + 1} (term '{bad}' = {logs[bad].item()}); {self._last_good()}"
        )

    def _last_good(self) -> str:
        """Where a run stopped by a non-finite value can go on from, and the advice."""
        step = getattr(self, "last_checkpoint_step", None)
        if step:
            return (f"the last good checkpoint (step {step}) is kept in {self.out / 'checkpoints'}; lower optim.lr "
                    "(--resume applies it) or check the data")
        return "no checkpoint was written yet; lower optim.lr or check the data, and start the run again"

    def _nonfinite_grads(self) -> str:
        """Which loss term's (or the student's) parameters hold non-finite gradients, for the message."""
        names = [(f"student.{n}", p) for n, p in self.student.named_parameters()]
        names += [(f"distiller.{n}", p) for n, p in self.distiller.named_parameters()]
        bad = [n for n, p in names if p.grad is not None and not torch.isfinite(p.grad).all()]
        terms = sorted({n.split(".")[2] for n in bad if n.startswith("distiller.terms.")})
        if terms:
            return f"in the parameters of term {', '.join(repr(t) for t in terms)}"
        if bad:
            return f"in {bad[0]} ({len(bad)} parameter tensor(s) in all)"
        return "in no single parameter (the norm itself overflowed)"

    def train_step(self, micro: list[dict], micro_u: list[dict] | None = None) -> dict:
        """One optimiser step on `micro` (this rank's micro-batches) and, in a mixed run, `micro_u`
        (as many micro-batches of caption-less images); returns the logs (floats)."""
        teacher = self._teacher_outputs(micro)
        teacher_u = self._teacher_outputs(micro_u, unpaired=True) if micro_u else None
        corpus = self._corpus_texts(len(micro))
        teacher_t = self._teacher_texts(corpus, teacher) if corpus else None
        tokens = None
        if self.forward_module.own_text:
            tokens = [self.student.tokenize(b["captions"] + (corpus[i] if corpus else [])).to(self.device)
                      for i, b in enumerate(micro)]

        def forward(i: int) -> dict[str, torch.Tensor]:
            b = micro[i]
            mask_seed = stable_seed(self.cfg.seed, "mask", self.step, i, self.info.rank)
            images = b["views"]["student"]
            if micro_u:  # one forward over both parts (one DDP forward per backward), split afterwards
                images = torch.cat([images, micro_u[i]["views"]["student"]])
            with self._autocast():
                out = self.wrapped(images.to(self.device), tokens[i] if tokens else None, mask_seed)
            if micro_u:
                _split_rows(out, ("image", "image_pooled", "image_tokens", "image_masked"), len(b["keys"]), "u_")
            if corpus:  # the corpus texts rode along the captions through the text tower
                _split_rows(out, ("text", "text_pooled"), len(b["keys"]), "t_")
            return out

        def loss_fn(s: dict[str, torch.Tensor]):
            text = s.get("text", teacher.text if teacher is not None and not self.own_text else None)
            student = Outputs(image=s["image"], text=text, scale=s["scale"], image_pooled=s.get("image_pooled"),
                              text_pooled=s.get("text_pooled"), image_tokens=s.get("image_tokens"),
                              image_masked=s.get("image_masked"))
            self._student_full = student
            unpaired = None
            if micro_u:
                self._student_u = Outputs(image=s["u_image"], text=None, scale=s["scale"], image_pooled=s.get("u_image_pooled"),
                                          image_masked=s.get("u_image_masked"))
                unpaired = (self._student_u, teacher_u)
            texts = None
            if corpus:
                self._student_t = Outputs(image=None, text=s["t_text"], scale=s["scale"])
                texts = (self._student_t, teacher_t)
            return self.distiller(student, teacher, unpaired, texts)

        self.optimizer.zero_grad(set_to_none=True)
        self.student.train()
        _, logs, _ = cached_backward(
            forward, len(micro), loss_fn, batch_grad_scale=float(self.info.world),
            no_sync=no_sync_context(self.wrapped), check=self._check, device=self.device,
        )
        all_reduce_mean_([p.grad for p in self.replicated if p.grad is not None])
        out = {k: float(v) for k, v in logs.items() if v.numel() == 1}
        if self.cfg.optim.grad_clip is not None:
            norm = clip_grad_norm(self.params, self.cfg.optim.grad_clip)
            if not torch.isfinite(norm):
                terms = ", ".join(f"{k}={v:.4g}" for k, v in out.items() if k != "loss" and "/" not in k)
                raise NonFiniteLoss(
                    f"gradient norm is {norm.item()} at step {self.step + 1}, non-finite {self._nonfinite_grads()} "
                    f"(loss terms: {terms}); {self._last_good()}"
                )
            out["grad_norm"] = float(norm)
        self.optimizer.step()
        self.scheduler.step()
        self.distiller.update(self._student_full.detach(), teacher, (self._student_u.detach(), teacher_u) if micro_u else None,
                              (self._student_t.detach(), teacher_t) if corpus else None)
        return out

    # --- the loop -------------------------------------------------------------------------------------

    def run(self) -> dict:
        cfg = self.cfg
        if self.finished:
            return self._finished_summary()
        start, step0 = time.time(), self.step
        self.logger = RunLogger(self.out, enabled=self.info.is_main, total=self.total_steps, initial=self.step)
        it = iter(self.loader)
        it_u = iter(self.loader_u) if self.loader_u is not None else None
        logs: dict = dict(self.last_logs)
        t_last, n_last = time.time(), 0
        try:
            while self.step < self.total_steps:
                micro = [_next_batch(it) for _ in range(cfg.optim.accum_steps)]
                for b in micro:
                    self.data_state.update(b)
                micro_u = None
                if it_u is not None:
                    micro_u = [_next_batch(it_u) for _ in range(cfg.optim.accum_steps)]
                    for b in micro_u:
                        self.data_state_u.update(b)
                logs = self.train_step(micro, micro_u)
                self.last_logs = logs
                self.step += 1
                n_last += cfg.data.batch_size + (sum(len(b["keys"]) for b in micro_u) * self.info.world if micro_u else 0)
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    now = time.time()
                    logs["images_per_s"] = n_last / max(now - t_last, 1e-9)
                    t_last, n_last = now, 0
                    self.logger.log_step(self.step, logs, self.optimizer, self._epoch(), self.data_state.skipped.reasons)
                self.logger.advance(logs)
                if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < self.total_steps:
                    self._evaluate()
                if self.step % cfg.checkpoint_every == 0 and self.step < self.total_steps:
                    self._checkpoint()
            if cfg.eval.at_end and cfg.eval.datasets:
                self._evaluate()
            final_state = self._checkpoint()
        except _Terminated:
            step = getattr(self, "last_checkpoint_step", None)
            where = (f"its last checkpoint (step {step}) is in {self.out / 'checkpoints'}; continue with the same "
                     "command and --resume") if step else "no checkpoint was written yet; start the run again"
            log.error("stopped by SIGTERM at step %d of %d; %s", self.step, self.total_steps, where)
            raise SystemExit(128 + signal.SIGTERM) from None
        finally:
            self.logger.close()
        elapsed = time.time() - start
        summary = {
            "steps": self.step,
            "steps_this_session": self.step - step0,
            "seconds": round(elapsed, 1),
            "images_per_s": round((self.step - step0) * cfg.data.batch_size / max(elapsed, 1e-9), 2),
            "final": logs,
            "epoch": self._epoch(),
            "skipped": dict(self.data_state.skipped.reasons),
            "unpaired_samples": self.data_state_u.samples if self.loader_u is not None else None,
            "unpaired_skipped": dict(self.data_state_u.skipped.reasons) if self.loader_u is not None else None,
            "teacher_mode": self.mode,
            "student_spec": cfg.student.spec,
            "student_init": cfg.student.build_kwargs(),
            "trained_on": {"pairs": list(cfg.data.train), "unpaired_images": list(cfg.data.unpaired),
                           "texts": list(cfg.data.texts)},
            "eval": self.last_eval,
            "world": self.info.world,
        }
        if self.info.is_main:
            summary["student_weights"] = str(write_summary(self.out, summary, self.student, final_state, cfg))
        return summary

    def _finished_summary(self) -> dict:
        """The summary of a run that had already reached its last step (left as it is on disk)."""
        try:
            summary = json.loads((self.out / "summary.json").read_text())
        except (OSError, ValueError):
            summary = {"steps": self.step}
        log.info("the run in %s is finished (step %d of %d); nothing to do, its files are unchanged",
                 self.out, self.step, self.total_steps)
        return {**summary, "already_finished": True}

    def _epoch(self) -> float | None:
        if not self.dataset_size:
            return None
        return self.step * self.cfg.data.batch_size / self.dataset_size

    def _evaluate(self) -> None:
        from clipdistill.train.evaluate import evaluate_student

        if self.fsdp:  # a sharded student cannot run on rank 0 alone: evaluate student.pt afterwards
            log.warning("evaluation during FSDP training is skipped; evaluate %s after the run", self.out / "student.pt")
            return
        if self.info.is_main:
            self.student.eval()
            self.last_eval = evaluate_student(self.student, self.cfg, teacher=self.teacher)
            if getattr(self, "logger", None) is not None:
                self.logger.log_eval(self.step, self.last_eval)
        barrier()


def _next_batch(it) -> dict:
    """The next batch; a UserError raised in a DataLoader worker comes back as its one-line message."""
    try:
        return next(it)
    except UserError as err:
        raise UserError(worker_error_message(err)) from None


def _split_rows(out: dict, keys: tuple[str, ...], n: int, prefix: str) -> None:
    """Move rows n: of each of `keys` in `out` to `prefix + key` (the unpaired part of a joint forward)."""
    for key in [k for k in keys if k in out]:
        out[f"{prefix}{key}"], out[key] = out[key][n:], out[key][:n]


def _needs_of(loss_cfg) -> set[str]:
    from clipdistill.losses.base import get_term

    return set().union(*(get_term(n).needs for n in loss_cfg.weights))
