"""The training loop: data, schedule, logging, validation, checkpoints and exact resume."""
from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from clipforge.checkpoint.io import write_clipforge_dir
from clipforge.data.images import skipped_by_reason, write_skip_log
from clipforge.data.loader import SkipCounter
from clipforge.data.transforms import EvalTransform, TrainTransform
from clipforge.device import resolve_device
from clipforge.distributed import (
    DistInfo,
    barrier,
    broadcast_object,
    gather_objects,
    init_distributed,
    mean_over_ranks,
    min_over_ranks,
)
from clipforge.errors import ConfigError, DataError, TrainingDiverged, TrainingError
from clipforge.loss import LOSSES
from clipforge.model import CLIP
from clipforge.precision import PrecisionChoice, resolve_precision
from clipforge.text.base import Tokenizer
from clipforge.train import checkpoints, optim
from clipforge.train.config import TrainConfig
from clipforge.train.data import TrainData, build_train_data, build_val_data
from clipforge.train.metrics_log import MetricsLog
from clipforge.train.models import build_model_and_tokenizer
from clipforge.train.resume import check_resume, check_schedule
from clipforge.train.step import BagOfWordsStep, CaptionStep, TrainStep
from clipforge.train.throughput import counting_flops
from clipforge.train.validate import Validation, ZeroShotProbe


def build_loss(config: TrainConfig) -> torch.nn.Module:
    """The loss named by the config (never inferred from the model)."""
    return LOSSES[config.loss](chunk_size=config.loss_chunk_size or None)


def train(config: TrainConfig, run_class: Callable[[TrainConfig], "TrainingRun"] | None = None) -> dict[str, Any]:
    """Run (or resume) a training run (a `run_class`: a TrainingRun subclass); returns a summary dict. Only rank 0
    writes files."""
    config.validate()
    run = (run_class or TrainingRun)(config)
    started = time.perf_counter()
    run.loop()
    return run.finish(started)


class TrainingRun:
    """One run's state — model, data, optimizer, position — and the steps that move it forward."""

    def __init__(self, config: TrainConfig) -> None:
        self.info = _dist_info(config.device)
        # Resolved once, before the resume check: config.json records (and a resume compares) what auto chose here.
        self.precision = _resolve_precision(config.precision, self.info)
        self.config = config = dataclasses.replace(config, precision=self.precision.precision)
        self.run_dir = Path(config.output_dir)
        resume_from = checkpoints.resolve_resume(self.run_dir, config.resume) if config.resume else None
        state = checkpoints.load_train_state(resume_from) if resume_from is not None else None
        # Checked before anything is built or written: a refused resume leaves the run's files as they were.
        asked = {"precision": self.precision.asked} if self.precision.asked == "auto" else {}
        self.overrides = check_resume(config, resume_from, state, asked) if state is not None else {}
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        self.model, self.tokenizer = self._build_model(resume_from)
        self._prepare_model()
        self.loss_fn = build_loss(config).to(self.info.device)
        transform = TrainTransform(self.model.image_size, scale=(config.aug_scale_min, 1.0),
                                   composite_white=config.composite_white, color_jitter=config.aug_color_jitter,
                                   grayscale_prob=config.aug_grayscale)
        self.data: TrainData = build_train_data(config, transform, self._pair_encoder(), self.info)
        self.total_steps = config.steps or config.epochs * self.data.steps_per_epoch
        if state is not None:
            check_schedule(config, state.get("total_steps"), self.total_steps, resume_from)
        self.step_fn = self._build_step()
        self.optimizer = optim.build_optimizer(self.step_fn.optimizer_groups(config.weight_decay), config.lr,
                                               (config.beta1, config.beta2), config.eps)
        self.step = self.epoch = self.steps_this_run = 0
        self.loss = math.nan
        self.step_gflop: float | None = None  # FLOPs of this session's first step (real batch), for speed reports
        self.resumed_epoch = False  # the current epoch continues a checkpoint's (it may have no batch left)
        if state is not None:
            self._restore(state)
        # A finished run resumed again: nothing to train, validate or save; its checkpoint is the result.
        self.already_finished = state is not None and self.step >= self.total_steps
        self.last_checkpoint: Path | None = resume_from if self.already_finished else None
        self.log = self._open_log()
        eval_transform = EvalTransform(self.model.image_size, composite_white=config.composite_white)
        # Checkpoints record the transparency rule the model was trained with, so clipforge.load applies it.
        self.preprocess = dataclasses.replace(self.model.preprocess_config, composite_white=config.composite_white)
        self.validation = self._validation(eval_transform)
        self.val_metrics: dict[str, float] = {}

    def _build_model(self, resume_from: Path | None) -> tuple[CLIP, Tokenizer]:
        """The model and tokenizer the run starts from (a subclass may change the model, e.g. give it a head)."""
        return build_model_and_tokenizer(self.config, resume_from)

    def _pair_encoder(self) -> Callable:
        """What turns the pair column's cells into the second tower's input: the tokenizer (a binding: audio)."""
        return self.tokenizer

    def _build_step(self) -> TrainStep:
        """The step that turns a batch into gradients (contrastive here; cross-entropy for a fine-tuned classifier)."""
        config = self.config
        args = (self.model, self.loss_fn, config.precision, config.accum_steps, config.grad_clip, self.info)
        if self.model.text_decoder is not None:  # CoCa: the contrastive and the captioning loss
            return CaptionStep(*args, contrastive_weight=config.contrastive_loss_weight,
                               caption_weight=config.caption_loss_weight)
        return BagOfWordsStep(*args) if self.model.bag_of_words is not None else TrainStep(*args)

    def _targets(self, batch: dict[str, Any]) -> torch.Tensor:
        """What a batch's images are matched with: its captions' token ids."""
        return batch["tokens"]

    def _prepare_model(self) -> None:
        """Device, activation checkpointing, locked towers, train mode."""
        self.model.to(self.info.device)
        if self.config.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        if self.config.lock_image:
            self.model.lock_image_tower(projection=not self.config.lock_image_projection)
        if self.config.lock_text:
            self.model.lock_text_tower()
        if self.config.decoder_only:
            if self.model.text_decoder is None:
                raise TrainingError(f"decoder_only needs a model with a captioning decoder (CoCa); "
                                    f"{self.config.model} has none")
            self.model.lock_all_but_decoder()
        self.model.train()

    def _restore(self, state: dict[str, Any]) -> None:
        """Optimizer, position, data order, skip counts and RNGs of a checkpoint: the run continues exactly."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.loss = state.get("loss", math.nan)  # older checkpoints did not record it
        self.resumed_epoch = True
        self.data.loader.load_state_dict(state["data"])
        self.data.skips = _restored_skips(state.get("skipped", {}), self.info)
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])

    def _open_log(self) -> MetricsLog:
        """The run folder, its config.json and metrics log; dropped captions are reported like skipped images,
        and each field a resume overrides with its recorded and new value."""
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            checkpoints.write_json(self.run_dir / "config.json", self._record())
        log = MetricsLog(self.run_dir, self.info.is_main)
        if self.precision.asked == "auto":
            choice = self.precision
            log.write({"step": self.step, "precision": {"asked": choice.asked, "resolved": choice.precision,
                                                        "reason": choice.reason, "bf16_speedup": choice.speedup}})
            if self.info.is_main:
                tqdm.write(choice.describe())
        if self.overrides:
            log.write({"step": self.step, "resume_override": {name: {"recorded": old, "new": new}
                                                              for name, (old, new) in self.overrides.items()}})
            if self.info.is_main:
                changes = ", ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in self.overrides.items())
                tqdm.write(f"resume at step {self.step} overrides the run's record (--resume-override): {changes}")
        if self.data.dropped_captions:
            log.write({"step": self.step, "captions_dropped": dict(self.data.dropped_captions)})
            if self.info.is_main:
                tqdm.write(f"dropped captions (their images keep a good one): {_counts(self.data.dropped_captions)}")
        return log

    def _record(self) -> dict[str, Any]:
        """The settings the run records, without this session's own: how it was resumed, an override (logged in
        metrics.jsonl) and its step limit, so `--config config.json --resume ...` carries none of them on."""
        return dataclasses.asdict(dataclasses.replace(self.config, resume="", resume_override="",
                                                      max_steps_this_run=0))

    def _validation(self, eval_transform: EvalTransform) -> Validation | None:
        """Held-out pairs and/or the zero-shot probe (rank 0 runs them; other ranks keep the call schedule)."""
        config = self.config
        pairs = build_val_data(config, eval_transform, self.tokenizer) if config.val_data else None
        if config.val_zeroshot and self.info.is_main:
            probe = ZeroShotProbe(config.val_zeroshot, config.val_zeroshot_styles, config.val_zeroshot_split,
                                  config.val_zeroshot_templates, eval_transform, self.tokenizer)
            return Validation(pairs, probe)
        return Validation(pairs, None) if pairs is not None or config.val_zeroshot else None

    def save(self) -> Path | None:
        """A checkpoint of the model (fp32 masters in bf16 mode) and of everything needed to resume."""
        state = {"step": self.step, "epoch": self.epoch, "data": self.data.loader.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                 "python_rng": random.getstate(),
                 # Each rank counts (and names) what it skipped of its own share: every rank's, in rank order.
                 "skipped": gather_objects(self.info.world_size, self.data.skips.state_dict()),
                 "config": self._record(), "loss": self.loss, "total_steps": self.total_steps}
        path = None
        if self.info.is_main:
            weights, model = self._weights_to_save(), self.model
            tokenizer, preprocess = self.tokenizer, self.preprocess
            path = checkpoints.save_checkpoint(
                self.run_dir, self.step, lambda d: write_clipforge_dir(d, weights, model.config, tokenizer, preprocess),
                state, self.config.keep_last)
        barrier(self.info)
        return path

    def _weights_to_save(self) -> dict[str, torch.Tensor]:
        """The checkpoint's weights: the fp32 master values (in bf16 mode) of the model as it is."""
        return self.step_fn.fp32_state_dict()

    def loop(self) -> None:
        """Epochs of batches until the run's steps (or this session's share of them) are done."""
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.info.is_main, dynamic_ncols=True,
                   desc="train")
        try:
            while not self._done():
                self._run_epoch(bar)
        finally:
            bar.close()

    def _run_epoch(self, bar: tqdm) -> None:
        """The current epoch's remaining batches; the epoch ends with them unless the run is done first."""
        self.data.loader.set_epoch(self.epoch)
        resumed, self.resumed_epoch = self.resumed_epoch, False
        batches = steps = 0
        for batch in self.data.loader:
            self.data.skips.update(batch)
            batches += 1
            if self._train_step(batch, bar):
                steps += 1
                if self._done():
                    return
        # Every epoch reads the same data: one without a step would repeat for ever. A resumed epoch may
        # have had its last batch before the checkpoint, and then has none left.
        if not steps and not (resumed and not batches):
            self._stop_without_a_step(batches)
        self._end_epoch()

    def _stop_without_a_step(self, batches: int) -> None:
        """After a pass over the data without a step: a DataError saying why (no batch, no usable sample, or
        usable samples never on every process at once)."""
        skips, data = self.data.skips, self.config.train_data
        if not batches:
            raise DataError(f"{data}: epoch {self.epoch} gave no batch at all, so training cannot make a step")
        usable = min_over_ranks(skips.seen_epoch - skips.epoch_total(), self.info)
        if usable > 0:
            raise DataError(f"{data}: no step in epoch {self.epoch}: each of the {self.info.world_size} processes "
                            f"kept at least {usable} sample(s), but no batch had one on every process at once "
                            f"(skipped {skips.report_epoch()}); use fewer processes or a larger --batch-size")
        examples = "; ".join(s.detail or f"{s.reason} (sample {s.index})" for s in skips.examples[:3])
        where = ""
        if skips.epoch["missing_file"]:
            folder = Path(self.config.train_data).resolve().parent
            where = (f" Image paths in a caption CSV/TSV are read relative to the CSV's own folder ({folder}), not "
                     "the working folder: write them relative to that folder, or absolute.")
        log = self._skip_log(self._all_skips())
        listed = f" Every skipped file is listed in {log}." if log else ""
        raise DataError(f"{data}: no usable sample in epoch {self.epoch}, so training cannot "
                        f"make a step: skipped {skips.report_epoch()}; first: {examples or 'none recorded'}.{where}"
                        f"{listed}")

    def _all_skips(self) -> SkipCounter:
        """Every rank's skip counts and files together (each rank reads its own share of the samples)."""
        return SkipCounter.merged(gather_objects(self.info.world_size, self.data.skips.state_dict()))

    def _skip_log(self, skips: SkipCounter) -> Path | None:
        """RUN/skipped.jsonl: each file any process skipped, once (rank 0 writes it and returns its path)."""
        return write_skip_log(self.run_dir, skips.files) if self.info.is_main else None

    def _done(self) -> bool:
        limit = self.config.max_steps_this_run
        return self.step >= self.total_steps or bool(limit and self.steps_this_run >= limit)

    def _end_epoch(self) -> None:
        skips = self.data.skips
        notes = [f"skipped {skips.report_epoch()}"] if skips.epoch_total() else []
        if skips.truncated_epoch:
            notes.append(f"{skips.truncated_epoch} captions cut to the {self.model.context_length}-token context")
        if self.info.is_main and notes:
            tqdm.write(f"epoch {self.epoch}: " + "; ".join(notes))
        skips.new_epoch()
        self.epoch += 1

    def _train_step(self, batch: dict[str, Any], bar: tqdm) -> bool:
        """One optimizer step on a batch; False when every sample of it was bad on some rank."""
        config, info = self.config, self.info
        # Skipped samples make ranks' batches differ, and gathers need equal sizes: the smallest one is used.
        size = min_over_ranks(len(batch["pixels"]), info)
        if size == 0:
            return False
        tick = time.perf_counter()
        lr = optim.warmup_cosine(self.step, self.total_steps, config.warmup, config.lr, config.min_lr)
        optim.set_lr(self.optimizer, lr)
        with counting_flops(self.step_gflop is None) as counted:
            loss = self.step_fn(batch["pixels"][:size].to(info.device), self._targets(batch)[:size].to(info.device))
        self.step_gflop = self.step_gflop if self.step_gflop is not None else counted()
        self.loss = mean_over_ranks(loss, info)
        if not math.isfinite(self.loss):
            last = checkpoints.list_checkpoints(self.run_dir)
            raise TrainingDiverged(
                f"loss is {self.loss} at step {self.step + 1}; stopped without saving. Last good checkpoint: "
                f"{last[-1] if last else 'none'}. Try a lower --lr, a longer --warmup, --grad-clip 1.0 or "
                "--precision fp32.")
        self.optimizer.step()
        self.step_fn.clamp_logit_scale()
        self.step_fn.sync_model()
        self.step += 1
        self.steps_this_run += 1
        self._after_step(lr, size * info.world_size / (time.perf_counter() - tick), bar)
        return True

    def _after_step(self, lr: float, pairs_per_s: float, bar: tqdm) -> None:
        """Log, progress bar, validation and checkpoint on their schedules."""
        config, step = self.config, self.step
        if step % config.log_every == 0 or step == self.total_steps:
            self.log.write({"step": step, "loss": self.loss, "lr": lr,
                            "logit_scale": self.model.logit_scale.exp().item(), "samples_per_s": pairs_per_s})
        bar.set_postfix(loss=f"{self.loss:.4f}", lr=f"{lr:.2e}", pairs_s=f"{pairs_per_s:.0f}")
        bar.update(1)
        if self.validation is not None and config.val_every and step % config.val_every == 0:
            self.val_metrics = self._validate()
            self.model.train()
        if config.save_every and step % config.save_every == 0:
            self.last_checkpoint = self.save()

    def _validate(self) -> dict[str, float]:
        metrics = self.validation(self.model, self.info.device) if self.info.is_main else {}
        if self.info.is_main:
            self.log.write({"step": self.step, **{f"val_{k}": v for k, v in metrics.items()}})
            tqdm.write(f"step {self.step} validation: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    def finish(self, started: float) -> dict[str, Any]:
        """Final validation and checkpoint (unless the last step just made them); the run's summary."""
        config, step = self.config, self.step
        if not self.already_finished:
            if self.validation is not None and (not config.val_every or step % config.val_every):
                self.val_metrics = self._validate()
            if not (config.save_every and step % config.save_every == 0 and self.last_checkpoint):
                self.last_checkpoint = self.save()
        skips = self._all_skips()
        if skips.truncated and not self.already_finished:
            self.log.write({"step": step, "captions_truncated": skips.truncated})
        self.log.close()
        skip_log = self._skip_log(skips)
        dropped = self.data.dropped_captions + skips.captions
        if self.info.is_main:
            self._print_done(skips, dropped, skip_log if skips.files else None)
        return {"steps": step, "epoch": self.epoch, "seconds": time.perf_counter() - started,
                "final_loss": self.loss if math.isfinite(self.loss) else None, "skipped": skips.totals(),
                "skipped_files": skipped_by_reason(skips.files), "skip_log": str(skip_log) if skip_log else None,
                "captions_dropped": dict(dropped), "captions_truncated": skips.truncated,
                "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
                "validation": self.val_metrics, "already_finished": self.already_finished,
                "precision": self.config.precision, "step_gflop": self.step_gflop}

    def _print_done(self, skips: SkipCounter, dropped: Counter, skip_log: Path | None) -> None:
        if self.already_finished:
            tqdm.write(f"already finished: {self.last_checkpoint} is step {self.step} of {self.total_steps}; "
                       "nothing to train (to train on, raise --steps with --resume-override steps)")
        truncated = skips.truncated
        cut = f"; captions cut to the {self.model.context_length}-token context: {truncated}" if truncated else ""
        listed = f" (listed in {skip_log})" if skip_log else ""
        tqdm.write(f"done: {self.step} steps; skipped samples: {skips.report_total() or 'none'}{listed}; "
                   f"dropped captions: {_counts(dropped) or 'none'}{cut}")


def _restored_skips(saved: Any, info: DistInfo) -> SkipCounter:
    """This rank's skip counts from a checkpoint: its own entry; all of them on rank 0 if the world size changed."""
    if isinstance(saved, dict):  # checkpoints before every rank's counts were kept
        saved = [saved]
    if len(saved) == info.world_size:
        return SkipCounter.merged([saved[info.rank]])
    return SkipCounter.merged(saved if info.is_main else [])


def _counts(counter: Counter) -> str:
    return ", ".join(f"{reason} {count}" for reason, count in sorted(counter.items()))



def _resolve_precision(precision: str, info: DistInfo) -> PrecisionChoice:
    """The run's precision on its device; under torchrun every rank takes rank 0's (a probe may time differently)."""
    choice = resolve_precision(precision, info.device)
    if info.world_size <= 1 or precision != "auto":
        return choice
    return broadcast_object(choice)


def _dist_info(device: str) -> DistInfo:
    """Rank and device: `device` in one process; under torchrun cuda:LOCAL_RANK when CUDA is visible, else the CPU."""
    if device.strip().lower() == "auto":
        return init_distributed()
    chosen = resolve_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistInfo(device=chosen)
    native = "cuda" if torch.cuda.is_available() else "cpu"
    if chosen.type != native or chosen.index is not None:
        raise ConfigError(f"device {device!r} under torchrun: each process trains on "
                          f"{'its own cuda:LOCAL_RANK' if native == 'cuda' else 'the CPU'}; pass --device {native}")
    return init_distributed()


