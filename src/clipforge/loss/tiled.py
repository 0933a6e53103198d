"""Tiled symmetric InfoNCE: the B x B logits are only ever held one chunk x chunk block at a time.

Notation: `image`, `text` are the features of the whole (gathered) batch [N, D]; this rank owns rows
[offset, offset + rows). Its loss is

    (1/2R) * sum_{i local} (lse_j(s I_i.T_j) - s I_i.T_i) + (1/2R) * sum_{j local} (lse_i(s I_i.T_j) - s I_j.T_j)

so it needs the blocks (local rows x all columns) and (all rows x local columns). Forward keeps only
the per-row and per-column log-sum-exps; backward recomputes each block once and applies both softmaxes
to it, so each block costs one matmul forward and three backward (plain autograd: one and two).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from clipforge.errors import ConfigError

Span = tuple[int, int]


def _spans(start: int, stop: int, chunk: int) -> list[Span]:
    return [(a, min(a + chunk, stop)) for a in range(start, stop, chunk)]


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # sum(a * b) without the N x D temporary, which would be most of the tiled loss's own memory.
    return torch.dot(a.reshape(-1), b.reshape(-1))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # Softmax statistics of half-precision logits lose too much; fp32/fp64 stay as they are.
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class _TiledContrastive(torch.autograd.Function):
    """Symmetric cross-entropy of this rank's rows and columns, recomputing logit blocks in backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, offset: int, rows: int, chunk: int
    ) -> torch.Tensor:
        acc = _acc_dtype(image.dtype)
        img, txt = image.detach().to(acc), text.detach().to(acc)
        s = scale.detach().to(acc).reshape(())
        n, stop = img.shape[0], offset + rows
        # Local spans cover both this rank's rows and its columns; "outer" spans the rest of the batch.
        inner, outer = _spans(offset, stop, chunk), _spans(0, offset, chunk) + _spans(stop, n, chunk)
        lse_row = img.new_full((rows,), float("-inf"))
        lse_col = img.new_full((rows,), float("-inf"))
        for a0, a1 in inner:
            ra = slice(a0 - offset, a1 - offset)
            # Scaling the c x D operand rather than each c x c block saves a pass over every block.
            scaled = img[a0:a1] * s
            for b0, b1 in inner + outer:
                logits = torch.mm(scaled, txt[b0:b1].t())
                lse_row[ra] = torch.logaddexp(lse_row[ra], torch.logsumexp(logits, 1))
                if offset <= b0 < stop:
                    rb = slice(b0 - offset, b1 - offset)
                    lse_col[rb] = torch.logaddexp(lse_col[rb], torch.logsumexp(logits, 0))
        for a0, a1 in outer:
            scaled = img[a0:a1] * s
            for b0, b1 in inner:
                rb = slice(b0 - offset, b1 - offset)
                logits = torch.mm(scaled, txt[b0:b1].t())
                lse_col[rb] = torch.logaddexp(lse_col[rb], torch.logsumexp(logits, 0))
        positive = s * _dot(img[offset:stop], txt[offset:stop])
        loss = (lse_row.sum() + lse_col.sum()) / (2 * rows) - positive / rows
        ctx.save_for_backward(image, text, scale, lse_row, lse_col)
        ctx.offset, ctx.rows, ctx.chunk = offset, rows, chunk
        return loss.to(image.dtype)

    @staticmethod
    @once_differentiable  # backward works on detached tensors: double backward would be silently wrong
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        image, text, scale, lse_row, lse_col = ctx.saved_tensors
        offset, rows, chunk = ctx.offset, ctx.rows, ctx.chunk
        acc = lse_row.dtype
        img, txt = image.detach().to(acc), text.detach().to(acc)
        s = scale.detach().to(acc).reshape(())
        g = grad.to(acc)
        n, stop = img.shape[0], offset + rows
        inner, outer = _spans(offset, stop, chunk), _spans(0, offset, chunk) + _spans(stop, n, chunk)
        # Unscaled sums of softmax(block) @ features; the 1/2R, s and upstream factors are applied once
        # at the end, and sum(img * d_img) recovers sum(G * I T^T), the logit-scale gradient, in O(N D).
        d_img, d_txt = torch.zeros_like(img), torch.zeros_like(txt)
        for a0, a1 in inner:
            row_lse, scaled = lse_row[a0 - offset : a1 - offset, None], img[a0:a1] * s
            for b0, b1 in inner + outer:
                logits = torch.mm(scaled, txt[b0:b1].t())
                if offset <= b0 < stop:
                    col = torch.sub(logits, lse_col[None, b0 - offset : b1 - offset]).exp_()
                    weights = logits.sub_(row_lse).exp_().add_(col)
                else:
                    weights = logits.sub_(row_lse).exp_()
                d_img[a0:a1].addmm_(weights, txt[b0:b1])
                d_txt[b0:b1].addmm_(weights.t(), img[a0:a1])
        for a0, a1 in outer:
            scaled = img[a0:a1] * s
            for b0, b1 in inner:
                logits = torch.mm(scaled, txt[b0:b1].t())
                weights = logits.sub_(lse_col[None, b0 - offset : b1 - offset]).exp_()
                d_img[a0:a1].addmm_(weights, txt[b0:b1])
                d_txt[b0:b1].addmm_(weights.t(), img[a0:a1])
        coef = g / (2 * rows)
        local_img, local_txt = img[offset:stop], txt[offset:stop]
        d_scale = None
        if ctx.needs_input_grad[2]:
            # The positive logit appears in both directions: weight 2 * (1/2R) = 1/R.
            d_scale = coef * _dot(img, d_img) - (g / rows) * _dot(local_img, local_txt)
            d_scale = d_scale.reshape(scale.shape).to(scale.dtype)
        d_img.mul_(coef * s)
        d_txt.mul_(coef * s)
        positive_coef = -g * s / rows
        d_img[offset:stop].addcmul_(local_txt, positive_coef)
        d_txt[offset:stop].addcmul_(local_img, positive_coef)
        return d_img.to(image.dtype), d_txt.to(text.dtype), d_scale, None, None, None


def tiled_contrastive_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    chunk_size: int,
    offset: int = 0,
    rows: int | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE of rows [offset, offset+rows) of (gathered) features, in O(N * chunk) memory."""
    rows = image.shape[0] - offset if rows is None else rows
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
    if image.shape != text.shape or image.dim() != 2:
        raise ConfigError(f"image and text must both be [N, D], got {tuple(image.shape)} and {tuple(text.shape)}")
    if not 0 <= offset <= offset + rows <= image.shape[0] or rows < 1:
        raise ConfigError(f"local rows [{offset}, {offset + rows}) outside a batch of {image.shape[0]}")
    if not torch.is_tensor(logit_scale):
        logit_scale = torch.tensor(float(logit_scale), dtype=image.dtype, device=image.device)
    return _TiledContrastive.apply(image, text, logit_scale, offset, rows, chunk_size)
