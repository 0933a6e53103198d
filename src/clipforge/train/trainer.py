"""The training loop: data, schedule, logging, validation, checkpoints and exact resume."""
from __future__ import annotations

import dataclasses
import json
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
from clipforge.loss import ContrastiveLoss, SigLIPLoss
from clipforge.model import list_models
from clipforge.train import checkpoints, optim
from clipforge.train.config import TrainConfig
from clipforge.train.data import build_train_data, build_val_data
from clipforge.distributed import DistInfo, barrier, init_distributed
from clipforge.train.models import build_model_and_tokenizer
from clipforge.train.step import TrainStep, lock_tower, train_mode
from clipforge.train.validate import ZeroShotProbe, validate
from clipforge.errors import TrainingDiverged


def build_loss(config: TrainConfig) -> torch.nn.Module:
    """The loss named by the config (never inferred from the model)."""
    if config.loss == "siglip":
        return SigLIPLoss()
    return ContrastiveLoss(chunk_size=config.loss_chunk_size or None)


class MetricsLog:
    """metrics.jsonl per step, plus TensorBoard when it is installed (rank 0 only)."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.handle = open(run_dir / "metrics.jsonl", "a") if enabled else None
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except (ImportError, ModuleNotFoundError):
                self.tb = None

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (and mirror scalars to TensorBoard)."""
        if not self.enabled:
            return
        # JSON has no NaN/inf: such values (e.g. top-5 with fewer than 5 classes) are written as null.
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.handle.write(json.dumps(record, allow_nan=False) + "\n")
        self.handle.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        """Flush and close the files."""
        if self.handle:
            self.handle.close()
        if self.tb is not None:
            self.tb.close()


def _fp32_state_dict(model: torch.nn.Module, step: TrainStep) -> dict[str, torch.Tensor]:
    """Model weights for saving: the fp32 master values in bf16 mode."""
    masters = {id(p): m for p, m in zip(step.trainable, step.master or [])}
    return {name: masters.get(id(param), param).detach().float().cpu().contiguous()
            for name, param in model.named_parameters()} | {
        name: buf.detach().cpu().contiguous() for name, buf in model.named_buffers()
        if not name.endswith(("num_batches_tracked", "attn_mask", "position_ids"))}


def train(config: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a training run; returns a summary dict. Only rank 0 writes files."""
    config.validate()
    info: DistInfo = init_distributed()
    run_dir = Path(config.output_dir)
    resume_from = checkpoints.resolve_resume(run_dir, config.resume) if config.resume else None
    torch.manual_seed(config.seed)
    random.seed(config.seed)

    model, tokenizer = build_model_and_tokenizer(config, resume_from)
    if config.loss == "siglip" and resume_from is None and config.model in list_models() \
            and "logit_scale_init" not in config.model_overrides:
        with torch.no_grad():  # SigLIP's initial temperature (log 10), not CLIP's log(1/0.07)
            model.logit_scale.fill_(SigLIPLoss.SIGLIP_INIT_LOGIT_SCALE)
    model.to(info.device)
    if config.grad_checkpointing:
        model.set_grad_checkpointing(True)
    for tower, locked in (("image", config.lock_image), ("text", config.lock_text)):
        if locked:
            lock_tower(model, tower)
    loss_fn = build_loss(config).to(info.device)
    if resume_from is not None and config.loss == "siglip":
        loss_fn.load_state_dict(checkpoints.load_train_state(resume_from)["loss"])
    locked = tuple(t for t, on in (("image", config.lock_image), ("text", config.lock_text)) if on)
    train_mode(model, locked)

    transform = TrainTransform(model.image_size, scale=(config.aug_scale_min, 1.0), composite_white=config.composite_white,
                               color_jitter=config.aug_color_jitter, grayscale_prob=config.aug_grayscale)
    data = build_train_data(config, transform, tokenizer, info)
    total_steps = config.steps or config.epochs * data.steps_per_epoch
    step_fn = TrainStep(model, loss_fn, config.precision, config.accum_steps, config.grad_clip, info)
    optimizer = optim.build_optimizer(_groups(model, loss_fn, step_fn, config.weight_decay), config.lr,
                                      (config.beta1, config.beta2), config.eps)
    step, epoch = 0, 0
    if resume_from is not None:
        state = checkpoints.load_train_state(resume_from)
        optimizer.load_state_dict(state["optimizer"])
        step, epoch = state["step"], state["epoch"]
        data.loader.load_state_dict(state["data"])
        data.skips.load_state_dict(state.get("skipped", {}))
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoints.write_json(run_dir / "config.json", dataclasses.asdict(config))
    log = MetricsLog(run_dir, info.is_main)
    if data.dropped_captions:  # reported like image skips: in the log, metrics.jsonl and the summary
        log.write({"step": step, "captions_dropped": dict(data.dropped_captions)})
        if info.is_main:
            tqdm.write(f"dropped captions (their images keep a good one): {_counts(data.dropped_captions)}")
    eval_transform = EvalTransform(model.image_size, composite_white=config.composite_white)
    # Checkpoints record the transparency rule the model was trained with, so clipforge.load applies it.
    preprocess = dataclasses.replace(model.preprocess_config, composite_white=config.composite_white)
    val_data = build_val_data(config, eval_transform, tokenizer) if config.val_data else None
    if config.val_zeroshot and info.is_main:
        probe = ZeroShotProbe(config.val_zeroshot, config.val_zeroshot_styles, config.val_zeroshot_split,
                              config.val_zeroshot_templates, eval_transform, tokenizer)
        val_data = Validation(val_data, probe)
    elif val_data is not None:
        val_data = Validation(val_data, None)
    elif config.val_zeroshot:
        val_data = Validation(None, None)  # other ranks only keep the schedule of validation calls

    def save() -> Path | None:
        state = {"step": step, "epoch": epoch, "data": data.loader.state_dict(), "optimizer": optimizer.state_dict(),
                 "loss": loss_fn.state_dict(), "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                 "skipped": data.skips.state_dict(), "config": dataclasses.asdict(config)}
        path = None
        if info.is_main:
            weights = _fp32_state_dict(model, step_fn)
            path = checkpoints.save_checkpoint(
                run_dir, step, lambda d: write_clipforge_dir(d, weights, model.config, tokenizer, preprocess), state,
                config.keep_last)
        barrier(info)
        return path

    steps_this_run, last_checkpoint, val_metrics = 0, None, {}
    bar = tqdm(total=total_steps, initial=step, disable=not info.is_main, dynamic_ncols=True, desc="train")
    started = time.perf_counter()
    while step < total_steps and not (config.max_steps_this_run and steps_this_run >= config.max_steps_this_run):
        data.loader.set_epoch(epoch)
        for batch in data.loader:
            data.skips.update(batch)
            size = _common_batch_size(len(batch["pixels"]), info)
            if size == 0:
                continue  # every sample of this step was bad on some rank
            tick = time.perf_counter()
            lr = optim.warmup_cosine(step, total_steps, config.warmup, config.lr, config.min_lr)
            optim.set_lr(optimizer, lr)
            loss = _mean_over_ranks(step_fn(batch["pixels"][:size].to(info.device),
                                            batch["tokens"][:size].to(info.device)), info)
            if not math.isfinite(loss):
                bar.close()
                raise TrainingDiverged(
                    f"loss is {loss} at step {step + 1}; stopped without saving. Last good checkpoint: "
                    f"{checkpoints.list_checkpoints(run_dir)[-1] if checkpoints.list_checkpoints(run_dir) else 'none'}. "
                    "Try a lower --lr, a longer --warmup, --grad-clip 1.0 or --precision fp32.")
            optimizer.step()
            step_fn.clamp_logit_scale()
            step_fn.sync_model()
            step += 1
            steps_this_run += 1
            pairs = size * info.world_size
            record = {"step": step, "loss": loss, "lr": lr, "logit_scale": model.logit_scale.exp().item(),
                      "samples_per_s": pairs / (time.perf_counter() - tick)}
            if step % config.log_every == 0 or step == total_steps:
                log.write(record)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", pairs_s=f"{record['samples_per_s']:.0f}")
            bar.update(1)
            if val_data is not None and config.val_every and step % config.val_every == 0:
                val_metrics = _validate_and_log(model, val_data, log, step, info)
                train_mode(model, locked)
            if config.save_every and step % config.save_every == 0:
                last_checkpoint = save()
            if step >= total_steps or (config.max_steps_this_run and steps_this_run >= config.max_steps_this_run):
                break
        else:
            if info.is_main and data.skips.epoch_total():
                tqdm.write(f"epoch {epoch}: skipped {data.skips.report_epoch()}")
            data.skips.new_epoch()
            epoch += 1
            continue
        break
    bar.close()
    if val_data is not None and (not config.val_every or step % config.val_every):
        val_metrics = _validate_and_log(model, val_data, log, step, info)
    if not (config.save_every and step % config.save_every == 0 and last_checkpoint):
        last_checkpoint = save()
    log.close()
    summary = {"steps": step, "epoch": epoch, "seconds": time.perf_counter() - started, "final_loss": loss if step else None,
               "skipped": data.skips.totals(), "captions_dropped": dict(data.dropped_captions + data.skips.captions),
               "checkpoint": str(last_checkpoint) if last_checkpoint else None,
               "validation": val_metrics}
    if info.is_main:
        tqdm.write(f"done: {step} steps; skipped samples: {data.skips.report_total() or 'none'}; "
                   f"dropped captions: {_counts(data.dropped_captions + data.skips.captions) or 'none'}")
    return summary


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


def _groups(model: torch.nn.Module, loss_fn: torch.nn.Module, step_fn: TrainStep, weight_decay: float) -> list[dict]:
    """Weight-decay groups over what the optimizer updates (fp32 masters in bf16 mode)."""
    named = [(n, p) for n, p in list(model.named_parameters()) + list(loss_fn.named_parameters()) if p.requires_grad]
    targets = step_fn.optim_params()
    decay, no_decay = [], []
    for (name, param), target in zip(named, targets):
        (no_decay if param.ndim < 2 or "logit_" in name else decay).append(target)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Validation:
    """The held-out pairs (loss, R@1) and/or a zero-shot probe, run together."""

    def __init__(self, pairs: Any, zeroshot: ZeroShotProbe | None) -> None:
        self.pairs, self.zeroshot = pairs, zeroshot

    def __call__(self, model: torch.nn.Module, device: torch.device) -> dict[str, float]:
        metrics = validate(model, self.pairs, device) if self.pairs is not None else {}
        return {**metrics, **(self.zeroshot(model, device) if self.zeroshot is not None else {})}


def _validate_and_log(model, val_data: Validation, log: MetricsLog, step: int, info: DistInfo) -> dict[str, float]:
    metrics = val_data(model, info.device) if info.is_main else {}
    if info.is_main:
        log.write({"step": step, **{f"val_{k}": v for k, v in metrics.items()}})
        tqdm.write(f"step {step} validation: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return metrics
