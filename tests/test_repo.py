"""Repository facts a new user relies on."""
import os
import re

from conftest import ROOT


def test_ci_runs_the_readme_test_command():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    assert len(blocks) >= 2, "the README opens with an install+run command and a test command"
    test_cmd = blocks[1].strip()
    assert "pytest" in test_cmd
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    assert test_cmd in ci.splitlines()
