"""The README's streaming-statistics example runs as written and checks itself (its
asserts compare 200 merged chunks with the one-shot moments to 1e-12 relative)."""

import os
import re
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_blocks():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as readme:
        return re.findall(r"```python\n(.*?)```", readme.read(), flags=re.S)


def test_streaming_example_runs_and_matches_one_shot(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the example's memmap goes here
    block = next(b for b in _python_blocks() if "stream_moments" in b)
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["m"].count[0] == 20000 * 4 * 4
    assert "200/200" in capsys.readouterr().err
