"""``mach chat`` fed from a pipe, as a script or a test drives it."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from tests.core.test_cli import FIXTURE

SYSTEM = ("You are a careful assistant who writes Python for the standard library. Answer with "
          "short functions, add docstrings, and prefer clear names over clever ones.")  # fmt: skip
TURN = re.compile(r"\[(\d+) tokens, [\d.]+ tok/s, first token \d+ ms, prompt (\d+) tokens "
                  r"\((\d+) cached\) \| finish: (\w+)\]")  # fmt: skip


def chat(lines: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mach", "chat", "-n", "8", *args],
        input="".join(line + "\n" for line in lines), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


def turns(stderr: str) -> list[tuple[int, int, int, str]]:
    """(generated, prompt, cached, finish) of every turn's stats line."""
    return [(int(a), int(b), int(c), d) for a, b, c, d in TURN.findall(stderr)]


def test_turns_reuse_the_cache_and_commands_reset_the_conversation() -> None:
    ask = "def read_config(path):"
    result = chat([f"/system {SYSTEM}", ask, "and now write it back", "/reset", ask, "/system",
                   ask])  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "[system message set; new conversation]" in result.stderr
    assert "[new conversation]" in result.stderr
    assert "[system message removed; new conversation]" in result.stderr
    (gen1, prompt1, cached1, _), (_, prompt2, cached2, _), third, fourth = turns(result.stderr)
    assert gen1 == 8 and cached1 == 0
    # The second turn's prompt extends the first, whose prefill the cache kept.
    assert prompt2 > prompt1 and cached2 >= prompt1 - 1
    assert third[1] == prompt1  # /reset: the first turn again, with the same system message
    assert fourth[1] < prompt1  # no system message any more
    assert result.stdout.count("\n") >= 4  # each reply ends its line


def test_continued_lines_and_blocks_make_one_message() -> None:
    continued = chat(["def main():\\", "    pass"])
    block = chat(['"""', "def main():", "    pass", '"""'])
    single = chat(["def main():"])
    assert continued.returncode == block.returncode == 0, continued.stderr + block.stderr
    [(_, joined, _, _)] = turns(continued.stderr)
    [(_, blocked, _, _)] = turns(block.stderr)
    [(_, alone, _, _)] = turns(single.stderr)
    assert joined == blocked > alone


def test_help_unknown_commands_and_the_end_of_input() -> None:
    result = chat(["/help", "/nosuch"])
    assert result.returncode == 0, result.stderr
    assert "/system TEXT" in result.stderr and "/exit" in result.stderr
    assert "[unknown command /nosuch; /help lists them]" in result.stderr
    assert turns(result.stderr) == []


def test_ctrl_c_stops_the_reply_not_the_program() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mach", "chat", "-n", "100000", "--quiet"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("def main():\n")
    proc.stdin.flush()
    assert proc.stdout.read(1)  # the reply has started
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate("/help\n/exit\n", timeout=300)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    # Still running after the interrupt: it read and answered the next command.
    assert "[stopped]" in err and err.index("[stopped]") < err.index("/system TEXT")


def test_chat_needs_a_tokenizer(tmp_path: Path) -> None:
    target = tmp_path / "no-tok"
    shutil.copytree(FIXTURE, target)
    (target / "tokenizer.json").unlink()
    result = chat(["hello"], str(target))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "tokenizer.json is missing" in result.stderr and "mach generate" in result.stderr
