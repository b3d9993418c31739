"""The README's pass tutorial and DSL example run as written and print what they say."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def tutorial_blocks() -> list[str]:
    text = README.read_text()
    section = text.split("### Writing a pass", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_tutorial_pass_runs_as_written(capsys):
    blocks = tutorial_blocks()
    assert len(blocks) == 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    printed = capsys.readouterr().out
    assert "%y: f32[4] = Mul(%x, %_folded)" in printed
    assert "[0.5   0.5   0.375 8.   ]" in printed
    from kiln.ir import parse_graph
    from kiln.passes import get_pass

    graph = parse_graph("graph g(%x: f32[2]) {\n  %a: f32[2] = Identity(%x)\n  %y: f32[2] = Exp(%a)\n  return %y\n}")
    assert [n.op.name for n in get_pass("drop_identities").run(graph).nodes] == ["Exp"]


def test_the_dsl_example_runs_as_written(tmp_path, monkeypatch, capsys):
    section = README.read_text().split("## The Python DSL", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, str(README), "exec"), {})
    assert capsys.readouterr().out.strip() == "True True"
    assert (tmp_path / "net.onnx").exists() and (tmp_path / "net.npz").exists()


def test_the_training_example_runs_as_written(tmp_path, monkeypatch, capsys):
    section = README.read_text().split("## Training", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(block, str(README), "exec"), {})
    assert capsys.readouterr().out.strip() == "True"
    for name in ("ckpt.npz", "ckpt.json", "trained.onnx"):
        assert (tmp_path / name).exists()
