"""The README's "Hugging Face and PEFT" example runs as written and prints the summary it shows."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

pytestmark = pytest.mark.hf
README = Path(__file__).resolve().parents[2] / "README.md"


def section_code(name: str) -> list[str]:
    text = README.read_text()
    section = text.split(f"<!-- section:{name} -->", 1)[1].split(f"<!-- /section:{name} -->", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_hugging_face_example_runs_and_prints_the_summary(capsys: pytest.CaptureFixture[str]) -> None:
    example = section_code("hf")[0]
    exec(compile(example, "README.md (Hugging Face and PEFT)", "exec"), {"__name__": "readme_example"})
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    table = {row[0]: row[1:] for row in rows if row and row[0].startswith(("model.", "total"))}
    base = "model.base_model.model"
    assert [name for name in table if ".layers." in name] == [f"{base}.model.layers.{i}" for i in range(4)]
    assert table[f"{base}.model.layers.0"][:2] == ["43,136", "2,048"]  # q/v adapters of one layer, all trainable
    assert table["total"][:2] == ["188,992", "8,192"]
