"""Every command the README shows is one a user can type: each invocation of a mindpangu CLI in a README code
block parses (the argument parser accepts it, overrides wherever they stand), and the ones that finish in seconds
run and exit 0. Usage lines with [optional] parts are checked without those parts."""
import os
import re
import shlex

import pytest

from conftest import ROOT
import mindpangu.cli as cli


def _entry_points():
    """console-script and tools/*.py names -> the cli function they call."""
    out = {}
    for line in open(os.path.join(ROOT, "setup.py"), encoding="utf-8"):
        m = re.search(r'"(mindpangu-[\w-]+)=mindpangu\.cli:(\w+)"', line)
        if m:
            out[m.group(1)] = m.group(2)
    for name in os.listdir(os.path.join(ROOT, "tools")):
        m = re.search(r"import (\w+_main)", open(os.path.join(ROOT, "tools", name), encoding="utf-8").read())
        if m:
            out[f"tools/{name}"] = m.group(1)
    return out


ENTRY = _entry_points()


def readme_commands():
    """(entry function name, argv) for every CLI call in the README's bash blocks."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    found = []
    for block in re.findall(r"```bash\n(.*?)\n[ ]*```", readme, re.S):  # fences may be indented in lists
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s#\s.*$", "", line)           # trailing comments
            line = re.sub(r"\[[^\]]*\]", "", line)         # [optional] parts of usage lines
            for part in line.split("&&"):
                if not any(name in part for name in ENTRY):
                    continue
                words = shlex.split(part)
                for i, w in enumerate(words):
                    name = re.sub(r"^(\.venv/bin/)", "", w)
                    if name in ENTRY:
                        found.append((ENTRY[name], words[i + 1:]))
                        break
    return found


COMMANDS = readme_commands()


class _Parsed(Exception):
    pass


def test_the_readme_has_commands_for_every_entry_point_kind():
    names = {name for name, _ in COMMANDS}
    assert {"train_main", "export_main", "generate_main", "plan_main", "simulate_main", "sim_compile_main",
            "to_mindformers_main", "convert_main", "param_count_main", "ablate_main"} <= names


@pytest.mark.parametrize("name,argv", COMMANDS, ids=[f"{n}:{' '.join(a)[:60]}" for n, a in COMMANDS])
def test_readme_command_parses(monkeypatch, name, argv):
    real = cli._parse
    seen = {}

    def parse_only(p, args=None):
        seen["args"] = real(p, args)
        raise _Parsed

    monkeypatch.setattr(cli, "_parse", parse_only)
    with pytest.raises(_Parsed):
        getattr(cli, name)(argv)
    for o in getattr(seen["args"], "overrides", []) or []:
        assert "=" in o  # every positional left over is an override


def test_overrides_after_a_multi_value_option_are_overrides():
    argv = ["--config", "x.yaml", "--rank", "0", "7", "parallel_config.data_parallel=2", "--out", "a=b"]
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--rank", type=int, nargs="+")
    p.add_argument("--out")
    args = cli._parse(p, argv)
    assert args.rank == [0, 7] and args.overrides == ["parallel_config.data_parallel=2"] and args.out == "a=b"


FAST = ("param_count_main", "plan_main", "simulate_main")


@pytest.mark.parametrize("name,argv", [c for c in COMMANDS if c[0] in FAST],
                         ids=[f"{n}:{' '.join(a)[:60]}" for n, a in COMMANDS if n in FAST])
def test_fast_readme_commands_run(monkeypatch, capsys, name, argv):
    monkeypatch.chdir(ROOT)
    getattr(cli, name)(argv)  # raises SystemExit on failure
    assert capsys.readouterr().out.strip()
