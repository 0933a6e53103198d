"""Contrastive losses: references, tiled exactness and memory, distributed exactness under DDP, clamp."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import clipforge.loss
from clipforge.loss import (
    ContrastiveLoss,
    SigLIPLoss,
    clamp_logit_scale_,
    contrastive_loss,
    gather_features,
    tiled_contrastive_loss,
)

TESTS = Path(__file__).resolve().parent
SRC = Path(clipforge.loss.__file__).resolve().parents[2]
TOL = {"atol": 1e-5, "rtol": 1e-5}


def features(n: int, d: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised random (image, text) leaves; text correlated with image so the loss is not trivial."""
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=-1)
    text = F.normalize(image + torch.randn(n, d, generator=gen, dtype=torch.float64), dim=-1)
    return image.to(dtype).requires_grad_(), text.to(dtype).requires_grad_()


def loss_and_grads(fn, image: torch.Tensor, text: torch.Tensor, log_scale: float) -> list[torch.Tensor]:
    """[loss, d image, d text, d log_scale] of fn(image, text, exp(log_scale))."""
    leaves = [image.detach().clone().requires_grad_(), text.detach().clone().requires_grad_()]
    log_s = torch.tensor(log_scale, dtype=image.dtype, requires_grad=True)
    loss = fn(*leaves, log_s.exp())
    loss.backward()
    return [loss.detach(), leaves[0].grad, leaves[1].grad, log_s.grad]


def reference_contrastive(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    logits = scale * image @ text.t()
    labels = torch.arange(image.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(text @ image.t() * scale, labels)) / 2


def test_plain_loss_matches_cross_entropy_reference():
    image, text = features(32, 16)
    got = loss_and_grads(ContrastiveLoss(), image, text, math.log(1 / 0.07))
    ref = loss_and_grads(reference_contrastive, image.double(), text.double(), math.log(1 / 0.07))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.double(), b, **TOL)


def test_plain_loss_by_hand_small():
    # B=2, identical unit vectors per pair, orthogonal across pairs: logits = s * I, loss = log(1 + e^-s).
    image = torch.eye(2)
    scale = torch.tensor(3.0)
    expected = math.log(1 + math.exp(-3.0))
    assert ContrastiveLoss()(image, image.clone(), scale).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("chunk", [64, 100, 512, 1000])
@pytest.mark.parametrize("log_scale", [math.log(1 / 0.07), math.log(100.0)])
def test_tiled_matches_plain_loss_and_grads(chunk: int, log_scale: float):
    image, text = features(512, 64, seed=chunk)
    plain = loss_and_grads(ContrastiveLoss(), image, text, log_scale)
    tiled = loss_and_grads(ContrastiveLoss(chunk_size=chunk), image, text, log_scale)
    for name, a, b in zip(["loss", "image", "text", "logit_scale"], tiled, plain):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("chunk", [None, 5, 16, 64])
@pytest.mark.parametrize("world", [2, 3])
def test_local_loss_sums_to_full_batch(chunk: int | None, world: int):
    # What each rank computes on the gathered batch; the gradient summed over ranks is what the
    # gather's all_reduce hands every rank, so /world is what DDP's averaging produces.
    image, text = features(48, 8, seed=world, dtype=torch.float64)
    rows = 48 // world
    full = loss_and_grads(lambda i, t, s: contrastive_loss(i, t, s), image, text, 2.5)
    summed = loss_and_grads(
        lambda i, t, s: sum(contrastive_loss(i, t, s, r * rows, rows, chunk) for r in range(world)), image, text, 2.5
    )
    for a, b in zip(summed, full):
        torch.testing.assert_close(a / world, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("offset, rows, chunk", [(0, 6, 4), (2, 3, 2), (3, 3, 4), (0, 6, 1)])
def test_tiled_function_gradcheck(offset: int, rows: int, chunk: int):
    image, text = features(6, 3, seed=offset + rows, dtype=torch.float64)
    scale = torch.tensor(2.7, dtype=torch.float64, requires_grad=True)
    fn = lambda i, t, s: tiled_contrastive_loss(i, t, s, chunk, offset, rows)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (image, text, scale))


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor produced by any op (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_tiled_never_materialises_full_logits():
    n, d, chunk = 512, 16, 64
    image, text = features(n, d)
    log_s = torch.tensor(2.0, requires_grad=True)
    saved: list[int] = []
    with _LargestTensor() as mode, torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.append(t.numel()) or t, lambda t: t
    ):
        ContrastiveLoss(chunk_size=chunk)(image, text, log_s.exp()).backward()
    assert max(mode.largest, *saved) <= max(chunk * chunk, n * d) < n * n // 4


def test_tiled_bf16_features_follow_fp32():
    # Low-precision features: block statistics are kept in fp32, gradients come back in bf16.
    image, text = features(64, 16, seed=5)
    ref = loss_and_grads(ContrastiveLoss(), image, text, 2.0)
    got = loss_and_grads(ContrastiveLoss(chunk_size=10), image.bfloat16(), text.bfloat16(), 2.0)
    assert got[1].dtype == torch.bfloat16
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.float(), b, atol=2e-2, rtol=2e-2)


def siglip_by_hand(image: torch.Tensor, text: torch.Tensor, scale: float, bias: float) -> float:
    total = 0.0
    for i in range(image.shape[0]):
        for j in range(text.shape[0]):
            z = 1.0 if i == j else -1.0
            logit = scale * float(image[i] @ text[j]) + bias
            total += math.log1p(math.exp(-z * logit))
    return total / image.shape[0]


def test_siglip_matches_hand_reference():
    image, text = features(7, 5, dtype=torch.float64)
    loss_fn = SigLIPLoss()
    assert SigLIPLoss.model_overrides == {"logit_scale_init": pytest.approx(math.log(10)), "logit_bias_init": -10.0}
    got = loss_fn(image, text, torch.tensor(10.0, dtype=torch.float64), -10.0)
    assert got.item() == pytest.approx(siglip_by_hand(image.detach(), text.detach(), 10.0, -10.0), rel=1e-12)
    passed = loss_fn(image, text, 4.0, logit_bias=torch.tensor(1.5, dtype=torch.float64))
    assert passed.item() == pytest.approx(siglip_by_hand(image.detach(), text.detach(), 4.0, 1.5), rel=1e-12)
    assert not any(True for _ in loss_fn.parameters())  # the bias is the model's, averaged by DDP with the rest
    with pytest.raises(ValueError, match="needs a logit bias"):
        loss_fn(image, text, 4.0)
    with pytest.raises(ValueError, match="no logit bias"):  # a SigLIP model under CLIP's loss is refused
        ContrastiveLoss()(image, text, 4.0, -10.0)


def test_siglip_gradcheck():
    image, text = features(5, 3, seed=3, dtype=torch.float64)
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    loss_fn = SigLIPLoss()
    assert torch.autograd.gradcheck(lambda i, t, s, b: loss_fn(i, t, s, b), (image, text, scale, bias))


def test_not_distributed_is_identity():
    image, text = features(4, 3)
    assert gather_features(image, text) == (image, text)


def test_clamp_logit_scale():
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.logit_scale = nn.Parameter(torch.tensor(7.0))

    class Wrapper(nn.Module):  # stands in for DistributedDataParallel's .module
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    model = Model()
    clamp_logit_scale_(Wrapper(model))
    assert model.logit_scale.item() == pytest.approx(math.log(100))
    assert model.logit_scale.requires_grad and model.logit_scale.grad is None
    param = nn.Parameter(torch.tensor(1.0))
    clamp_logit_scale_(param)
    assert param.item() == 1.0  # below the cap: untouched
    clamp_logit_scale_(param, max_value=2.0)
    assert param.item() == pytest.approx(math.log(2.0))
    with pytest.raises(ValueError):
        clamp_logit_scale_(nn.Linear(2, 2))


def test_bad_arguments():
    image, text = features(4, 3)
    with pytest.raises(ValueError):
        ContrastiveLoss(chunk_size=0)
    with pytest.raises(ValueError):
        ContrastiveLoss()(image, text[:3], 1.0)


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("dist_loss")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(TESTS / "dist_loss_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("name", ["plain", "tiled", "siglip"])
@pytest.mark.integration
def test_distributed_feature_grads_match_single_process(distributed_results: list[dict], name: str):
    # Convention: on each rank the gather's backward sums every rank's contribution, so a rank's
    # feature gradient is world_size x the full-batch gradient of its rows (DDP's division by
    # world_size then makes parameter gradients exact, see the next test); the logit-scale gradient
    # and the loss are averaged over ranks, as DDP averages a replicated parameter's gradient.
    sys.path.insert(0, str(TESTS))
    import dist_loss_worker as worker

    world = len(distributed_results)
    ranks = [res[f"features/{name}"] for res in distributed_results]
    batch = worker.global_batch()
    single = worker.feature_grads(worker.make_losses()[name], batch["image"], batch["text"])
    torch.testing.assert_close(torch.stack([r["loss"] for r in ranks]).mean(), single["loss"], **TOL)
    for key in ("image", "text"):
        torch.testing.assert_close(torch.cat([r[key] for r in ranks]) / world, single[key], **TOL)
    for key in ("log_scale", "bias") if name == "siglip" else ("log_scale",):
        torch.testing.assert_close(torch.stack([r[key] for r in ranks]).mean(), single[key], **TOL)


@pytest.mark.parametrize("name", ["plain", "tiled", "siglip"])
@pytest.mark.integration
def test_distributed_ddp_grads_match_single_process(distributed_results: list[dict], name: str):
    sys.path.insert(0, str(TESTS))
    import dist_loss_worker as worker

    ranks = [res[f"model/{name}"] for res in distributed_results]
    batch = worker.global_batch()
    model = worker.TwoTowers(bias=name == "siglip")
    single = worker.model_grads(model, worker.make_losses()[name], batch["image_in"], batch["text_in"])
    torch.testing.assert_close(torch.stack([r["loss"] for r in ranks]).mean(), single["loss"], **TOL)
    for key, grad in single.items():
        if key != "loss":
            for rank in ranks:  # DDP leaves the same averaged gradient on every rank
                torch.testing.assert_close(rank[key], grad, **TOL, msg=lambda m, key=key: f"{key}: {m}")
