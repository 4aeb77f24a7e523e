"""The README's Python example, run as written (in a folder of its own, beside the checkpoint and the prompts),
prints what the README says it prints; and its snapshot, loaded in another process, continues the document the
same way."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "checkpoints" / "smollm2-135m-instruct"


def readme_example():
    """The README's ```python block and the output block after "On a CPU it prints"."""
    text = (ROOT / "README.md").read_text()
    found = re.search(r"```python\n(.*?)```\s*\nOn a CPU it prints[^\n]*\n\s*```\n(.*?)```", text, re.S)
    assert found, "the README has no Python example followed by what it prints"
    return found.group(1), found.group(2)


def test_the_readme_example_is_found_and_saves_outside_the_tracked_files():
    code, printed = readme_example()
    assert "Reader(" in code and printed.strip()
    saved = re.findall(r'save\("([^"]+)"\)', code)
    assert saved, "the example saves a snapshot"
    ignored = subprocess.run(["git", "check-ignore", "-q", saved[0]], cwd=ROOT)
    assert ignored.returncode == 0 or Path(saved[0]).is_absolute(), f"{saved[0]} would show in git status"


@pytest.mark.skipif(not (CKPT / "model.safetensors").exists(), reason="run `python scripts/prepare_test_model.py` first")
def test_the_readme_example_prints_what_the_readme_says(tmp_path):
    code, printed = readme_example()
    for name in ("checkpoints", "prompts"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = os.environ | {"PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}  # "On a CPU"
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=1800)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout == printed, (run.stdout, printed)
    assert "prefill" in run.stderr  # the progress bar, on by default
    # The snapshot, in another process: an empty question continues the document as the first process did.
    saved = re.findall(r'save\("([^"]+)"\)', code)[0]
    answer = printed.splitlines()[0]
    again = subprocess.run([sys.executable, "-c", "from reader import Reader\n"
                            "r = Reader('checkpoints/smollm2-135m-instruct', progress=False)\n"
                            f"r.load({saved!r})\nprint(repr(r.ask('', max_new_tokens=8)))"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.strip() == answer and again.stderr == ""
