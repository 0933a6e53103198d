"""`precision="auto"`: explicit values pass through, auto follows the capability queries and the cached probe,
training records the resolved value (and `--config RUN/config.json` repeats it bit-exactly), commands take it."""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import clipforge
import clipforge.precision as precision
from clipforge.cli.main import build_parser, main
from clipforge.errors import ConfigError, TrainingError
from clipforge.inference.features import autocast_context
from clipforge.precision import resolve_precision
from clipforge.train import checkpoints
from clipforge.train.config import TrainConfig
from clipforge.train.trainer import train
from synthetic import make_caption_set

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch) -> Path:
    """Each test its own probe cache folder and no probe result remembered from another test."""
    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(precision, "_MEASURED", {})
    return tmp_path / "cache" / precision.CACHE_FILE


def cpu_kind(monkeypatch, amx: bool, avx512_bf16: bool, speedup: float | None = None) -> list[int]:
    """Make torch report this CPU kind; the probe (if reached) returns `speedup`. Returns the probe's call log."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    calls: list[int] = []

    def probe() -> tuple[float, float]:
        calls.append(1)
        assert speedup is not None, "the probe ran where a capability query decides"
        return 0.010 * speedup, 0.010

    monkeypatch.setattr(precision, "measure_matmul_seconds", probe)
    return calls


@pytest.mark.parametrize("value", ["fp32", "bf16"])
@pytest.mark.parametrize("amx", [False, True])
def test_explicit_precision_passes_through(monkeypatch, value, amx):
    calls = cpu_kind(monkeypatch, amx=amx, avx512_bf16=amx)
    choice = resolve_precision(value, CPU)
    assert (choice.asked, choice.precision, choice.reason) == (value, value, "asked") and not calls


def test_unknown_precision_is_refused():
    with pytest.raises(ConfigError, match="fp16"):
        resolve_precision("fp16", CPU)


def test_auto_picks_bf16_on_amx_and_fp32_without_native_bf16(monkeypatch):
    calls = cpu_kind(monkeypatch, amx=True, avx512_bf16=True)
    choice = resolve_precision("auto", CPU)
    assert (choice.precision, choice.reason) == ("bf16", "AMX tiles")
    assert choice.describe() == "precision auto -> bf16 (AMX tiles)"
    calls = cpu_kind(monkeypatch, amx=False, avx512_bf16=False)
    choice = resolve_precision("auto", CPU)
    assert choice.precision == "fp32" and "AVX512-BF16 absent" in choice.reason and not calls


@pytest.mark.parametrize("speedup, expected", [(2.0, "bf16"), (0.65, "fp32"), (1.1, "fp32")])
def test_auto_without_amx_follows_the_probe(monkeypatch, speedup, expected):
    cpu_kind(monkeypatch, amx=False, avx512_bf16=True, speedup=speedup)
    choice = resolve_precision("auto", CPU)
    assert choice.precision == expected and choice.speedup == pytest.approx(speedup)
    assert f"{speedup:.2f}x fp32" in choice.reason and "cached" not in choice.reason


def test_the_probe_is_cached_per_machine_and_reused(monkeypatch, fresh_cache):
    calls = cpu_kind(monkeypatch, amx=False, avx512_bf16=True, speedup=1.9)
    resolve_precision("auto", CPU)
    entries = json.loads(fresh_cache.read_text())
    key = precision.machine_key()
    assert list(entries) == [key] and entries[key]["speedup"] == pytest.approx(1.9)
    assert f"threads {torch.get_num_threads()}" in key and torch.__version__ in key
    monkeypatch.setattr(precision, "_MEASURED", {})  # a new process: only the file remembers
    again = resolve_precision("auto", CPU)
    assert len(calls) == 1 and again.precision == "bf16" and "cached probe" in again.reason


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"KEY": {"speedup": "fast"}}', ""])
def test_a_corrupt_cache_is_measured_again_and_rewritten(monkeypatch, fresh_cache, content):
    fresh_cache.parent.mkdir(parents=True)
    fresh_cache.write_text(content.replace("KEY", precision.machine_key()))
    calls = cpu_kind(monkeypatch, amx=False, avx512_bf16=True, speedup=0.65)
    assert resolve_precision("auto", CPU).precision == "fp32" and len(calls) == 1
    assert json.loads(fresh_cache.read_text())[precision.machine_key()]["speedup"] == pytest.approx(0.65)


def test_an_unwritable_cache_is_not_fatal(monkeypatch, tmp_path):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path / "file"))  # a file where the folder should be
    cpu_kind(monkeypatch, amx=False, avx512_bf16=True, speedup=2.0)
    assert resolve_precision("auto", CPU).precision == "bf16"


def fake_cuda(monkeypatch, native: bool, emulated: bool) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: emulated if including_emulation else native)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_on_cuda_follows_the_gpus_bf16_support(monkeypatch, native, expected):
    fake_cuda(monkeypatch, native=native, emulated=True)
    choice = resolve_precision("auto", torch.device("cuda", 0))
    assert choice.precision == expected and "Tesla T4" in choice.reason


def test_bf16_on_a_gpu_without_it_is_refused_naming_the_gpu(monkeypatch):
    fake_cuda(monkeypatch, native=False, emulated=False)
    with pytest.raises(ConfigError, match="Tesla T4"):
        resolve_precision("bf16", torch.device("cuda", 0))
    assert resolve_precision("fp32", torch.device("cuda", 0)).precision == "fp32"


def test_auto_on_mps_is_fp32(monkeypatch):
    calls = cpu_kind(monkeypatch, amx=True, avx512_bf16=True)
    assert resolve_precision("auto", torch.device("mps")).precision == "fp32" and not calls


def test_autocast_context_resolves_auto(monkeypatch):
    cpu_kind(monkeypatch, amx=True, avx512_bf16=True)
    with autocast_context(CPU, "auto"):
        assert torch.is_autocast_enabled("cpu")
    cpu_kind(monkeypatch, amx=False, avx512_bf16=False)
    with autocast_context(CPU, "auto"):
        assert not torch.is_autocast_enabled("cpu")


# Training: the resolved value is recorded, repeated by --config, and compared on resume.

@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    make_caption_set(root, per_concept=1, seed=0)
    return root


def config(root: Path, out: Path, **overrides) -> TrainConfig:
    base = dict(model="cpu-vit-tiny-32", train_data=str(root / "train.csv"), batch_size=8, workers=0,
                output_dir=str(out), warmup=1, lr=1e-3, seed=0, steps=2, precision="auto")
    return TrainConfig(**{**base, **overrides})


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoints.resolve_resume(run, "latest") / "model.safetensors")


def test_training_records_the_resolved_precision_and_config_repeats_it_exactly(monkeypatch, shapes, tmp_path):
    cpu_kind(monkeypatch, amx=True, avx512_bf16=True)
    run = tmp_path / "auto"
    summary = train(config(shapes, run))
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["precision"] == "bf16" and summary["precision"] == "bf16"
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"asked": "auto", "resolved": "bf16", "reason": "AMX tiles", "bf16_speedup": None} in [
        row.get("precision") for row in logged]
    again = tmp_path / "again"  # a fresh process, no mocks: the record says bf16, so bf16 it is
    result = subprocess.run([sys.executable, "-m", "clipforge.cli.main", "train", "--config", str(run / "config.json"),
                             "--output-dir", str(again)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((again / "config.json").read_text()) == {**recorded, "output_dir": str(again)}
    first, second = weights(run), weights(again)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_resume_with_auto_is_accepted_when_it_resolves_to_the_record(monkeypatch, shapes, tmp_path):
    cpu_kind(monkeypatch, amx=True, avx512_bf16=True)
    run = tmp_path / "run"
    train(config(shapes, run, max_steps_this_run=1))
    assert train(config(shapes, run, resume="latest"))["steps"] == 2
    cpu_kind(monkeypatch, amx=False, avx512_bf16=False)  # another kind of machine: auto means fp32 there
    with pytest.raises(TrainingError, match=r'precision \(--precision\): recorded "bf16", given "fp32" '
                                            r"\(--precision auto on this machine\)"):
        train(config(shapes, run, resume="latest"))


# Commands: --precision on every command that embeds, the choice on stderr, the index records what auto chose.

@pytest.mark.parametrize("command", [["classify", "x.png", "--model", "m", "--labels", "a"],
                                     ["eval", "--model", "m", "--task", "zeroshot", "--data", "d"],
                                     ["index", "src", "--model", "m", "--out", "o"], ["search", "idx", "a cat"],
                                     ["serve", "idx"]])
def test_every_embedding_command_takes_precision_auto_with_fp32_default(command):
    parser = build_parser()
    assert parser.parse_args(command).precision == "fp32"
    assert parser.parse_args([*command, "--precision", "auto"]).precision == "auto"


def test_index_and_search_resolve_auto_and_say_so(monkeypatch, tmp_path, capsys):
    cpu_kind(monkeypatch, amx=True, avx512_bf16=True)
    model = tmp_path / "tiny"
    clipforge.save_pretrained(clipforge.create_model("cpu-vit-tiny-32", seed=0), model)
    make_caption_set(tmp_path / "data", per_concept=1, name="captions.csv")
    out = tmp_path / "index"
    assert main(["index", str(tmp_path / "data" / "images"), "--model", str(model), "--out", str(out),
                 "--precision", "auto", "--device", "cpu", "--quiet", "--workers", "0"]) == 0
    assert "precision auto -> bf16 (AMX tiles)" in capsys.readouterr().err
    assert json.loads((out / "manifest.json").read_text())["precision"] == "bf16"
    assert main(["search", str(out), "a red circle", "-k", "1", "--precision", "auto", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("precision auto -> bf16") == 1 and captured.out.strip()
