"""The training loop: data, schedule, logging, validation, checkpoints and exact resume."""
from __future__ import annotations

import dataclasses
import math
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from clipforge.checkpoint.io import write_clipforge_dir
from clipforge.data.transforms import EvalTransform, TrainTransform
from clipforge.distributed import DistInfo, barrier, init_distributed
from clipforge.errors import TrainingDiverged
from clipforge.loss import LOSSES
from clipforge.train import checkpoints, optim
from clipforge.train.config import TrainConfig
from clipforge.train.data import TrainData, build_train_data, build_val_data
from clipforge.train.metrics_log import MetricsLog
from clipforge.train.models import build_model_and_tokenizer
from clipforge.train.step import TrainStep
from clipforge.train.validate import Validation, ZeroShotProbe


def build_loss(config: TrainConfig) -> torch.nn.Module:
    """The loss named by the config (never inferred from the model)."""
    return LOSSES[config.loss](chunk_size=config.loss_chunk_size or None)


def train(config: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a training run; returns a summary dict. Only rank 0 writes files."""
    config.validate()
    run = TrainingRun(config)
    run.loop()
    return run.finish()


class TrainingRun:
    """One run's state — model, data, optimizer, position — and the steps that move it forward."""

    def __init__(self, config: TrainConfig) -> None:
        self.config, self.info = config, init_distributed()
        self.run_dir = Path(config.output_dir)
        resume_from = checkpoints.resolve_resume(self.run_dir, config.resume) if config.resume else None
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        self.model, self.tokenizer = build_model_and_tokenizer(config, resume_from)
        self._prepare_model()
        self.loss_fn = build_loss(config).to(self.info.device)
        transform = TrainTransform(self.model.image_size, scale=(config.aug_scale_min, 1.0),
                                   composite_white=config.composite_white, color_jitter=config.aug_color_jitter,
                                   grayscale_prob=config.aug_grayscale)
        self.data: TrainData = build_train_data(config, transform, self.tokenizer, self.info)
        self.total_steps = config.steps or config.epochs * self.data.steps_per_epoch
        self.step_fn = TrainStep(self.model, self.loss_fn, config.precision, config.accum_steps, config.grad_clip,
                                 self.info)
        self.optimizer = optim.build_optimizer(self.step_fn.optimizer_groups(config.weight_decay), config.lr,
                                               (config.beta1, config.beta2), config.eps)
        self.step = self.epoch = self.steps_this_run = 0
        self.loss = math.nan
        if resume_from is not None:
            self._restore(checkpoints.load_train_state(resume_from))
        self.log = self._open_log()
        eval_transform = EvalTransform(self.model.image_size, composite_white=config.composite_white)
        # Checkpoints record the transparency rule the model was trained with, so clipforge.load applies it.
        self.preprocess = dataclasses.replace(self.model.preprocess_config, composite_white=config.composite_white)
        self.validation = self._validation(eval_transform)
        self.last_checkpoint: Path | None = None
        self.val_metrics: dict[str, float] = {}

    def _prepare_model(self) -> None:
        """Device, activation checkpointing, locked towers, train mode."""
        self.model.to(self.info.device)
        if self.config.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        if self.config.lock_image:
            self.model.lock_image_tower()
        if self.config.lock_text:
            self.model.lock_text_tower()
        self.model.train()

    def _restore(self, state: dict[str, Any]) -> None:
        """Optimizer, position, data order, skip counts and RNGs of a checkpoint: the run continues exactly."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.data.loader.load_state_dict(state["data"])
        self.data.skips.load_state_dict(state.get("skipped", {}))
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])

    def _open_log(self) -> MetricsLog:
        """The run folder, its config.json and metrics log; dropped captions are reported like skipped images."""
        if self.info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            checkpoints.write_json(self.run_dir / "config.json", dataclasses.asdict(self.config))
        log = MetricsLog(self.run_dir, self.info.is_main)
        if self.data.dropped_captions:
            log.write({"step": self.step, "captions_dropped": dict(self.data.dropped_captions)})
            if self.info.is_main:
                tqdm.write(f"dropped captions (their images keep a good one): {_counts(self.data.dropped_captions)}")
        return log

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
                 "python_rng": random.getstate(), "skipped": self.data.skips.state_dict(),
                 "config": dataclasses.asdict(self.config)}
        path = None
        if self.info.is_main:
            weights, model, tokenizer, preprocess = self.step_fn.fp32_state_dict(), self.model, self.tokenizer, self.preprocess
            path = checkpoints.save_checkpoint(
                self.run_dir, self.step, lambda d: write_clipforge_dir(d, weights, model.config, tokenizer, preprocess),
                state, self.config.keep_last)
        barrier(self.info)
        return path

    def loop(self) -> None:
        """Epochs of batches until the run's steps (or this session's share of them) are done."""
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.info.is_main, dynamic_ncols=True,
                   desc="train")
        self.started = time.perf_counter()
        try:
            while not self._done():
                self.data.loader.set_epoch(self.epoch)
                for batch in self.data.loader:
                    self.data.skips.update(batch)
                    if self._train_step(batch, bar) and self._done():
                        break
                else:
                    self._end_epoch()
                    continue
                break
        finally:
            bar.close()

    def _done(self) -> bool:
        limit = self.config.max_steps_this_run
        return self.step >= self.total_steps or bool(limit and self.steps_this_run >= limit)

    def _end_epoch(self) -> None:
        if self.info.is_main and self.data.skips.epoch_total():
            tqdm.write(f"epoch {self.epoch}: skipped {self.data.skips.report_epoch()}")
        self.data.skips.new_epoch()
        self.epoch += 1

    def _train_step(self, batch: dict[str, Any], bar: tqdm) -> bool:
        """One optimizer step on a batch; False when every sample of it was bad on some rank."""
        config, info = self.config, self.info
        size = _common_batch_size(len(batch["pixels"]), info)
        if size == 0:
            return False
        tick = time.perf_counter()
        lr = optim.warmup_cosine(self.step, self.total_steps, config.warmup, config.lr, config.min_lr)
        optim.set_lr(self.optimizer, lr)
        self.loss = _mean_over_ranks(self.step_fn(batch["pixels"][:size].to(info.device),
                                                  batch["tokens"][:size].to(info.device)), info)
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
            self.log.write({"step": step, "loss": self.loss, "lr": lr, "logit_scale": self.model.logit_scale.exp().item(),
                            "samples_per_s": pairs_per_s})
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

    def finish(self) -> dict[str, Any]:
        """Final validation and checkpoint (unless the last step just made them); the run's summary."""
        config, step = self.config, self.step
        if self.validation is not None and (not config.val_every or step % config.val_every):
            self.val_metrics = self._validate()
        if not (config.save_every and step % config.save_every == 0 and self.last_checkpoint):
            self.last_checkpoint = self.save()
        self.log.close()
        dropped = self.data.dropped_captions + self.data.skips.captions
        if self.info.is_main:
            tqdm.write(f"done: {step} steps; skipped samples: {self.data.skips.report_total() or 'none'}; "
                       f"dropped captions: {_counts(dropped) or 'none'}")
        return {"steps": step, "epoch": self.epoch, "seconds": time.perf_counter() - self.started,
                "final_loss": self.loss if step else None, "skipped": self.data.skips.totals(),
                "captions_dropped": dict(dropped),
                "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
                "validation": self.val_metrics}


def _counts(counter: Counter) -> str:
    return ", ".join(f"{reason} {count}" for reason, count in sorted(counter.items()))


def _common_batch_size(size: int, info: DistInfo) -> int:
    """Smallest batch over ranks: skipped samples make ranks' batches differ, and gathers need equal sizes."""
    if info.world_size <= 1:
        return size
    tensor = torch.tensor([size], dtype=torch.long, device=info.device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MIN)
    return int(tensor.item())


def _mean_over_ranks(value: float, info: DistInfo) -> float:
    """Each rank's loss covers its own rows; their mean is the full-batch loss (what one process reports)."""
    if info.world_size <= 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=info.device)
    torch.distributed.all_reduce(tensor)
    return float(tensor.item()) / info.world_size
