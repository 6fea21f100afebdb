"""`factedit edit` killed with SIGKILL at random points leaves either the old state (no folder,
or the folder that was there) or the complete new one: an adapter that loads and makes the
edit, with its manifest and merged checkpoint.

Each run is a real process running the CLI, killed with SIGKILL. To keep the test fast, a
helper process imports factedit once and forks one child per run (nothing of torch has run
in it before the fork). The helper slows factedit's file writes, its folder commit and the
folder swap (a short pause before each, announced on stderr), so that kills land inside the
save, where a non-atomic writer would leave a half-written folder; one kill lands at a
random time during loading and computing.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow,  # real processes killed at random points: about two minutes
              pytest.mark.skipif(not hasattr(os, "fork") or not hasattr(signal, "SIGKILL"),
                                 reason="needs fork and SIGKILL")]

PAUSE = 0.3  # seconds the helper waits before each write, the commit and the swap (and after the swap)
HELPER = """
import json, os, sys, time
import factedit.io as fio

pause = 0.0

def slow(name, fn, after=False):
    def wrapped(*args, **kwargs):
        print("@@" + name, flush=True, file=sys.stderr)
        time.sleep(pause)
        out = fn(*args, **kwargs)
        print("@@" + name + "-done", flush=True, file=sys.stderr)
        time.sleep(pause if after else 0.0)
        return out
    return wrapped

fio.atomic_write_bytes = slow("write", fio.atomic_write_bytes)
fio.commit_dir = slow("commit", fio.commit_dir)
fio._exchange = slow("swap", fio._exchange, after=True)
from factedit.cli import main
# what a run imports, imported once before the forks (no torch computation runs here)
import peft, transformers, factedit.editing.export, factedit.editing.api, factedit.models.families
import factedit.analysis.locate, factedit.world.generate, factedit.verify.run
transformers.GPT2LMHeadModel, transformers.AutoTokenizer

while line := sys.stdin.readline():
    request = json.loads(line)
    pause = request["pause"]
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # stdout carries only the helper's own lines
        code = 1
        try:
            main(request["args"], prog_name="factedit")
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            sys.stderr.flush()
            os._exit(code)
    print("pid", pid, flush=True)
    sys.stdin.readline()  # reaped only when told: until then the pid cannot be reused
    print("exit", os.waitpid(pid, 0)[1], flush=True)
"""
TARGET = "Paris"


def tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_file():
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


class Helper:
    """The forking helper process, and the markers its children print."""

    def __init__(self, env: dict):
        self.proc = subprocess.Popen([sys.executable, "-c", HELPER], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        self.markers: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            if line.startswith("@@"):
                self.markers.put(line.strip()[2:])

    def _send(self, obj) -> None:
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def _reap(self) -> int:
        self._send("reap")
        return int(self.proc.stdout.readline().split()[1])

    def _start(self, args: list[str], pause: float) -> int:
        while not self.markers.empty():
            self.markers.get_nowait()
        self._send({"args": args, "pause": pause})
        return int(self.proc.stdout.readline().split()[1])

    def run(self, args: list[str]) -> int:
        """Run the CLI with ``args`` in a child to the end (no pauses); its exit code."""
        self._start(args, 0.0)
        return os.waitstatus_to_exitcode(self._reap())  # the helper's waitpid waits for the end

    def run_and_kill(self, args: list[str], trigger: str | None, nth: int, delay: float) -> str:
        """Run the CLI with ``args`` in a child; ``delay`` seconds after the ``nth`` ``trigger``
        marker (or after the start, when None) SIGKILL it. Returns 'killed' or 'finished'."""
        pid = self._start(args, PAUSE)
        seen, deadline = 0, time.monotonic() + 120
        while trigger is not None and seen < nth and time.monotonic() < deadline:
            try:
                seen += self.markers.get(timeout=1) == trigger
            except queue.Empty:
                pass
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)  # not reaped yet, so still the child (or its zombie)
        status = self._reap()
        return "killed" if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL else "finished"

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def state(out: Path, old_hash: str | None, model, tok, user_files: dict[str, str]) -> str:
    """'absent', 'old' or 'new' (complete and working); anything else fails the test."""
    from factedit.editing.weights import applied
    from factedit.models.fingerprint import model_fingerprint
    from factedit.verify.run import load_adapter_delta
    from factedit.world.evaluate import top1_tokens

    if not out.exists():
        return "absent"
    if old_hash is not None and tree_hash(out) == old_hash:
        return "old"
    listing = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    for name, text in user_files.items():  # files that are not factedit's own survive
        assert (out / name).read_text() == text, listing
    assert (out / "edits.json").is_file(), f"neither old nor complete: {listing}"
    man = json.loads((out / "edits.json").read_text())
    assert man["base_fingerprint"] == model_fingerprint(model) and man["requests"][0]["target_new"] == TARGET
    for f in ("adapter_config.json", "merged/config.json", "merged/model.safetensors", "merged/tokenizer.json"):
        assert (out / f).is_file(), listing
    with applied(model, load_adapter_delta(out, model)):
        got = tok.decode(top1_tokens(model, tok, ["Roric Dunnford was born in"])).strip()
    assert got == TARGET, listing
    return "new"


def test_sigkill_leaves_old_or_complete_new(demo, tmp_path):
    model, tok, _ = demo
    seed = int(os.environ.get("FACTEDIT_KILL_SEED", time.time_ns() % 10**6))  # printed; set it to replay
    rng = random.Random(seed)
    (tmp_path / "fast.yaml").write_text("edit: {stats: {samples: 2000}, keys: {n_prefixes: 2}, fit: {steps: 5}, "
                                        "site: {lookup_position: last}}\n")
    env = {**os.environ, "FACTEDIT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    fact = ["edit", "--recipe", str(tmp_path / "fast.yaml"), "--prompt", "{} was born in", "--subject",
            "Roric Dunnford", "--merge", "--seed", "1"]
    base = [*fact, "--target-new", TARGET]

    helper = Helper(env)
    # an old folder: another edit, and files of the user's own
    old = tmp_path / "old"
    assert helper.run([*fact, "--target-new", "Tokyo", "--out", str(old)]) == 0
    user = {"notes.txt": "mine", "plots/a.txt": "also mine"}
    for name, text in user.items():
        (old / name).parent.mkdir(exist_ok=True)
        (old / name).write_text(text)
    old_hash = tree_hash(old)

    # (where to kill, which occurrence, how long after, into an existing folder?)
    plan = [
        (None, 1, rng.uniform(0.05, 1.5), False),  # loading or computing
        ("write", rng.choice([1, 2]), rng.uniform(0.0, PAUSE), False),  # while the folder is staged
        ("commit", 1, rng.uniform(0.0, PAUSE), False),  # just before it is put in place
        ("write", rng.choice([1, 2]), rng.uniform(0.0, PAUSE), True),  # staging, with an old folder in place
        ("swap", 1, rng.uniform(0.0, PAUSE), True),  # just before the swap
        ("swap-done", 1, rng.uniform(0.0, PAUSE * 0.5), True),  # just after: the old contents not yet removed
    ]
    outcomes = []
    for i, (trigger, nth, delay, existing) in enumerate(plan):
        out = tmp_path / f"run{i}"
        if existing:
            shutil.copytree(old, out)
        args = [*base, "--out", str(out)] + (["--overwrite"] if existing else [])
        how = helper.run_and_kill(args, trigger, nth, delay)
        got = state(out, old_hash if existing else None, model, tok, user if existing else {})
        outcomes.append((trigger, nth, round(delay, 2), how, got))
        assert got in (("old", "new") if existing else ("absent", "new")), outcomes
    print("seed", seed, "outcomes", outcomes)
    # a kill while the folder is staged never shows in --out (the later writes leave time to spare)
    assert outcomes[1][-1] == "absent" and outcomes[3][-1] == "old", outcomes

    # the next complete run puts the new folder in place, keeps the user's files, and removes
    # the staging folders the killed runs left beside it
    for i in (3, 5):
        out = tmp_path / f"run{i}"
        assert helper.run([*base, "--out", str(out), "--overwrite"]) == 0
        assert state(out, old_hash, model, tok, user) == "new"
        assert not list(tmp_path.glob(f".run{i}.partial-*")), sorted(p.name for p in tmp_path.iterdir())
    helper.close()
