"""The README's Python example runs, and every `print(...)  # expected` comment in it is true."""

import contextlib
import io
import re

from tests.helpers import ROOT


def test_readme_example_prints_what_it_says():
    text = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "build_batch" in b)
    expected = [
        m.group(1).strip() for m in re.finditer(r"^print\(.*?\)\s+# (\[.*\])$", block, re.M)
    ]
    assert len(expected) == 3
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, "README.md", "exec"), {})
    printed = out.getvalue().splitlines()
    assert printed[: len(expected)] == expected
    assert "'num_text_targets': 6.0, 'num_images': 1.0" in printed[len(expected)]
