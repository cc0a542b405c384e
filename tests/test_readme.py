"""The README's commands and code, run as written so the README cannot rot.

```bash blocks run in order in one scratch folder, ```python blocks after them (they use what the
bash blocks made), with SHRINK applied so the suite stays fast. ```sh blocks are commands for
other machines or longer runs; what they do is covered by the other test files (training, LoRA and
fuse in test_train/test_lora, export flavours and precisions in test_onnx_*, two processes on the
ring backend in test_train) and the two commands at the top by CI itself.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
# Long runs in the README, short runs here: (pattern, replacement).
SHRINK = [
    (r"--max-steps \d+", "--max-steps 40"),
    (r"--max-tokens \d+", "--max-tokens 30"),
    (r"max_tokens=\d+", "max_tokens=20"),
]


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def shrink(text: str) -> str:
    for pattern, replacement in SHRINK:
        text = re.sub(pattern, replacement, text)
    return text


def commands(block: str) -> list[list[str]]:
    joined = block.replace("\\\n", " ")
    return [shlex.split(line) for line in joined.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The user's folder: some text files of their own and a prompt/completion JSONL."""
    work = tmp_path_factory.mktemp("readme")
    corpus = (ROOT / "mlx_transformer/data/corpus/tinyshakespeare.txt").read_text()
    (work / "my_texts").mkdir()
    (work / "my_texts/plays.txt").write_text(corpus[:60_000])
    (work / "my_texts/more.md").write_text(corpus[60_000:120_000])
    with open(work / "qa.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"prompt": f"Who speaks line {i}?", "completion": " ROMEO."}) + "\n")
    return work


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    assert argv[0] == "mlx-transformer", argv
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "mlx_transformer", *argv[1:]],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_readme_has_the_two_commands_first():
    first = blocks("sh")[0].splitlines()
    assert [line.split()[0] for line in first] == ["scripts/demo.sh", "scripts/test.sh"]
    ci = (ROOT / ".ci/run").read_text()
    assert "scripts/test.sh" in ci


@pytest.mark.slow
def test_bash_blocks_then_python_blocks_run_as_written(workdir):
    bash = blocks("bash")
    assert len(bash) >= 2, "the tour and 'your own text' blocks"
    for block in bash:
        for argv in commands(shrink(block)):
            proc = run(argv, workdir)
            assert proc.returncode == 0, f"{shlex.join(argv)}\n{proc.stderr[-2000:]}"
    assert (workdir / "runs/tour/inspect/attention.png").is_file()
    assert "PASS" in (workdir / "onnx/tour/verify.md").read_text()
    for block in blocks("python"):
        code = compile(shrink(block), "README.md", "exec")
        cwd = os.getcwd()
        try:
            os.chdir(workdir)
            exec(code, {"__name__": "readme"})
        finally:
            os.chdir(cwd)


@pytest.mark.slow  # uses what the README's blocks made in the test above
def test_the_error_shown_in_the_readme_is_the_real_one(workdir):
    text = next(b for b in blocks("text") if "$ mlx-transformer" in b)
    command, shown = text.strip().splitlines()
    proc = run(shlex.split(command.removeprefix("$ ")), workdir)
    assert proc.returncode == 2
    assert proc.stderr.strip() == shown
