"""Shared test helpers: reference fixtures, tiny models, the open_clip reference package; and the session stops
at once when a package pyproject.toml requires (dependencies, the test extra) is missing or too old.

Reference fixtures (tests/golden.py): the `golden` tests take `reference`, parametrised over the in-repo
cut of the reference fixtures (tests/fixtures/golden/, always there) and, as extra cases, every model of
the shared fixtures when they are found (CLIPFORGE_SHARED_FIXTURES, default ../shared/fixtures; set it
to `none` to leave them out). Tests that only need an OpenAI-layout checkpoint and its images take
`fixtures_dir`: the in-repo cut, rebuilt in the shared layout.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sys
from pathlib import Path
from typing import Iterable

import pytest
import torch
from packaging.requirements import Requirement

import golden

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: pip vendors the same parser
    from pip._vendor import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
# The reference fixtures are bare OpenAI-layout state dicts: OpenAI's 64-wide heads and QuickGELU (their README).
OPENAI = {"head_width": 64, "quick_gelu": True}
OPENAI_FLAGS = ("--head-width", "64", "--quick-gelu")


def reference_cases() -> list[tuple[str, str]]:
    """(source, model name) of every reference model: the in-repo ones, then the shared ones if found."""
    cases = [("repo", name) for name in golden.golden_names()]
    shared = golden.shared_root()
    if shared is not None:
        cases += [("shared", name) for name in golden.model_names(shared)]
    return cases


def required_packages(pyproject: Path = REPO / "pyproject.toml") -> list[str]:
    """pyproject's [project] dependencies and the test extra's, with the extras it names (clipforge[onnx,export])."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    extras, found = project.get("optional-dependencies", {}), list(project["dependencies"])
    pending, seen = ["test"], set()
    while pending:
        extra = pending.pop()
        seen.add(extra)
        for line in extras.get(extra, []):
            requirement = Requirement(line)
            if requirement.name == project["name"]:
                pending += sorted(requirement.extras - seen)
            else:
                found.append(line)
    return found


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def missing_packages(requirements: Iterable[str]) -> list[str]:
    """The requirements not met here: a package not installed, too old, or without its modules, each with why."""
    modules: dict[str, list[str]] = {}
    for module, distributions in importlib.metadata.packages_distributions().items():
        for distribution in distributions:
            modules.setdefault(_normalise(distribution), []).append(module)
    problems = []
    for line in requirements:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue  # not for this platform or Python
        try:
            version = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{line}: not installed")
            continue
        if not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{line}: {version} is installed")
        # Some wheels list paths as top-level names (sentencepiece: "sentencepiece/__init__"): read them as modules.
        names = [m.replace("/", ".").removesuffix(".__init__") for m in modules.get(_normalise(requirement.name), [])]
        lost = [m for m in names if importlib.util.find_spec(m) is None]
        if lost:
            problems.append(f"{line}: installed, but its module(s) {', '.join(lost)} cannot be found")
    return problems


def require_packages(requirements: Iterable[str]) -> None:
    """Stop the test session, naming each requirement that is not met (a missing package must not become skips)."""
    problems = missing_packages(requirements)
    if problems:
        pytest.exit("required packages missing (pip install -e '.[test]' installs them):\n  " + "\n  ".join(problems),
                    returncode=pytest.ExitCode.USAGE_ERROR)


def pytest_sessionstart(session: pytest.Session) -> None:
    # Checked, not imported: importing them all costs about 5 s a session, and a module that is there but fails
    # to import fails the tests that import it (plainly, never through importorskip).
    require_packages(required_packages())


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "reference" in metafunc.fixturenames:
        cases = reference_cases()
        metafunc.parametrize("reference", cases, ids=[f"{s}-{n}" for s, n in cases], indirect=True)


def pytest_report_header(config: pytest.Config) -> str:
    shared = golden.shared_root()
    extra = f"and shared {shared}" if shared else f"only (no shared fixtures; {golden.SHARED_ENV}=<dir> adds them)"
    return f"reference fixtures: in-repo {golden.GOLDEN.relative_to(REPO)} {extra}"


@pytest.fixture(scope="session")
def fixtures_dir(tmp_path_factory) -> Path:
    """The in-repo reference models rebuilt in the shared layout: <dir>/openai-vit-tiny/openai_state_dict.*"""
    root = tmp_path_factory.mktemp("golden")
    for name in golden.golden_names():
        golden.materialise(name, root)
    return root


@pytest.fixture
def reference(request, fixtures_dir) -> golden.Reference:
    """One reference model folder with its recorded outputs (parametrised by pytest_generate_tests)."""
    source, name = request.param
    root = fixtures_dir if source == "repo" else golden.shared_root()
    return golden.Reference(source, name, root / name)


def random_tokens(batch: int, length: int, lengths: list[int], vocab: int = 49408, seed: int = 0) -> torch.Tensor:
    """SOT + random ids + EOT (the highest id) + zero padding, one row per entry of `lengths`."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(batch, length, dtype=torch.long)
    for row, n in enumerate(lengths):
        tokens[row, 0] = vocab - 2
        tokens[row, 1 : n + 1] = torch.randint(1, vocab - 2, (n,), generator=gen)
        tokens[row, n + 1] = vocab - 1
    return tokens


def perturb_(module: torch.nn.Module, seed: int = 0, scale: float = 0.02) -> torch.nn.Module:
    """Add noise to every parameter and float buffer so a wrong weight mapping cannot pass by accident."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]:
            tensor.add_(scale * torch.randn(tensor.shape, generator=gen, dtype=tensor.dtype))
    return module


class _Unused(type):
    """A stand-in for every torchvision name open_clip imports: any attribute is the class itself."""

    def __getattr__(cls, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return cls


@pytest.fixture
def open_clip_package():
    """The real open_clip package (factory, model code), imported with torchvision's names stubbed.

    open_clip_torch is installed --no-deps (scripts/setup.sh) and imports torchvision for its image
    transforms; `create_model` never calls them (preprocessing is clipforge's, checked elsewhere), so each
    torchvision name it imports is a placeholder class here. open_clip and the stubs are dropped afterwards.
    """
    import importlib
    import importlib.util
    import sys
    import types

    if importlib.util.find_spec("open_clip") is None:
        pytest.skip("open_clip_torch is not installed (scripts/setup.sh installs it --no-deps)")
    import transformers  # noqa: F401  (open_clip imports it; it must not see the stub below)

    before = set(sys.modules)
    if importlib.util.find_spec("torchvision") is None:
        placeholder = _Unused("Placeholder", (), {"__init__": lambda self, *a, **k: None})
        for name in ("torchvision", "torchvision.ops", "torchvision.ops.misc", "torchvision.transforms",
                     "torchvision.transforms.functional"):
            module = types.ModuleType(name)
            module.__getattr__ = lambda attr: placeholder if not attr.startswith("__") else _missing(attr)
            sys.modules[name] = module
    try:
        yield importlib.import_module("open_clip")
    finally:
        # Only open_clip and the stubs go: a compiled module it pulled in (numpy.fft, ...) cannot be loaded twice
        # in one process, so dropping those made the next test that imports open_clip fail.
        for name in set(sys.modules) - before:
            if name.split(".")[0] in ("open_clip", "torchvision"):
                del sys.modules[name]


def _missing(name: str) -> None:
    raise AttributeError(name)


@pytest.fixture(scope="session")
def spiece_model(tmp_path_factory):
    """A small SentencePiece unigram model trained on text with accents, Korean and emoji (SigLIP's file kind)."""
    sentencepiece = pytest.importorskip("sentencepiece")
    import io

    corpus = ["a photo of a cat", "a dog on the grass", "café crème brûlée", "고양이 얼굴 귀여운 고양이", "🐱 🐶 emoji",
              "an astronaut riding a horse", "the quick brown fox jumps over the lazy dog", "ångström ünïcödé"] * 40
    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=buffer, vocab_size=150,
                                             model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                             character_coverage=1.0, hard_vocab_limit=False)
    path = tmp_path_factory.mktemp("spiece") / "spiece.model"
    path.write_bytes(buffer.getvalue())
    return path
