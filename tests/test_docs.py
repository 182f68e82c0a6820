"""The front door: README <-> CI agreement, the kernels page is the spec, the docs build cleanly."""

import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SPEC = ROOT.parent / "shared" / "spec" / "attnax_kernels.rst"


def readme_commands() -> list[str]:
  """The commands of the README's ```bash blocks, in order."""
  blocks = re.findall(r"^```bash\n(.*?)^```", (ROOT / "README.md").read_text(), re.M | re.S)
  return [line for block in blocks for line in block.splitlines() if line.strip()]


def test_readme_starts_with_demo_and_test_commands():
  demo, test = readme_commands()[:2]
  assert demo.startswith("bash scripts/setup.sh && ") and "examples/quickstart.py" in demo
  assert test.startswith("bash scripts/setup.sh && ") and "-m pytest" in test


def test_ci_runs_the_readme_test_command_verbatim():
  ci = (ROOT / ".ci" / "run").read_text()
  (cmd,) = re.findall(r"^TEST_CMD=(.*)$", ci, re.M)
  assert shlex.split(cmd)[0] == readme_commands()[1]


@pytest.mark.skipif(not SPEC.exists(), reason="../shared/spec is not beside this checkout")
def test_kernels_page_is_the_spec_verbatim():
  assert (ROOT / "docs" / "kernels.rst").read_text() == SPEC.read_text()


def test_docs_build_without_warnings(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-N", "-E", "-b", "html",
       str(ROOT / "docs"), str(tmp_path / "html")],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  warnings = [l for l in proc.stderr.splitlines() if "WARNING" in l or "ERROR" in l]
  if proc.returncode:
    pytest.fail("sphinx-build -W failed:\n" + "\n".join(warnings or [proc.stderr]), pytrace=False)
