"""Every example in README.md and docs/ runs as pasted.

The fenced ``bash``/``sh``/``console`` and ``python`` blocks of each page are its examples
(``console``: the lines after ``$ ``); a block that is not meant to run (command output, a file
listing, a synopsis with placeholders) uses another fence language, such as ``text``. A page's
examples run in order in one temporary working folder, as a reader pasting the page top to bottom
would run them: shell blocks with ``bash -e``, the python blocks in one interpreter with a shared
namespace (so a page's snippets are self-contained from its top), with the running environment's
``bin/`` first on ``PATH``. The working folder stands for a fresh clone: the clone's ``recipes/``
is linked into it (examples name recipe files by their path in the clone).

An example that names a real model (``--model smollm2-135m``, ``load_model("gemma3-270m")``, ...;
comments aside) runs only when that model is pulled and, as for ``tests/test_real_models.py``,
named in ``FACTEDIT_REAL_MODELS`` (default ``smollm2-135m``: Gemma-3's examples are opt-in), with
``FACTEDIT_CACHE`` on the user's cache so that the pulled model is found; these tests are marked
``real_model`` and ``slow``. A page's real-model examples run apart from its demo-model ones
(their own folder and interpreter), so each of the two sequences must stand on its own. The
demo-model examples get a fresh cache. The demo-model tests are marked ``slow`` (a page takes
seconds); the checks below that run nothing are not.

An example that would take minutes (a 300-fact audit, a benchmark, ``make`` targets, ``pip
install``, ``mkdocs serve``) is marked by an HTML comment on the line before its fence,
``<!-- example: skip (takes 20 minutes) -->``; each such block is a skipped test whose reason is
that text (``pytest -rs`` lists them), and a marker without a reason fails. Skipped or not, every
``factedit`` command in a shell example (and in a ``text`` block) is checked against the
command's options, and no two examples of a page write the same ``--out`` folder (unless the
second continues it: ``--append``, ``--undo``, ``--overwrite``).

Commands start warm (see ``WarmStarts``): the same entry point in a process forked from one that
has imported torch and transformers already. ``FACTEDIT_EXAMPLES_COLD=1`` starts each command and
interpreter afresh instead, as a shell would.
"""

from __future__ import annotations

import json
import os
import re
import select
import shlex
import subprocess
import sys
import textwrap
import tokenize
from dataclasses import dataclass
from io import StringIO
from pathlib import Path

import click
import pytest

from factedit.cli import main
from factedit.models.zoo import ZOO

ROOT = Path(__file__).resolve().parents[1]
SHELL = {"bash", "sh", "console"}
PYTHON = {"python"}
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<lang>[^\s`]*)[^`]*$")
MARKER = re.compile(r"^\s*<!--\s*example\s*:(?P<body>.*?)-->\s*$")
SKIP = re.compile(r"^\s*skip\s*(?:\((?P<reason>.*)\))?\s*$")
BLOCK_TIMEOUT_S = 600


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository root
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    skip: str | None  # the marker's reason; "" for a marker without one
    marker_error: str | None = None

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def kind(self) -> str:
        return "shell" if self.lang in SHELL else "python"

    @property
    def script(self) -> str:
        """What runs: a console block's commands, without their prompts; any other block as is."""
        if self.lang != "console":
            return self.code
        out, cont = [], False
        for line in self.code.splitlines():
            if line.startswith("$ ") or cont:
                out.append(line[2:] if line.startswith("$ ") and not cont else line)
                cont = line.rstrip().endswith("\\")
        return "\n".join(out) + "\n"

    @property
    def models(self) -> tuple[str, ...]:
        """The named real models this block uses (in code, not in its comments)."""
        text = _without_comments(self.script, self.kind)
        return tuple(sorted(n for n in ZOO if re.search(rf"(?<![\w.-]){re.escape(n)}(?![\w.-])", text)))


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def parse(path: Path, langs: set[str] = SHELL | PYTHON) -> list[Block]:
    """The page's runnable blocks (bash, sh, console, python; or those of ``langs``), each with
    its skip marker."""
    lines = path.read_text().splitlines()
    rel = path.relative_to(ROOT).as_posix()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = len(m["indent"]), m["fence"], m["lang"].lower()
        j = i + 1
        while j < len(lines) and not re.match(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$", lines[j]):
            j += 1
        body = textwrap.dedent("\n".join(x[indent:] if x[:indent].strip() == "" else x for x in lines[i + 1:j]))
        if lang in langs:
            skip, error = None, None
            k = i - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            mk = MARKER.match(lines[k]) if k >= 0 else None
            if mk:
                s = SKIP.match(mk["body"])
                if s is None:
                    error = f"unknown example marker {lines[k].strip()!r}: use <!-- example: skip (reason) -->"
                else:
                    skip = (s["reason"] or "").strip()
            blocks.append(Block(rel, i + 1, lang, body + "\n", skip, error))
        i = j + 1
    return blocks


def markers_without_block(path: Path) -> list[str]:
    """Example markers that are not right before a runnable block's fence."""
    lines = path.read_text().splitlines()
    starts = {b.line for b in parse(path)}
    bad = []
    for n, line in enumerate(lines):
        if MARKER.match(line):
            k = n + 1
            while k < len(lines) and not lines[k].strip():
                k += 1
            if k + 1 not in starts:
                bad.append(f"{path.relative_to(ROOT).as_posix()}:{n + 1}")
    return bad


def _without_comments(code: str, kind: str) -> str:
    if kind == "python":
        try:
            toks = [t for t in tokenize.generate_tokens(StringIO(code).readline) if t.type != tokenize.COMMENT]
            return tokenize.untokenize(toks)
        except (tokenize.TokenError, IndentationError, SyntaxError):
            return code
    return "\n".join(" ".join(_words(line)) for line in _logical_lines(code))


def _logical_lines(code: str) -> list[str]:
    """Shell lines, continuation backslashes joined."""
    out, cur = [], ""
    for line in code.splitlines():
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
        else:
            out.append(cur + line)
            cur = ""
    if cur:
        out.append(cur)
    return out


def _words(line: str) -> list[str]:
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    try:
        return list(lex)
    except ValueError:  # an unclosed quote: reported when it runs
        return line.split()


def factedit_commands(block: Block) -> list[list[str]]:
    """The argument lists of the ``factedit`` invocations in a shell block (``factedit ...``,
    ``python -m factedit ...``, after ``VAR=value`` assignments, in pipelines and ``$( )``)."""
    found = []
    for line in _logical_lines(block.script):
        words = _words(line)
        cmd: list[str] = []
        for w in [*words, ";"]:
            if w and set(w) <= set("();<>|&"):
                found.append(cmd)
                cmd = []
            else:
                cmd.append(w)
    out = []
    for cmd in found:
        while cmd and (re.match(r"^\w+=", cmd[0]) or cmd[0] == "$"):
            cmd = cmd[1:]
        if cmd and Path(cmd[0]).name == "factedit":
            out.append(cmd[1:])
        elif "-m" in cmd and cmd.index("-m") + 1 < len(cmd) and cmd[cmd.index("-m") + 1] == "factedit":
            out.append(cmd[cmd.index("-m") + 2:])
    return out


def option_problems(args: list[str]) -> list[str]:
    """Options that the command does not take, and subcommands that do not exist."""
    cmd: click.Command = main
    path = ["factedit"]
    rest = list(args)
    while isinstance(cmd, click.Group):
        if not rest or rest[0].startswith("-"):
            if rest and rest[0] not in ("--help",):
                return [f"`{' '.join(path)}` takes no option {rest[0]} (a subcommand comes first)"]
            return []
        sub = cmd.commands.get(rest[0])
        if sub is None:
            return [f"`{' '.join(path)}` has no command {rest[0]!r}"]
        cmd, path, rest = sub, [*path, rest[0]], rest[1:]
    known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
    problems = []
    for w in rest:
        if w.startswith("--"):
            name = w.split("=", 1)[0]
            if name not in known:
                problems.append(f"`{' '.join(path)}` has no option {name}")
        elif w.startswith("[") or w.endswith("]") or re.fullmatch(r"[A-Z][A-Z_]+(\.\.\.)?", w):
            problems.append(f"`{' '.join(path)}`: {w!r} is a placeholder, not a value")
    return problems


def out_folders(block: Block) -> list[tuple[str, bool]]:
    """(folder, continues) for every output folder the block names: ``--out X`` of a factedit
    command, ``out="X"`` in Python; ``continues`` when the command goes on in an existing one."""
    found = []
    if block.kind == "shell":
        for args in factedit_commands(block):
            for i, w in enumerate(args):
                value = args[i + 1] if w == "--out" and i + 1 < len(args) else w[6:] if w.startswith("--out=") else None
                if value:
                    found.append((value.rstrip("/"), bool({"--append", "--undo", "--overwrite"} & set(args))))
    else:
        code = _without_comments(block.code, "python")
        for m in re.finditer(r"""\bout\s*=\s*(?P<q>["'])(?P<dir>[^"']+)(?P=q)(?P<tail>[^)\n]*)""", code):
            found.append((m["dir"].rstrip("/"), bool(re.search(r"\b(append|overwrite)\s*=\s*True", m["tail"]))))
    return found


ALL = {p.relative_to(ROOT).as_posix(): parse(p) for p in pages()}


# ---- static checks: every block, skipped or not ------------------------------------------------


def test_runnable_blocks_are_found():
    blocks = [b for bs in ALL.values() for b in bs]
    assert len(blocks) > 30
    assert any(b.page == "README.md" and "factedit locate" in b.code for b in blocks)
    assert any(b.kind == "python" and b.page.startswith("docs/") for b in blocks)


def test_every_skip_marker_has_a_reason_and_a_block():
    bad = [f"{b.where}: {b.marker_error}" for bs in ALL.values() for b in bs if b.marker_error]
    bad += [f"{b.where}: a skip marker without a reason: write <!-- example: skip (why) -->"
            for bs in ALL.values() for b in bs if b.skip == ""]
    bad += [f"{where}: an example marker not right before a bash/sh/console/python block"
            for p in pages() for where in markers_without_block(p)]
    assert not bad, "\n".join(bad)


def test_shell_examples_use_only_options_the_commands_take():
    bad = [f"{b.where}: {problem}" for bs in ALL.values() for b in bs if b.kind == "shell"
           for args in factedit_commands(b) for problem in option_problems(args)]
    assert not bad, "\n".join(bad)


def test_commands_shown_as_text_use_only_options_the_commands_take():
    """Synopses and commands for models of one's own are not run; their options are checked."""
    bad = []
    for p in pages():
        for t in parse(p, {"text"}):
            lines = [x.strip()[2:] if x.strip().startswith("$ ") else x for x in t.code.splitlines()]
            b = Block(t.page, t.line, "bash", "\n".join(lines) + "\n", None)
            for args in factedit_commands(b):
                problems = option_problems([a.strip("[]()") for a in args])
                bad += [f"{b.where}: {x}" for x in problems if "placeholder" not in x]
    assert not bad, "\n".join(bad)


def test_no_two_examples_of_a_page_write_the_same_folder():
    bad = []
    for blocks in ALL.values():
        seen: dict[str, str] = {}
        for b in blocks:
            for folder, continues in out_folders(b):
                if folder in seen and not continues:
                    bad.append(f"{b.where}: writes {folder}/, which {seen[folder]} already wrote (an output "
                               "folder must be new or empty: give each example its own)")
                seen.setdefault(folder, b.where)
    assert not bad, "\n".join(bad)


def test_the_checks_see_what_they_look_for():
    """The parsers above on small pages: a placeholder, an unknown option, a reused folder."""
    b = Block("x.md", 1, "bash", 'factedit edit --requests r.json --out b/ [--mode batch|sequential]\n'
              'OMP_NUM_THREADS=1 factedit verify --adapter b/ --out "c d/" --nope  # --out e/\n', None)
    cmds = factedit_commands(b)
    assert cmds[0][:5] == ["edit", "--requests", "r.json", "--out", "b/"]
    assert any("placeholder" in p for p in option_problems(cmds[0]))
    assert option_problems(cmds[-1]) == ["`factedit verify` has no option --nope"]
    assert out_folders(b) == [("b", False), ("c d", False)]
    assert Block("x.md", 1, "console", "$ factedit models where smollm2-135m\n/x\n", None).models == ("smollm2-135m",)
    assert Block("x.md", 1, "python", 'm = load_model()  # load_model("smollm2-135m")\n', None).models == ()
    assert Block("x.md", 1, "python", 'factedit.edit(r, out="s/", append=True)\n', None).kind == "python"
    assert out_folders(Block("x.md", 1, "python", 'factedit.edit(r, out="s/", append=True)\n', None)) == [("s", True)]


# ---- running them ------------------------------------------------------------------------------


def _runs():
    """One test per page and set of real models it needs, and one skipped test per skipped block."""
    params = []
    for page, blocks in ALL.items():
        groups: dict[tuple[str, ...], list[Block]] = {}
        for b in blocks:
            if b.skip is not None:
                params.append(pytest.param(page, (), [b], id=f"{b.where} skipped",
                                           marks=pytest.mark.skip(reason=f"{b.where}: {b.skip or 'no reason given'}")))
            else:
                groups.setdefault(b.models, []).append(b)
        for models, group in groups.items():
            marks = [pytest.mark.real_model, pytest.mark.slow] if models else [pytest.mark.slow]
            params.append(pytest.param(page, models, group, id=" ".join([page, *models]), marks=marks))
    return params



# A page's python blocks run in one interpreter: this loop, fed one block at a time over a pipe.
DRIVER = r"""
import json, os, sys, traceback
ns = {"__name__": "__main__"}
requests, replies = os.fdopen(int(sys.argv[1])), os.fdopen(int(sys.argv[2]), "w")
for line in requests:
    msg = json.loads(line)
    print(f"----- {msg['where']}", flush=True)
    try:
        exec(compile("\n" * msg["line"] + msg["code"], msg["file"], "exec"), ns)
        error = None
    except BaseException:
        error = traceback.format_exc()
    sys.stdout.flush(); sys.stderr.flush()
    replies.write(json.dumps({"error": error}) + "\n"); replies.flush()
"""

# Every `factedit` command and every python interpreter starts by importing torch and
# transformers, which costs more CPU than the demo model's work: about 30 processes would spend
# some 100 s importing. So by default they start warm: a server imports those once, and forks a
# process per command that runs the same entry point (`factedit.cli:main`, the console script's)
# with the command's arguments, working folder, environment and standard streams; a `factedit`
# first on PATH sends the command to it. FACTEDIT_EXAMPLES_COLD=1 runs every command as its own
# fresh process instead (the installed console script).
SERVER = r"""
import json, os, select, signal, socket, sys, traceback

path, driver = sys.argv[1], sys.argv[2]
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot  # noqa: F401
import peft  # noqa: F401
import torch  # noqa: F401
from transformers import GPT2LMHeadModel  # noqa: F401  (the demo model's class)

import factedit.cli


def child(conn, msg, fds):
    for target, fd in zip((0, 1, 2), fds):
        os.dup2(fd, target)
    for fd in fds[:3]:
        if fd > 2 and fd not in fds[3:]:
            os.close(fd)
    os.chdir(msg["cwd"])
    os.environ.clear()
    os.environ.update(msg["env"])
    signal.signal(signal.SIGINT, signal.default_int_handler)
    code = 0
    try:
        if msg["kind"] == "cli":
            sys.argv = msg["argv"]
            factedit.cli.main(args=msg["argv"][1:], prog_name="factedit")
        else:
            sys.argv = ["-c", *map(str, fds[3:])]
            exec(driver, {"__name__": "__main__"})
    except SystemExit as exc:
        if isinstance(exc.code, int) or exc.code is None:
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        conn.sendall(int(code).to_bytes(4, "big", signed=True))
    finally:
        os._exit(0)


def reap():
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(path)
srv.listen(64)
print("ready", flush=True)
while True:
    ready, _, _ = select.select([srv, 0], [], [], 0.5)
    reap()
    if 0 in ready and not os.read(0, 1):  # the test session ended
        break
    if srv in ready:
        conn, _ = srv.accept()
        data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 8)
        size, data = int.from_bytes(data[:8], "big"), data[8:]
        while len(data) < size:
            data += conn.recv(1 << 16) or b"?" * (size - len(data))
        if os.fork() == 0:
            srv.close()
            child(conn, json.loads(data), fds)
        conn.close()
        for fd in fds:
            os.close(fd)
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
"""

SHIM = r"""
import json, os, socket, sys

conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
conn.connect(sys.argv[1])
msg = json.dumps({"kind": "cli", "argv": ["factedit", *sys.argv[2:]], "cwd": os.getcwd(),
                  "env": dict(os.environ)}).encode()
socket.send_fds(conn, [len(msg).to_bytes(8, "big") + msg], [0, 1, 2])
code = b""
while len(code) < 4:
    part = conn.recv(4 - len(code))
    if not part:
        sys.exit("factedit: the command's process ended without an exit code (killed?)")
    code += part
sys.exit(int.from_bytes(code, "big", signed=True))
"""


class WarmStarts:
    """The server above, and the `factedit` that talks to it (in ``bin``)."""

    def __init__(self, env: dict[str, str]):
        import tempfile

        self.dir = Path(tempfile.mkdtemp(prefix="factedit-examples-"))  # short: a socket path has a length limit
        self.socket = str(self.dir / "socket")
        self.bin = self.dir / "bin"
        self.bin.mkdir()
        (self.dir / "shim.py").write_text(SHIM)
        shim = self.bin / "factedit"
        shim.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -S {shlex.quote(str(self.dir / 'shim.py'))} "
                        f"{shlex.quote(self.socket)} \"$@\"\n")
        shim.chmod(0o755)
        self._log = open(self.dir / "server.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, self.socket, DRIVER], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     start_new_session=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], 300)
        if not ready or self.proc.stdout.readline().strip() != b"ready":
            self.close()
            raise RuntimeError(f"the warm-start server did not start:\n{(self.dir / 'server.log').read_text()}")

    def launch(self, msg: dict, fds: list[int]):
        import socket

        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(self.socket)
        data = json.dumps(msg).encode()
        socket.send_fds(conn, [len(data).to_bytes(8, "big") + data], fds)
        return conn

    def close(self):
        import shutil
        import signal

        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except (subprocess.TimeoutExpired, OSError):
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1",
               MPLBACKEND="Agg", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="session")
def warm():
    if os.environ.get("FACTEDIT_EXAMPLES_COLD"):
        yield None
        return
    starts = WarmStarts(_base_env())
    try:
        yield starts
    finally:
        starts.close()


class Interpreter:
    """One Python process that runs a page's python blocks in order, in one namespace."""

    def __init__(self, cwd: Path, env: dict[str, str], log: Path, warm: WarmStarts | None):
        req_r, self._req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        self.log = log
        log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        null = os.open(os.devnull, os.O_RDONLY)
        self.proc = self.conn = None
        try:
            if warm is None:
                self.proc = subprocess.Popen([sys.executable, "-u", "-c", DRIVER, str(req_r), str(rep_w)], cwd=cwd,
                                             env=env, pass_fds=(req_r, rep_w), stdin=null, stdout=log_fd,
                                             stderr=log_fd)
            else:
                self.conn = warm.launch({"kind": "python", "cwd": str(cwd), "env": env},
                                        [null, log_fd, log_fd, req_r, rep_w])
        finally:
            for fd in (req_r, rep_w, log_fd, null):
                os.close(fd)
        self._replies = os.fdopen(rep_r)

    def run(self, block: Block) -> str | None:
        msg = {"where": block.where, "file": str(ROOT / block.page), "line": block.line, "code": block.code}
        os.write(self._req_w, (json.dumps(msg) + "\n").encode())
        ready, _, _ = select.select([self._replies], [], [], BLOCK_TIMEOUT_S)
        if not ready:
            return f"no answer in {BLOCK_TIMEOUT_S} s"
        line = self._replies.readline()
        if not line:
            return f"the interpreter ended\n{_tail(self.log.read_text())}"
        error = json.loads(line)["error"]
        return None if error is None else error + "\noutput:\n" + _tail(self.log.read_text())

    def close(self):
        os.close(self._req_w)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        else:
            self.conn.settimeout(60)
            try:
                self.conn.recv(4)
            except OSError:
                pass
            self.conn.close()
        self._replies.close()


def _tail(text: str, n: int = 4000) -> str:
    return text if len(text) <= n else "...\n" + text[-n:]


@pytest.mark.parametrize("page, models, blocks", _runs())
def test_examples_run(page, models, blocks, tmp_path, warm):
    from factedit.integrity import cache_root
    from factedit.models.zoo import is_pulled

    chosen = [n.strip() for n in os.environ.get("FACTEDIT_REAL_MODELS", "smollm2-135m").split(",") if n.strip()]
    left_out = [m for m in models if m not in chosen]
    if left_out:
        pytest.skip(f"{page}: {', '.join(left_out)} not in FACTEDIT_REAL_MODELS (as for tests/test_real_models.py)")
    missing = [m for m in models if not is_pulled(m)]
    if missing:
        pytest.skip(f"{page}: {', '.join(missing)} not pulled (`factedit models pull {' '.join(missing)}`)")
    work = tmp_path / "work"
    work.mkdir()
    (work / "recipes").symlink_to(ROOT / "recipes", target_is_directory=True)
    env = _base_env()
    env["FACTEDIT_CACHE"] = str(cache_root()) if models else str(tmp_path / "cache")
    if warm is not None:
        env["PATH"] = f"{warm.bin}{os.pathsep}{env['PATH']}"
    interpreter = None
    try:
        for b in blocks:
            if b.kind == "python":
                interpreter = interpreter or Interpreter(work, env, tmp_path / "python.log", warm)
                error = interpreter.run(b)
                assert error is None, f"{b.where} (python) failed:\n{error}"
            else:
                r = subprocess.run(["bash", "-e", "-c", b.script], cwd=work, env=env, stdin=subprocess.DEVNULL,
                                   capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
                assert r.returncode == 0, (f"{b.where} (bash -e) exited with {r.returncode}:\n{b.script}\n"
                                           f"stdout:\n{_tail(r.stdout)}\nstderr:\n{_tail(r.stderr)}")
    finally:
        if interpreter is not None:
            interpreter.close()
