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

Here: `train`, and `Run` (setup order, one step, the loop). Elsewhere in train/: setup.py (teacher,
Distiller, cache checks), streams.py (`DataStream`), step.py (teacher side, guards), optim.py,
resume.py (checkpoint contents), report.py (logs, summary), signals.py (SIGTERM).
"""

from __future__ import annotations

import logging
import random
import signal
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

from clipdistill.data.augment import stable_seed
from clipdistill.data.loader import worker_error_message
from clipdistill.errors import UserError
from clipdistill.models.pruning import L0Config, mask_student, masked_part
from clipdistill.train import build, setup
from clipdistill.train.accumulate import cached_backward
from clipdistill.train.checkpoint import has_checkpoint, load_checkpoint
from clipdistill.train.config import TrainConfig
from clipdistill.train.distributed import (
    DistInfo,
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
from clipdistill.train.optim import L0_GROUPS, make_optimizer, make_scheduler, param_groups
from clipdistill.train.report import RunLogger, finished_summary, pruned_student, run_summary, write_summary
from clipdistill.train.resume import restore_run, save_run
from clipdistill.train.signals import Terminated, sigterm_raises
from clipdistill.train.step import (
    NonFiniteLoss,
    TeacherSide,
    autocast,
    check_finite,
    corpus_texts,
    distiller_args,
    last_good,
    nonfinite_grads,
    split_rows,
)
from clipdistill.train.streams import (
    DataStream,
    check_streams,
    configure_streams,
    plan_steps,
    resolve_streams,
    start_states,
)

log = logging.getLogger(__name__)


def train(cfg: TrainConfig, *, resume: bool = False) -> dict:
    """Run (or resume) a distillation; returns the summary (also written to output_dir/summary.json).

    Rank 0 holds an exclusive lock on output_dir for the whole run (`train.lock.RunLock`), so a second
    run into the same folder is refused instead of silently mixing files with the first.
    """
    info = init_distributed(cfg.distributed.backend, cfg.device, cfg.distributed.timeout_s)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        with sigterm_raises():
            try:
                with RunLock(cfg.output_dir) if info.is_main else nullcontext():
                    return Run(cfg, info, resume=resume).run()
            except Terminated:
                log.error("stopped by SIGTERM before the first step; nothing to resume, start the run again")
                raise SystemExit(128 + signal.SIGTERM) from None
    finally:
        torch.set_num_threads(threads)  # process-wide settings go back to what the caller had
        torch.use_deterministic_algorithms(deterministic)
        cleanup()


class Run:
    """One training run's state (models, optimiser, data streams, logging); `run()` does the loop."""

    def __init__(self, cfg: TrainConfig, info: DistInfo, *, resume: bool = False) -> None:
        self.cfg, self.info, self.out = cfg, info, Path(cfg.output_dir)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        if has_checkpoint(self.out) and not resume:
            raise UserError(
                f"'{self.out}' already holds a run; pass --resume to continue it or choose another output_dir"
            )
        if info.is_main:  # we hold the output_dir lock: temporary files there belong to killed runs
            remove_stale_temp_files(self.out)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.device = info.device
        self.mode = cfg.teacher_mode
        self.streams, self.text = resolve_streams(cfg)  # paired, unpaired (data.unpaired), texts (data.texts)
        setup.check_eval_datasets(cfg)
        extras = self._build_models()
        self._configure_streams(extras)
        check_streams(self.streams, cfg, info.world)
        self._build_optimiser()
        self.total_steps, self.dataset_size = plan_steps(self.paired, cfg)
        if (
            self.masked is not None
        ):  # the sparsity ramp: student.sparsity_warmup steps, by default half the run
            warmup = cfg.student.sparsity_warmup
            self.masked.cfg.warmup_steps = self.total_steps // 2 if warmup is None else warmup
        self.scheduler = make_scheduler(self.optimizer, self.total_steps, cfg.optim)
        self.step = 0
        self.last_logs: dict = {}
        self.finished = False
        # fresh data positions; those of stream kinds this run does not use are carried from checkpoint to checkpoint
        self.idle_states = start_states(self.streams, info.world * max(1, cfg.data.workers))
        self.last_eval: dict = {}
        if resume:
            restore_run(self, load_checkpoint(self.out))
            self.last_checkpoint_step = self.step
            # a finished run: --resume has nothing to do and must not rewrite its summary
            self.finished = self.step >= self.total_steps and (self.out / "summary.json").is_file()
        for s in self.streams:
            s.open(resume)

    def _stream(self, kind: str) -> DataStream | None:
        return next((s for s in self.streams if s.kind == kind), None)

    @property
    def paired(self) -> DataStream:
        return self.streams[0]

    @property
    def unpaired(self) -> DataStream | None:
        return self._stream("unpaired")

    @property
    def texts(self) -> DataStream | None:
        return self._stream("texts")

    @property
    def loader(self):
        """The data.train loader (tests draw batches from it)."""
        return self.paired.loader

    @property
    def loader_u(self):
        """The data.unpaired loader, None without data.unpaired."""
        return self.unpaired.loader if self.unpaired is not None else None

    # --- setup --------------------------------------------------------------------------------------

    def _build_models(self) -> dict[str, str] | None:
        """Teacher, student, Distiller, the teacher caches' checks and the (wrapped) student forward;
        returns the cache extras the paired stream reads."""
        cfg, dev, cache = self.cfg, self.device, self.paired.cache
        self.teacher = setup.build_teacher(cfg, self.mode, cache, dev)
        setup.check_ensemble(cfg, cache)
        teacher_dim = setup.teacher_width(cache, self.teacher, cfg.teacher.member)
        self.student = build.build_student(
            cfg.student.spec, cfg.student.text, self.teacher, teacher_dim or 0, **cfg.student.build_kwargs()
        )
        if cfg.student.sparsity is not None:  # automatic inheritance: L0 masks over the inherited student
            self.student = mask_student(self.student, L0Config(target_sparsity=cfg.student.sparsity))
        self.student = self.student.to(dev)
        self.masked = masked_part(self.student)
        self.own_text = cfg.student.text == "own"
        self.distiller = setup.build_distiller(
            cfg, self.student, self.teacher, cache, self.mode, teacher_dim, dev
        )
        self.needs = self.distiller.needs
        self.distiller.check(
            self.mode, setup.available(self.student, self.mode, cache, text=self.text, own_text=self.own_text)
        )
        extras = setup.check_caches(cfg, self.streams, self.teacher, self.distiller, self.mode, self.text)
        if not self.text and self.own_text and "clip" in self.distiller.terms:
            raise UserError(
                "the training data has no captions (classification shards): drop losses.clip or train on image-caption data"
            )
        self.forward_module = setup.student_forward(
            self.student, self.distiller, own_text=self.own_text and self.text
        )
        self.fsdp = bool(cfg.distributed.fsdp and self.info.distributed)
        self.wrapped = wrap(self.forward_module, self.info, fsdp=self.fsdp)
        scale = cache.info.logit_scale if cache is not None else None
        self.teacher_side = TeacherSide(
            self.mode,
            self.teacher,
            scale,
            self.needs,
            dev,
            cfg.precision,
            member=cfg.teacher.member,
            layout=cache.info if cache is not None else None,
        )
        return extras

    def _configure_streams(self, extras: dict[str, str] | None) -> None:
        """The loader configs of the shard streams, and the texts stream (data.texts)."""
        views = {"student": self.student.image_config}
        if self.mode == "online":
            views.update(build.teacher_views(self.teacher))
        pooled = "teacher_pooled" in self.needs and self.mode == "cached"
        configure_streams(
            self.streams, self.cfg, self.info, views=views, pooled=pooled, text=self.text, extras=extras
        )

    def _build_optimiser(self) -> None:
        groups = param_groups(self.student, self.distiller, self.cfg.optim)
        self.optimizer = make_optimizer(groups, self.cfg.optim)
        self.params = [p for g in groups if g["name"] not in L0_GROUPS for p in g["params"]]  # clipped
        # Gradients synchronised by hand (identical on every rank; averaged to keep them bit-identical).
        self.replicated = [p for p in self.distiller.parameters() if p.requires_grad]
        if self.fsdp:
            self.replicated += [p for p in fsdp_ignored(self.forward_module) if p.requires_grad]

    # --- checkpoints ----------------------------------------------------------------------------------

    def _checkpoint(self) -> dict:
        """Save a checkpoint (rank 0 writes; every rank contributes); returns the full student state."""
        student_state = save_run(self)
        if self.info.is_main:
            self.last_checkpoint_step = self.step
        return student_state

    # --- one step -------------------------------------------------------------------------------------

    def train_step(self, micro: list[dict], micro_u: list[dict] | None = None) -> dict:
        """One optimiser step on `micro` (this rank's micro-batches) and, in a mixed run, `micro_u`
        (as many micro-batches of caption-less images); returns the logs (floats)."""
        teacher = self.teacher_side.outputs(micro)
        unpaired = (self.teacher_side.outputs(micro_u, unpaired=True),) if micro_u else None
        corpus = corpus_texts(self.texts, self.cfg.seed, self.step, self.info.rank, len(micro))
        texts = (self.teacher_side.texts(corpus, teacher),) if corpus else None
        tokens = None
        if self.forward_module.own_text:
            tokens = [
                self.student.tokenize(b["captions"] + (corpus[i] if corpus else [])).to(self.device)
                for i, b in enumerate(micro)
            ]

        def forward(i: int) -> dict[str, torch.Tensor]:
            b = micro[i]
            mask_seed = stable_seed(self.cfg.seed, "mask", self.step, i, self.info.rank)
            images = b["views"]["student"]
            if micro_u:  # one forward over both parts (one DDP forward per backward), split afterwards
                images = torch.cat([images, micro_u[i]["views"]["student"]])
            with autocast(self.cfg.precision, self.device):
                out = self.wrapped(images.to(self.device), tokens[i] if tokens else None, mask_seed)
            if micro_u:
                split_rows(
                    out, ("image", "image_pooled", "image_tokens", "image_masked"), len(b["keys"]), "u_"
                )
            if corpus:  # the corpus texts rode along the captions through the text tower
                split_rows(out, ("text", "text_pooled"), len(b["keys"]), "t_")
            return out

        def args(s: dict[str, torch.Tensor]) -> tuple:
            return distiller_args(s, teacher, own_text=self.own_text, unpaired=unpaired, texts=texts)

        self.optimizer.zero_grad(set_to_none=True)
        self.student.train()
        with self._mask_rng():
            _, logs, full = cached_backward(
                forward,
                len(micro),
                lambda s: self.distiller(*args(s)),
                batch_grad_scale=float(self.info.world),
                no_sync=no_sync_context(self.wrapped),
                device=self.device,
                check=lambda loss, logs: check_finite(loss, logs, self.step, self._last_good),
            )
        all_reduce_mean_([p.grad for p in self.replicated if p.grad is not None])
        out = {k: float(v) for k, v in logs.items() if v.numel() == 1}
        if self.masked is not None:  # automatic inheritance: the Lagrangian on the expected sparsity
            penalty, l0_logs = self.masked.penalty(self.step)
            penalty.backward()  # the same on every rank: no synchronisation needed
            out["loss"] = out.get("loss", 0.0) + float(penalty.detach())
            out.update({k: float(v) for k, v in l0_logs.items()})
        if self.cfg.optim.grad_clip is not None:
            norm = clip_grad_norm(self.params, self.cfg.optim.grad_clip)
            if not torch.isfinite(norm):
                terms = ", ".join(f"{k}={v:.4g}" for k, v in out.items() if k != "loss" and "/" not in k)
                raise NonFiniteLoss(
                    f"gradient norm is {norm.item()} at step {self.step + 1}, non-finite "
                    f"{nonfinite_grads(self.student, self.distiller)} (loss terms: {terms}); {self._last_good()}"
                )
            out["grad_norm"] = float(norm)
        self.optimizer.step()
        if self.masked is not None:
            self.masked.constrain_()
        self.scheduler.step()
        self.distiller.update(*args(full))  # `full`: the (detached) full-batch outputs the loss saw
        return out

    @contextmanager
    def _mask_rng(self):
        """Automatic inheritance samples its L0 masks from torch's RNG: seeded per (seed, step, rank) for the
        step (the caller's RNG untouched), so a resumed run draws the masks the uninterrupted one drew."""
        if self.masked is None:
            yield
            return
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(stable_seed(self.cfg.seed, "l0", self.step, self.info.rank))
            yield

    def _last_good(self) -> str:
        return last_good(self.out, getattr(self, "last_checkpoint_step", None))

    # --- the loop -------------------------------------------------------------------------------------

    def _draw(self, stream: DataStream, it) -> list[dict]:
        """One step's micro-batches of a shard stream, recorded in its data position."""
        micro = [_next_batch(it) for _ in range(self.cfg.optim.accum_steps)]
        for b in micro:
            stream.state.update(b)
        return micro

    def run(self) -> dict:
        cfg = self.cfg
        if self.finished:
            return self._finished_summary()
        start, step0 = time.time(), self.step
        self.logger = RunLogger(
            self.out, enabled=self.info.is_main, total=self.total_steps, initial=self.step
        )
        iters = [(s, iter(s.loader)) for s in self.streams if s.loader is not None]
        logs: dict = dict(self.last_logs)
        t_last, n_last = time.time(), 0
        try:
            while self.step < self.total_steps:
                drawn = {s.kind: self._draw(s, it) for s, it in iters}
                micro, micro_u = drawn["paired"], drawn.get("unpaired")
                logs = self.train_step(micro, micro_u)
                self.last_logs = logs
                self.step += 1
                n_last += cfg.data.batch_size + (
                    sum(len(b["keys"]) for b in micro_u) * self.info.world if micro_u else 0
                )
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    now = time.time()
                    logs["images_per_s"] = n_last / max(now - t_last, 1e-9)
                    t_last, n_last = now, 0
                    self.logger.log_step(
                        self.step, logs, self.optimizer, self._epoch(), self.paired.state.skipped.reasons
                    )
                self.logger.advance(logs)
                if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < self.total_steps:
                    self._evaluate()
                if self.step % cfg.checkpoint_every == 0 and self.step < self.total_steps:
                    self._checkpoint()
            if cfg.eval.at_end and cfg.eval.datasets:
                self._evaluate()
            final_state = self._checkpoint()
        except Terminated:
            step = getattr(self, "last_checkpoint_step", None)
            where = (
                (
                    f"its last checkpoint (step {step}) is in {self.out / 'checkpoints'}; continue with the same "
                    "command and --resume"
                )
                if step
                else "no checkpoint was written yet; start the run again"
            )
            log.error("stopped by SIGTERM at step %d of %d; %s", self.step, self.total_steps, where)
            raise SystemExit(128 + signal.SIGTERM) from None
        finally:
            self.logger.close()
        summary = run_summary(self, self.step - step0, time.time() - start, logs)
        student = self.student
        if self.masked is not None:  # automatic inheritance: the run ships the pruned dense student
            student, final_state, summary["sparsity"] = pruned_student(self)
        if self.info.is_main:
            summary["student_weights"] = str(write_summary(self.out, summary, student, final_state, cfg))
        return summary

    def _finished_summary(self) -> dict:
        """The summary of a run that had already reached its last step (left as it is on disk)."""
        log.info(
            "the run in %s is finished (step %d of %d); nothing to do, its files are unchanged",
            self.out,
            self.step,
            self.total_steps,
        )
        return finished_summary(self.out, self.step)

    def _epoch(self) -> float | None:
        if not self.dataset_size:
            return None
        return self.step * self.cfg.data.batch_size / self.dataset_size

    def _evaluate(self) -> None:
        from clipdistill.train.evaluate import evaluate_student

        if self.fsdp:  # a sharded student cannot run on rank 0 alone: evaluate student.pt afterwards
            log.warning(
                "evaluation during FSDP training is skipped; evaluate %s after the run",
                self.out / "student.pt",
            )
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
