"""`--device`: resolved once, a GPU that is not there refused with what torch can see."""
from __future__ import annotations

import pytest
import torch

from clipforge.cli.main import main
from clipforge.device import resolve_device

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


def test_cpu_and_auto():
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(" CPU ") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert resolve_device("auto").type == expected


@no_gpu
def test_a_missing_gpu_is_refused_naming_the_torch_build():
    with pytest.raises(ValueError, match=r"device 'cuda:1': no CUDA GPU is visible \(torch .*\)"):
        resolve_device("cuda:1")


def test_unknown_devices_are_refused():
    for spec in ("tpu", "gpu0", "meta"):
        with pytest.raises(ValueError, match="use cpu, cuda, cuda:N, mps or auto"):
            resolve_device(spec)


@no_gpu
def test_cli_device_flag(fixtures_dir, capsys):
    folder = fixtures_dir / "openai-vit-tiny"
    args = ["classify", str(folder / "image0.png"), "--model", str(folder / "openai_state_dict.pt"), "--labels",
            "cat,dog", "--head-width", "64", "--quick-gelu", "--json"]
    assert main([*args, "--device", "cpu"]) == 0 and '"top"' in capsys.readouterr().out
    assert main([*args, "--device", "cuda"]) == 2
    assert "no CUDA GPU is visible" in capsys.readouterr().err
