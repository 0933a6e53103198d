"""The real `clipforge` CLI, run as a subprocess."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import clipforge
from conftest import OPENAI, OPENAI_FLAGS


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipforge.cli.main", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.integration
def test_models_lists_registry():
    result = run_cli("models")
    assert result.returncode == 0 and "ViT-B-32" in result.stdout.split()


@pytest.mark.integration
def test_convert_to_hf_and_back(tmp_path, fixtures_dir):
    source = fixtures_dir / "openai-vit-tiny" / "openai_state_dict.safetensors"
    assert run_cli("convert", str(source), str(tmp_path / "hf"), "--format", "hf", *OPENAI_FLAGS).returncode == 0
    assert (tmp_path / "hf" / "config.json").is_file()
    assert run_cli("convert", str(tmp_path / "hf"), str(tmp_path / "cf")).returncode == 0
    a, _ = clipforge.load(source, **OPENAI)
    b, _ = clipforge.load(tmp_path / "cf")
    tokens = clipforge.tokenize(["a photo of a cat"])
    with torch.no_grad():
        assert (a.encode_text(tokens) - b.encode_text(tokens)).abs().max() < 1e-6


@pytest.mark.integration
def test_classify_json(fixtures_dir):
    folder = fixtures_dir / "openai-vit-tiny"
    result = run_cli("classify", str(folder / "image0.png"), str(folder / "image1.png"), "--model",
                     str(folder / "openai_state_dict.pt"), "--labels", "cat,dog,rocket", "--ensemble", "--json",
                     *OPENAI_FLAGS)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert len(rows) == 2 and abs(sum(p for _, p in rows[0]["top"]) - 1) < 1e-3


@pytest.mark.integration
def test_bad_input_gives_clear_error_and_exit_2(tmp_path):
    result = run_cli("convert", str(tmp_path / "missing.pt"), str(tmp_path / "out"))
    assert result.returncode == 2 and "missing.pt" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.integration
def test_registry_name_without_weights_is_refused(tmp_path, fixtures_dir):
    image = str(fixtures_dir / "openai-vit-tiny" / "image0.png")
    for args in (["classify", image, "--labels", "cat,dog"],
                 ["eval", "--task", "zeroshot", "--data", str(tmp_path), "--out", str(tmp_path / "out")],
                 ["index", str(tmp_path), "--out", str(tmp_path / "index")]):
        result = run_cli(*args, "--model", "cpu-vit-tiny-32")
        assert result.returncode == 2, result.stderr
        assert "without weights" in result.stderr and "--random-weights" in result.stderr
        assert "Traceback" not in result.stderr and not (tmp_path / "index").exists()
    result = run_cli("classify", image, "--labels", "cat,dog", "--model", "cpu-vit-tiny-32", "--random-weights")
    assert result.returncode == 0, result.stderr


@pytest.mark.integration
def test_help_documents_every_config_flag_from_the_field_comments():
    from clipforge.config_flags import field_comments
    from clipforge.demo.config import DemoConfig
    from clipforge.train.config import TrainConfig

    for cls in (TrainConfig, DemoConfig):  # a field without a comment would show a bare flag in --help
        assert all(field_comments(cls).values()), [k for k, v in field_comments(cls).items() if not v]
    text = " ".join(run_cli("train", "--help").stdout.split())
    assert "--lr LR peak learning rate (AdamW), reached after warmup, then cosine decay; default 0.0005" in text
    assert "--precision {fp32,bf16,auto}" in text and "--lock-text, --no-lock-text" in text
    demo = " ".join(run_cli("demo", "--help").stdout.split())
    assert "--icons-unseen {keep,remove}" in demo and "--ablation {0,1}" in demo and 'default "runs/demo"' in demo


def test_field_comments_take_the_line_comment_else_the_block_above():
    from dataclasses import dataclass

    from clipforge.config_flags import field_comments

    @dataclass
    class Example:
        plain: int = 0
        # explained above,
        # over two lines
        above: int = 1
        inline: str = "#"  # the comment, not the '#' in the default

    assert field_comments(Example) == {"plain": "", "above": "explained above, over two lines",
                                       "inline": "the comment, not the '#' in the default"}


@pytest.mark.integration
def test_version():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"clipforge {clipforge.__version__}"


@pytest.mark.integration
def test_every_flag_of_every_command_has_help_and_shows_its_default():
    import argparse

    from clipforge.cli.main import _all_parsers, build_parser

    undocumented = [(p.prog, a.dest) for p in _all_parsers(build_parser()) for a in p._actions
                    if not a.help and not isinstance(a, argparse._SubParsersAction)]
    assert not undocumented
    text = " ".join(run_cli("index", "--help").stdout.split())
    assert "--batch-size BATCH_SIZE images per forward pass (default: 64)" in text
    assert "(default: None)" not in text


@pytest.mark.integration
def test_unknown_flag_is_refused_by_its_subcommand_with_the_close_match(capsys):
    from clipforge.cli.main import main

    result = run_cli("train", "--batchsize", "16")
    assert result.returncode == 2 and result.stderr.startswith("usage: clipforge train [-h]")
    assert ("clipforge train: error: unrecognized arguments: --batchsize (did you mean --batch-size?) 16"
            in result.stderr)
    for argv, usage, error in (
            (["search", "index", "--topk", "3"], "usage: clipforge search [-h]",
             "clipforge search: error: unrecognized arguments: --topk (did you mean --top-k?) 3"),
            (["export", "onnx", "model", "out", "--in8"], "usage: clipforge export onnx [-h]",
             "clipforge export onnx: error: unrecognized arguments: --in8 (did you mean --int8?)"),
            (["models", "--pretraind=yes", "extra"], "usage: clipforge models [-h]",
             "clipforge models: error: unrecognized arguments: --pretraind=yes (did you mean --pretrained?) extra"),
            (["train", "--zzz"], "usage: clipforge train [-h]",
             "clipforge train: error: unrecognized arguments: --zzz\n")):
        with pytest.raises(SystemExit) as exit:
            main(argv)
        stderr = capsys.readouterr().err
        assert exit.value.code == 2 and stderr.startswith(usage) and error in stderr, stderr
