"""Every code block of the README and of the documentation pages runs, and every command they show exists.

- ```` ```python ```` blocks are executed, each in a fresh namespace, in a temporary folder. Trainers are cut to
  2 batches per epoch (the epochs, schedules and callbacks stay as written), so an example that trains costs a
  second or two. A block that needs an optional package is marked on the line before its fence:
  ``<!-- requires: transformers, peft -->``; it is skipped only when one of them is missing.
- ```` ```bash ```` blocks: every ``python scripts/train.py`` / ``lit-partial-train`` line is composed with
  Hydra's Compose API (unknown keys, presets and bad values fail, as the job would before running), ``make``
  targets exist in the Makefile, ``--config`` files and ``python -m benchmarks --only`` sections exist, and
  ``pip install`` extras exist in pyproject.toml.
"""

from __future__ import annotations

import importlib
import re
import shlex
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").rglob("*.md") if "_build" not in p.parts)]
FENCE = re.compile(
    r"^(?P<marker><!-- requires: (?P<requires>[^>]*) -->\n)?"
    r"(?P<indent>[ ]*)```(?P<lang>[\w{}-]*)\n(?P<body>.*?)^(?P=indent)```",
    flags=re.S | re.M,
)
#: What the test harness gives every Trainer an example builds (what it passes itself is kept otherwise).
FAST_TRAINER = {"limit_train_batches": 2, "limit_val_batches": 2, "enable_progress_bar": False}


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    lang: str
    code: str
    requires: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(lang: str) -> list[Block]:
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in FENCE.finditer(text):
            if match["lang"] != lang:
                continue
            requires = tuple(r.strip() for r in (match["requires"] or "").split(",") if r.strip())
            line = text.count("\n", 0, match.start("body")) + 1
            found.append(Block(page, line, lang, textwrap.dedent(match["body"]), requires))
    return found


PYTHON = blocks("python")
SHELL = blocks("bash")


def test_every_fence_is_seen() -> None:
    # A fence the pattern misses (odd indentation, a marker typo) would silently not run.
    for page in PAGES:
        text = page.read_text()
        assert len(re.findall(r"^[ ]*```", text, flags=re.M)) == 2 * len(FENCE.findall(text)), page


@pytest.fixture
def fast_trainer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # lightning_logs/, checkpoints/ and outputs/ of the examples land here
    original = L.Trainer.__init__

    def init(self: L.Trainer, *args: Any, **kwargs: Any) -> None:
        kwargs.update(FAST_TRAINER)
        kwargs.setdefault("enable_model_summary", False)
        original(self, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "__init__", init)


@pytest.mark.parametrize("block", PYTHON, ids=[b.id for b in PYTHON])
@pytest.mark.usefixtures("fast_trainer")
def test_python_block_runs(block: Block, capsys: pytest.CaptureFixture[str]) -> None:
    for module in block.requires:
        pytest.importorskip(module)
    exec(compile(block.code, block.id, "exec"), {"__name__": f"docs_example_{block.line}"})
    if block.page.name == "huggingface.md" and "partial_summary(depth=3)" in block.code:
        check_hugging_face_summary(capsys.readouterr().out)


def check_hugging_face_summary(out: str) -> None:
    """The Hugging Face guide's example prints the summary the page shows (adapters of 4 layers trainable)."""
    rows = [line.split() for line in out.splitlines()]
    table = {row[0]: row[1:] for row in rows if row and row[0].startswith(("model.", "total"))}
    base = "model.base_model.model"
    assert [name for name in table if ".layers." in name] == [f"{base}.model.layers.{i}" for i in range(4)]
    assert table[f"{base}.model.layers.0"][:2] == ["43,136", "2,048"]  # q/v adapters of one layer, all trainable
    assert table["total"][:2] == ["188,992", "8,192"]


def test_optional_dependencies_are_marked_not_hidden() -> None:
    # Only blocks that import an optional package may carry a requires marker, and each such block does.
    optional = ("transformers", "peft")
    for block in PYTHON:
        imports = {m for m in optional if re.search(rf"^\s*(from|import) {m}\b", block.code, flags=re.M)}
        if re.search(r"^\s*from lit_partial\.demos import .*\bByteLM\b", block.code, flags=re.M):
            imports.add("transformers")  # the demo LM is a Hugging Face Llama built from a config
        assert set(block.requires) == imports, f"{block.id}: marker {block.requires} but imports {sorted(imports)}"


# ---------------------------------------------------------------- shell blocks


def commands(block: Block) -> list[list[str]]:
    joined = block.code.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            out.append(words)
    return out


SHELL_COMMANDS = [(b, words) for b in SHELL for words in commands(b)]


def make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*):", (ROOT / "Makefile").read_text(), flags=re.M))


def extras() -> set[str]:
    text = (ROOT / "pyproject.toml").read_text()  # no tomllib on Python 3.10
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([\w-]+) = \[", section, flags=re.M))


def compose_job(args: list[str]) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from lit_partial.app.cli import quote_checkpoint_paths
    from lit_partial.app.config import CONF_DIR, register_configs

    # What the job does before Hydra parses: quote checkpoint paths; -m/--multirun and --cfg job are flags.
    # Placeholders such as <date> stand for what the reader fills in.
    args = [re.sub(r"<(\w+)>", r"\1", a) for a in args]
    overrides = [a for a in quote_checkpoint_paths(args) if not a.startswith("-") and a != "job"]
    parsed = OverridesParser.create().parse_overrides(overrides)
    first = []
    for override in parsed:
        if override.is_sweep_override():
            first.append(f"{override.get_key_element()}={next(iter(override.sweep_string_iterator()))}")
        else:
            first.append(override.input_line)
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            compose(config_name="train", overrides=first, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.parametrize(("block", "words"), SHELL_COMMANDS, ids=[f"{b.id}:{w[:3]}" for b, w in SHELL_COMMANDS])
def test_shell_command_refers_to_what_exists(block: Block, words: list[str]) -> None:
    if words[0] == "make":
        assert set(words[1:]) <= make_targets(), f"{block.id}: {words}"
    elif words[:2] == ["python", "scripts/train.py"] or words[0] == "lit-partial-train":
        compose_job(words[2:] if words[0] == "python" else words[1:])
    elif words[:2] == ["python", "examples/lightning_cli/train.py"]:
        configs = [words[i + 1] for i, w in enumerate(words) if w == "--config"]
        assert configs, words
        for config in configs:
            assert (ROOT / config).is_file(), f"{block.id}: {config}"
    elif words[:3] == ["python", "-m", "benchmarks"]:
        sections = words[words.index("--only") + 1 :] if "--only" in words else []
        for section in (s for s in sections if not s.startswith("-")):
            assert (ROOT / "benchmarks" / f"{section}.py").is_file(), f"{block.id}: {section}"
    elif words[:3] == ["pip", "install", "-e"]:
        found = re.findall(r"\[([\w,]+)\]", words[3])
        for extra in (e for group in found for e in group.split(",")):
            assert extra in extras(), f"{block.id}: extra {extra!r}"


def test_links_to_pages_exist() -> None:
    # Markdown links to files of the repository (relative links, not URLs or anchors) point at files that exist.
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            path = (page.parent / target).resolve()
            assert path.exists(), f"{page.relative_to(ROOT)}: {target}"


# ---------------------------------------------------------------- YAML blocks

YAML = blocks("yaml")


def _import(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _class_paths(node: Any) -> list[dict[str, Any]]:
    if isinstance(node, dict):
        found = [node] if "class_path" in node else []
        return found + [item for value in node.values() for item in _class_paths(value)]
    if isinstance(node, list):
        return [item for value in node for item in _class_paths(value)]
    return []


@pytest.mark.parametrize("block", YAML, ids=[b.id for b in YAML])
def test_yaml_block_builds(block: Block) -> None:
    # LightningCLI-style blocks: every class_path imports, and every callback builds from its init_args.
    import yaml
    from lightning.pytorch.callbacks import Callback

    items = _class_paths(yaml.safe_load(block.code))
    assert items, f"{block.id}: no class_path"
    for item in items:
        cls = _import(item["class_path"])
        if isinstance(cls, type) and issubclass(cls, Callback):
            cls(**item.get("init_args", {}))


def test_readme_is_one_screen_and_links_the_site() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 250  # the manual lives in docs/; the README stays short
    assert "make docs" in readme and "docs/getting_started.md" in readme


def test_no_skipped_doctests_outside_optional_dependencies() -> None:
    # A `+SKIP` hides an example from the doctests; only examples needing an optional package may use it.
    for path in sorted((ROOT / "lit_partial").rglob("*.py")):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if "doctest: +SKIP" in line:
                context = "\n".join(lines[max(0, i - 30) : i + 1])
                assert re.search(r">>> (from|import) (transformers|peft)\b", context), f"{path}:{i + 1}"


def test_make_docs_builds_with_warnings_as_errors_in_ci() -> None:
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\ndocs: ", 1)[1].split("\n\n", 1)[0]
    assert "sphinx -W" in recipe and "docs/_build" in recipe
    assert '-e ".[docs]"' in makefile.split("$(STAMP_DOCS):", 1)[1].split("\n\n", 1)[0]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci.index("make docs") > ci.index("make test")
    assert "docs/_build/" in (ROOT / ".gitignore").read_text().splitlines()


def test_every_public_callback_is_in_the_api_reference() -> None:
    import lit_partial.callbacks

    page = "".join((ROOT / "docs" / "api" / name).read_text() for name in ("callbacks.md", "extending.md"))
    documented = set(re.findall(r"autoclass:: (?:\S+\.)?(\w+)$", page, flags=re.M))
    missing = [name for name in lit_partial.callbacks.__all__ if name not in documented]
    assert not missing, f"add `.. autoclass:: <name>` (and an autosummary line) to docs/api/callbacks.md for {missing}"
