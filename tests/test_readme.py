"""The README's commands run as written: each `python -m qprune ...` composes and validates (every job of a
sweep, as Hydra will run it), reproduce.py's runs too, and the test command is the one CI runs."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from helpers import load_script
from qprune.aggregate import arguments as aggregate_arguments
from qprune.preflight import check_command

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def readme_commands(text: str) -> list[list[str]]:
    """Every command in the README's ```bash blocks, split as the shell would (comments dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                argv = shlex.split(part, comments=True)
                if argv:
                    commands.append(argv)
    return commands


COMMANDS = readme_commands(README.read_text())


def reproduce_dry_run(args: list[str]) -> list[list[str]]:
    """The `python -m qprune` runs scripts/reproduce.py would start (its --dry-run prints them)."""
    module = load_script("reproduce")
    own, rest = (args[: args.index("--")], args[args.index("--"):]) if "--" in args else (args, [])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert module.main([*own, "--dry-run", *rest]) == 0
    return [line.split()[3:] for line in printed.getvalue().splitlines() if line.startswith("+ -m qprune ")]


def test_the_readme_is_short_and_has_commands():
    assert len(README.read_text().splitlines()) <= 150, "reference material belongs in docs/"
    assert sum(argv[:3] == ["python", "-m", "qprune"] for argv in COMMANDS) >= 5


@pytest.mark.parametrize("argv", COMMANDS, ids=[" ".join(a)[:60] for a in COMMANDS])
def test_every_readme_command_runs_as_written(argv, data_root, monkeypatch):
    monkeypatch.setenv("QPRUNE_DATA", str(data_root))   # the README's `export QPRUNE_DATA=...`
    if argv[:3] == ["python", "-m", "qprune"]:
        plan = check_command(argv[3:])
        if "--help" not in argv:
            assert plan is not None and plan.jobs and all(j.config["data"]["root"] == str(data_root) for j in plan.jobs)
    elif argv[:2] == ["python", "scripts/reproduce.py"]:
        runs = reproduce_dry_run(argv[2:])
        assert runs
        for run in runs:
            assert check_command(run) is not None
    elif argv[:2] == ["python", "scripts/aggregate.py"]:
        args = aggregate_arguments().parse_args(argv[2:])
        assert args.out is not None or len(args.dirs) == 1
    elif argv[0] == "export":
        name, value = argv[1].split("=", 1)
        assert name in ("QPRUNE_DATA", "OMP_NUM_THREADS")
        if name == "QPRUNE_DATA":   # relative to the checkout: where the tests find the data too
            assert (REPO / value).resolve() == (REPO.parent / "shared" / "data").resolve()
    elif argv[:2] == ["python", "-m"]:
        assert argv[2] in ("venv", "pytest")
    elif argv[0] in ("pip", "wandb", "."):
        assert argv[:2] in (["pip", "install"], ["wandb", "sync"], ["wandb", "login"], [".", ".venv/bin/activate"])
    else:
        pytest.fail(f"a README command this test does not know how to check: {' '.join(argv)}")


def test_the_readme_test_command_is_what_ci_runs():
    tests = [argv for argv in COMMANDS if "pytest" in argv]
    assert tests == [["python", "-m", "pytest"]]
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert ci[-1] == "python -m pytest"


@pytest.mark.parametrize("page", ["README.md", *(p.relative_to(REPO).as_posix() for p in sorted((REPO / "docs").rglob("*.md")))])
def test_links_between_the_pages_lead_somewhere(page):
    path = REPO / page
    for target in re.findall(r"\]\(([^)#\s]+)", path.read_text()):
        if not target.startswith(("http://", "https://")):
            assert (path.parent / target).exists(), f"{page} links to {target}, which does not exist"


DOCS_COMMANDS = [(page.name, argv) for page in sorted((REPO / "docs").glob("*.md"))
                 for argv in readme_commands(page.read_text()) if argv[:3] == ["python", "-m", "qprune"]]


@pytest.mark.slow   # sweeps of 9 jobs each: a few seconds apiece
@pytest.mark.parametrize("page,argv", DOCS_COMMANDS, ids=[f"{p}: {' '.join(a[3:])[:50]}" for p, a in DOCS_COMMANDS])
def test_the_docs_qprune_commands_are_valid(page, argv, data_root, monkeypatch):
    monkeypatch.setenv("QPRUNE_DATA", str(data_root))
    assert check_command(argv[3:]) is not None
