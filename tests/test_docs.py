"""The README and the guide in docs/: every shell command in them runs as written, every link resolves.

Each fenced ```bash, ```sh or ```console block of README.md and docs/*.md is marked by an HTML
comment on the line before its fence, which says what this test does with it:

- ``<!-- runnable -->``: every command runs, in the order of the pages (README.md first, then
  :data:`PAGES`), in one copy of the repository in a temporary folder, as a user would type it
  there; each must exit with status 0 (``<!-- runnable: exit 2 -->``: with status 2). In a
  ``console`` block, lines after a ``$ command`` are its expected output: each must appear in what
  the command prints, with ``...`` standing for any text.
- ``<!-- dry-run -->``: too long to run here (the full study, a SLURM cluster, an install), so each
  command is checked without running it: ``python -m kl_sweep -m ...`` goes through the real
  command line, Hydra and the sweeper's planning and validation of every configuration, and stops
  just before anything is written (a count of configurations or fits in its comment must match the
  plan); ``make TARGET`` through ``make -n``; ``python -m analysis ...`` and ``python -m
  analysis.exact ...`` through their own argument parsers and checks; ``pip install`` against the
  packages pyproject.toml names; ``python SCRIPT.py ...`` through the script's ``--help``.
  A command with no such check fails the test: run it, or add a check here.

A shell block without a marker fails too, so a new command cannot go unchecked.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: The guide, in the order its runnable commands run (after README.md's).
PAGES = [
    "README.md",
    "docs/README.md",
    "docs/model-and-divergences.md",
    "docs/dimensions.md",
    "docs/running-sweeps.md",
    "docs/results-table.md",
    "docs/analysis-and-figures.md",
    "docs/clusters-and-launchers.md",
    "docs/numerics-and-verification.md",
    "docs/performance.md",
    "docs/stochastic-vi.md",
]
SHELL_FENCE = re.compile(r"^```(bash|sh|console)\s*$")
MARKER = re.compile(r"^<!-- (runnable|dry-run)(?:: exit (\d+))? -->$")
#: The front page stays a front page (issue 26).
README_MAX_LINES = 150
#: Committed pictures stay small.
IMAGE_MAX_BYTES = 200_000

#: ``python -m kl_sweep`` for each argument list in argv[1] (JSON), in one interpreter, each through the
#: real command line (pre-flight, Hydra, the sweeper's plan and validation of every configuration),
#: stopped just before anything is written; prints one JSON line per list: exit status and output.
DRY_RUN = """\
import contextlib, io, json, sys
from hydra.core.global_hydra import GlobalHydra
from hydra_plugins.kl_sweep_sweeper import _core
from kl_sweep import cli, workers

def stop(sweep_dir, rows):
    print(f"dry run: {rows} configurations -> {sweep_dir}")
    raise SystemExit(0)

_core._check_writable = stop  # called right after every configuration is planned and validated
cli.use_forkserver = workers.use_forkserver = lambda: False  # nothing is launched
results = []
for args in json.loads(sys.argv[1]):
    sys.argv = ["kl_sweep", *args]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            cli.main()
            code = 0
        except SystemExit as ex:
            code = ex.code if isinstance(ex.code, int) else int(ex.code is not None)
        except Exception as ex:
            code, _ = 1, print(f"{type(ex).__name__}: {ex}")
    GlobalHydra.instance().clear()
    results.append([code, out.getvalue()])
print(json.dumps(results))
"""


@dataclass
class Command:
    text: str  # as a user types it (continuation lines joined)
    expected: list[str] = field(default_factory=list)  # output lines, ``...`` for any text


@dataclass
class Block:
    page: str
    line: int  # of the fence, 1-based
    kind: str  # runnable, dry-run, or "" when unmarked
    exit: int
    commands: list[Command]

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def shell_blocks(page: str) -> list[Block]:
    """The fenced shell blocks of ``page`` with their markers and commands."""
    lines = (ROOT / page).read_text().splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        fence = SHELL_FENCE.match(lines[i])
        if not fence:
            if lines[i].startswith("```"):  # skip other fenced blocks whole (they may hold ``` text)
                i += 1
                while i < len(lines) and not lines[i].startswith("```"):
                    i += 1
            i += 1
            continue
        marker = MARKER.match(lines[i - 1].strip()) if i else None
        start = i
        body = []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        kind = marker.group(1) if marker else ""
        exit_status = int(marker.group(2)) if marker and marker.group(2) else 0
        blocks.append(Block(page, start + 1, kind, exit_status, commands(body, fence.group(1) == "console")))
        i += 1
    return blocks


def commands(body: list[str], console: bool) -> list[Command]:
    """The commands of a block: ``$ `` lines in a console block, every non-comment line otherwise."""
    found: list[Command] = []
    pending = ""
    for line in body:
        if pending:
            pending += " " + line.strip()
        elif console and line.startswith("$ "):
            pending = line[2:].strip()
        elif console and found and line.strip():
            found[-1].expected.append(line.strip())
            continue
        elif not console and line.strip() and not line.lstrip().startswith("#"):
            pending = line.strip()
        else:
            continue
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
        else:
            found.append(Command(pending))
            pending = ""
    assert not pending, f"a command ends in a line continuation: {pending}"
    return found


def all_blocks() -> list[Block]:
    return [block for page in PAGES for block in shell_blocks(page)]


def comment_of(command: str) -> str:
    """The ``# comment`` at the end of a command line ('' if none): the first ``#`` outside quotes
    that starts a word, as bash reads it."""
    quote = ""
    for i, char in enumerate(command):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or command[i - 1].isspace()):
            return command[i + 1 :].strip()
    return ""


def matches(expected: str, output: str) -> bool:
    """Whether some text of ``output`` matches ``expected``, ``...`` standing for any text."""
    pattern = ".*".join(re.escape(piece) for piece in expected.split("..."))
    return re.search(pattern, output) is not None


# --- The repository copy the commands run in -------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the repository (without git, sweeps, caches) where the commands run as written."""
    copy = tmp_path_factory.mktemp("docs") / "kl-sweep"
    ignore = shutil.ignore_patterns(
        ".git", "multirun", "outputs", "__pycache__", "*.egg-info", ".*_cache", ".hypothesis", "build"
    )
    shutil.copytree(ROOT, copy, ignore=ignore)
    (copy / "multirun").mkdir()
    (copy / ".dry_run.py").write_text(DRY_RUN)
    return copy


def environment(workspace: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "PYTHONSTARTUP")}
    env["PYTHONPATH"] = str(workspace)  # the copy's code, as in its own checkout
    env.setdefault("OMP_NUM_THREADS", "1")
    env["MPLBACKEND"] = "Agg"
    return env


def run(command: str, workspace: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", command],
        cwd=workspace,
        env=environment(workspace),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --- Every block is marked; the pages and pictures hold together -------------------------------


def test_every_shell_block_is_marked_and_has_commands():
    blocks = all_blocks()
    assert len(blocks) >= 10, "the guide has lost its commands"
    unmarked = [str(b) for b in blocks if not b.kind]
    assert not unmarked, (
        f"shell blocks without <!-- runnable --> or <!-- dry-run --> before the fence: {unmarked}"
    )
    empty = [str(b) for b in blocks if not b.commands]
    assert not empty, f"shell blocks without a command: {empty}"
    unchecked = [str(b) for b in blocks if b.kind == "dry-run" and any(c.expected for c in b.commands)]
    assert not unchecked, f"dry-run blocks show output that no test checks: {unchecked}"
    kinds = {b.kind for b in blocks}
    assert kinds == {"runnable", "dry-run"}


def test_parser_reads_prompts_continuations_and_output():
    console = commands(["$ python -m kl_sweep a=1 \\", "    b=2", "out ... line", "", "$ ls"], console=True)
    assert [c.text for c in console] == ["python -m kl_sweep a=1 b=2", "ls"]
    assert console[0].expected == ["out ... line"] and console[1].expected == []
    bash = commands(["# a comment", "make demo   # install", "x \\", "  y"], console=False)
    assert [c.text for c in bash] == ["make demo   # install", "x y"]
    assert comment_of("python -m kl_sweep -m experiment=study   # 51,680 fits") == "51,680 fits"
    assert comment_of("python -c \"print('#1')\"") == ""
    assert comment_of("make demo   # torch's CPU build") == "torch's CPU build"
    assert matches(
        "kl_sweep: 60 rows -> .../results.parquet", "[x][HYDRA] kl_sweep: 60 rows -> /a/b/results.parquet"
    )
    assert not matches("kl_sweep: 61 rows -> ...", "kl_sweep: 60 rows -> /a")


def test_readme_is_a_front_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES
    assert "](docs/img/phase_diagram.png)" in readme
    for page in PAGES[1:]:
        assert f"]({page})" in readme or f"]({page}#" in readme or page == "docs/README.md", page


def anchors(page: Path) -> set[str]:
    """The anchors a code host gives the headings of ``page`` (lower case, punctuation dropped)."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    headings = re.findall(r"^#+ (.+)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_links_and_images_resolve():
    """Every relative link of README.md, analysis/README.md and docs/*.md points at a file that exists."""
    pages = [*PAGES, "analysis/README.md"]
    assert sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")) == sorted(
        p for p in PAGES if p.startswith("docs/")
    ), "a page in docs/ is not in PAGES (so its commands would not run)"
    broken = []
    for page in pages:
        text = (ROOT / page).read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            path = (ROOT / page).parent / file if file else ROOT / page
            if not path.exists():
                broken.append(f"{page}: {target}")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                broken.append(f"{page}: {target} (no such heading)")
    assert not broken, broken
    images = sorted((ROOT / "docs" / "img").glob("*.png"))
    assert images, "no pictures in docs/img"
    too_big = [f"{p.name}: {p.stat().st_size} bytes" for p in images if p.stat().st_size > IMAGE_MAX_BYTES]
    assert not too_big, too_big
    used = "".join((ROOT / page).read_text() for page in PAGES)
    unused = [p.name for p in images if p.name not in used]
    assert not unused, f"pictures no page shows: {unused}"


# --- Runnable commands run -----------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES)
def test_runnable_commands_run_as_written(page: str, workspace: Path):
    blocks = [b for b in shell_blocks(page) if b.kind == "runnable"]
    if page != "README.md" and not (workspace / "multirun" / "latest").exists():
        # this page alone (-k): first the README's quick start, whose sweep the guide's commands read
        for command in (c for b in shell_blocks("README.md") if b.kind == "runnable" for c in b.commands):
            assert run(command.text, workspace).returncode == 0, command.text
    for block in blocks:
        for command in block.commands:
            done = run(command.text, workspace)
            output = done.stdout + done.stderr
            assert done.returncode == block.exit, (
                f"{block}: `{command.text}` exited {done.returncode}, not {block.exit}:\n{output[-3000:]}"
            )
            for line in command.expected:
                assert matches(line, output), (
                    f"{block}: `{command.text}` did not print {line!r}:\n{output[-3000:]}"
                )


def test_runnable_commands_cover_the_quick_start():
    """The README's quick start (a fit, a sweep, the analysis, pandas, DuckDB) is run, not only checked."""
    runnable = " ".join(c.text for b in shell_blocks("README.md") if b.kind == "runnable" for c in b.commands)
    for needle in (
        "python -m kl_sweep separation=",
        "python -m kl_sweep -m",
        "python -m analysis",
        "pandas",
        "duckdb",
    ):
        assert needle in runnable, needle


# --- Dry-run commands are checked ---------------------------------------------------------------


def dry_run(commands: list[str], workspace: Path) -> list[str | None]:
    """Check each command without running it; for each, the problem as text, or None when it is fine."""
    sweeps = {
        i: c
        for i, c in enumerate(commands)
        if shlex.split(c, comments=True)[:3] == ["python", "-m", "kl_sweep"]
    }
    checked = dict(zip(sweeps, plan(list(sweeps.values()), workspace)))
    return [checked[i] if i in checked else dry_run_one(c, workspace) for i, c in enumerate(commands)]


def plan(commands: list[str], workspace: Path) -> list[str | None]:
    """``python -m kl_sweep ...`` commands: a multirun planned, a single run composed (``--cfg job``)."""
    if not commands:
        return []
    argvs = []
    for command in commands:
        args = shlex.split(command, comments=True)[3:]
        argvs.append(args if "-m" in args or "--multirun" in args else [*args, "--cfg", "job"])
    done = run(shlex.join(["python", ".dry_run.py", json.dumps(argvs)]), workspace)
    assert done.returncode == 0, done.stdout + done.stderr
    problems: list[str | None] = []
    for command, (code, output) in zip(commands, json.loads(done.stdout.splitlines()[-1])):
        planned = re.search(r"dry run: (\d+) configurations", output)
        claimed = re.search(r"([\d,]+) (?:configurations|fits)", comment_of(command))
        if code != 0:
            problems.append(output.strip()[-2000:] or f"exit status {code}")
        elif claimed and not planned:
            problems.append(f"the comment says {claimed.group(0)}, but this is not a sweep")
        elif claimed and int(claimed.group(1).replace(",", "")) != int(planned.group(1)):
            problems.append(f"the comment says {claimed.group(0)}, the sweep plans {planned.group(1)}")
        else:
            problems.append(None)
    return problems


def dry_run_one(command: str, workspace: Path) -> str | None:
    """Check a command other than ``python -m kl_sweep`` without running it."""
    words = shlex.split(command, comments=True)
    if words[:1] == ["make"]:
        done = run(f"make -n {shlex.join(words[1:])}", workspace)
        return None if done.returncode == 0 else f"make -n: {done.stderr.strip()}"
    if words[:3] == ["python", "-m", "analysis"]:
        from analysis.__main__ import parse_args

        return _parsed(parse_args, words[3:])
    if words[:3] == ["python", "-m", "analysis.exact"]:
        from analysis.exact import check, parse_args

        problem = _parsed(parse_args, words[3:])
        return problem or check(parse_args(words[3:]))
    if words[:2] == ["pip", "install"] or words[:4] == ["python", "-m", "pip", "install"]:
        return _installable(words[words.index("install") + 1 :])
    if words[:1] == ["python"] and len(words) > 1 and words[1].endswith(".py"):
        script = workspace / words[1]
        if not script.is_file():
            return f"no script {words[1]}"
        unknown = [
            w for w in words[2:] if w.startswith("--") and w.split("=")[0] not in script_options(script)
        ]
        return f"{words[1]} has no option {unknown}" if unknown else None
    return "no dry-run check for this command: mark its block <!-- runnable --> or add a check here"


def script_options(script: Path) -> set[str]:
    """The ``--options`` a script's argparse parser declares (read from its source, not run)."""
    options = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
            options |= {
                a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")
            }
    return options | {"--help"}


def _parsed(parse, args: list[str]) -> str | None:
    try:
        parse(args)
    except SystemExit as ex:
        return f"the arguments {args} do not parse (exit {ex.code})"
    return None


def _installable(args: list[str]) -> str | None:
    """``pip install`` arguments name this project's extras or packages its pyproject.toml lists."""
    text = (ROOT / "pyproject.toml").read_text()
    project = text[text.index("[project]") : text.index("[tool.")]
    optional = project[project.index("[project.optional-dependencies]") :]
    names = {n.lower() for n in re.findall(r'^\s*"([A-Za-z0-9][A-Za-z0-9._-]*)', project, re.M)}
    extras = set(re.findall(r"^([A-Za-z0-9_-]+) = \[", optional, re.M))
    for arg in args:
        if arg.startswith("-"):
            continue
        extra = re.fullmatch(r"\.\[([\w,-]+)\]", arg)
        if extra:
            missing = set(extra.group(1).split(",")) - extras
            if missing:
                return f"pyproject.toml has no extra {sorted(missing)}"
        elif arg != ".":
            name = re.split(r"[<>=!~\[]", arg, maxsplit=1)[0].lower()
            if name not in names:
                return f"{name} is not a package pyproject.toml lists"
    return None


@pytest.fixture(scope="module")
def dry_run_problems(workspace: Path) -> dict[tuple[str, int, str], str | None]:
    """Every dry-run command of every page, checked at once (one interpreter plans all the sweeps)."""
    commands = [(b.page, b.line, c.text) for b in all_blocks() if b.kind == "dry-run" for c in b.commands]
    return dict(zip(commands, dry_run([text for _, _, text in commands], workspace)))


@pytest.mark.parametrize("page", PAGES)
def test_dry_run_commands_check(page: str, dry_run_problems: dict):
    failed = [
        f"{p}:{line}: `{text}`: {problem}"
        for (p, line, text), problem in dry_run_problems.items()
        if p == page and problem
    ]
    assert not failed, "\n".join(failed)


def test_dry_run_catches_stale_commands(workspace: Path):
    """The checks fail on what a stale page would hold: a bad value, a wrong count, a missing target."""
    stale = {
        "python -m kl_sweep -m experiment=smoke weight=0.5,1.5": "invalid weight=1.5",
        "python -m kl_sweep -m experiment=smoke   # 61 configurations": "plans 60",
        "python -m kl_sweep -m experiment=nosuch": "invalid experiment=nosuch",
        "python -m kl_sweep separation=-1": "invalid separation=-1",
        "python -m kl_sweep separation=1   # 1 configurations": "not a sweep",
        "make no-such-target": "make -n",
        "python -m analysis --no-such-option": "do not parse",
        "python -m analysis.exact nosuch": "invalid divergence",
        "pip install no-such-package": "not a package",
        'python -m pip install -e ".[nosuch]"': "no extra",
        "rm -rf /tmp/x": "no dry-run check",
        "python benchmarks/cores.py --no-such": "has no option",
        "python benchmarks/no_such.py": "no script",
    }
    fine = [
        "python -m kl_sweep -m experiment=smoke   # 60 configurations",
        "python -m kl_sweep separation=1 weight=0.6",
        'pip install -e ".[test,ray]" hydra-submitit-launcher',
        "python benchmarks/cores.py --repeats 3 --init-mu-step 0.01",
    ]
    problems = dry_run([*stale, *fine], workspace)
    for (command, expected), problem in zip(stale.items(), problems):
        assert problem is not None and expected in problem, (command, problem)
    assert problems[len(stale) :] == [None] * len(fine), problems[len(stale) :]
