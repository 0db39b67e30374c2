"""The docs: each Python block in README.md and docs/ compiles, type-checks and, if marked, runs.

A block may use names it does not define only if :data:`PRELUDE` declares them (with a type), so
mypy checks each call against the real API: a renamed or removed name fails here. Markers, on
the line before a block's fence:

* ``<!-- run -->``: the page's marked blocks are also executed, in order, as one script in a
  fresh interpreter; together they must define every name they use.
* ``<!-- no-check -->``: the block is only illustrative: it is compiled, nothing more.

The README's limits and the API reference's identifiers are checked here too.
"""

from __future__ import annotations

import builtins
import importlib.util
import os
import re
import subprocess
import symtable
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import celery_domain_events
import celery_domain_events.testing

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
DOC_FILES = [README, *sorted(DOCS.rglob("*.md"))]
README_MAX_CHARS = 8000

_FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w+-]*)\s*$")
_MARKER = re.compile(r"^\s*<!--\s*(?P<marker>run|no-check)\s*-->\s*$")

#: What a block may use without defining it, in dependency order: name -> declaration.
#: Names of the public API (``celery_domain_events`` and ``celery_domain_events.testing``) are
#: imported from there; everything else stands for the reader's own code.
PRELUDE: dict[str, str] = {
    "Any": "from typing import Any",
    "ClassVar": "from typing import ClassVar",
    "Celery": "from celery import Celery",
    "sessionmaker": "from sqlalchemy.orm import sessionmaker",
    "app": "from celery import Celery\napp: Celery",
    "db": "from typing import Any\ndb: Any  # the reader's database session",
    "engine": "from typing import Any\nengine: Any",
    "Base": "from sqlalchemy.orm import DeclarativeBase\nclass Base(DeclarativeBase): ...",
    "async_engine": "from sqlalchemy.ext.asyncio import AsyncEngine\nasync_engine: AsyncEngine",
    "Sessions": "from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker\n"
    "Sessions: async_sessionmaker[AsyncSession]",
    "transaction": "from typing import Any\ntransaction: Any  # django.db.transaction",
    "Order": "from typing import Any\nOrder: Any  # a Django model",
    "User": "from typing import Any\nUser: Any  # an SQLAlchemy model",
    "UserCreated": """\
from typing import ClassVar
from celery_domain_events import DomainEvent
class UserCreated(DomainEvent):
    event_name: ClassVar[str] = "user.created"
    user_id: int
    email: str""",
    "UserDeleted": """\
from typing import ClassVar
from celery_domain_events import DomainEvent
class UserDeleted(DomainEvent):
    event_name: ClassVar[str] = "user.deleted"
    user_id: int""",
    "OrderPaid": """\
from decimal import Decimal
from typing import ClassVar
from celery_domain_events import DomainEvent
class OrderPaid(DomainEvent):
    event_name: ClassVar[str] = "order.paid"
    order_id: int
    amount: Decimal""",
    "send_welcome_email": """\
from celery_domain_events import domain_event_handler
@domain_event_handler("user.*")
def send_welcome_email(event: UserCreated) -> None: ...""",
}
_PRELUDE_NEEDS = {"send_welcome_email": {"UserCreated"}}
_PUBLIC = {
    **dict.fromkeys(celery_domain_events.__all__, "celery_domain_events"),
    **dict.fromkeys(celery_domain_events.testing.__all__, "celery_domain_events.testing"),
}


@dataclass(frozen=True)
class Block:
    """One fenced code block of a Markdown file."""

    path: Path
    line: int  # of the first line of code
    lang: str
    code: str
    marker: str | None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def code_blocks(path: Path) -> list[Block]:
    """Return the fenced code blocks of ``path``, dedented, with the marker before each."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        indent = len(fence["indent"])
        end = i + 1
        while lines[end].strip() != "```":
            end += 1
        before = next((line for line in reversed(lines[:i]) if line.strip()), "")
        marker = _MARKER.match(before)
        blocks.append(
            Block(
                path=path,
                line=i + 2,
                lang=fence["lang"],
                code="".join(line[indent:] + "\n" for line in lines[i + 1 : end]),
                marker=marker["marker"] if marker else None,
            )
        )
        i = end + 1
    return blocks


PYTHON_BLOCKS = [b for path in DOC_FILES for b in code_blocks(path) if b.lang == "python"]
CHECKED = [b for b in PYTHON_BLOCKS if b.marker is None]
RUN_PAGES = sorted({b.path for b in PYTHON_BLOCKS if b.marker == "run"})


def run_script(path: Path) -> str:
    """The ``<!-- run -->`` blocks of ``path``, in order, as one script."""
    return "".join(b.code for b in PYTHON_BLOCKS if b.path == path and b.marker == "run")


def free_names(code: str) -> set[str]:
    """Names ``code`` uses at module level, or as globals, without binding them."""
    top = symtable.symtable(code, "<block>", "exec")
    bound = {
        s.get_name()
        for s in top.get_symbols()
        if s.is_assigned() or s.is_imported() or s.is_namespace()
    }
    used: set[str] = set()

    def walk(table: symtable.SymbolTable) -> None:
        for symbol in table.get_symbols():
            if symbol.is_referenced() and (table is top or symbol.is_global()):
                used.add(symbol.get_name())
        for child in table.get_children():
            walk(child)

    walk(top)
    return used - bound - set(dir(builtins))


def prelude(names: set[str]) -> str:
    """The declarations of ``names`` (and what they need), for a block that uses them."""
    wanted = set(names)
    for name in names:
        wanted |= _PRELUDE_NEEDS.get(name, set())
    parts = [f"from {_PUBLIC[name]} import {name}" for name in sorted(wanted) if name in _PUBLIC]
    parts += [PRELUDE[name] for name in PRELUDE if name in wanted and name not in _PUBLIC]
    return "\n".join(parts) + "\n" if parts else ""


def test_the_docs_have_python_blocks_to_check() -> None:
    assert len(CHECKED) >= 10, [b.where for b in PYTHON_BLOCKS]
    assert README in RUN_PAGES  # the quickstart runs


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=lambda b: b.where)
def test_python_block_compiles(block: Block) -> None:
    compile(block.code, block.where, "exec")


@pytest.mark.parametrize("block", CHECKED, ids=lambda b: b.where)
def test_python_block_uses_only_declared_names(block: Block) -> None:
    unknown = free_names(block.code) - set(PRELUDE) - set(_PUBLIC)
    assert not unknown, (
        f"{block.where} uses {sorted(unknown)} without defining them: define them in the "
        "block, or declare them in PRELUDE in tests/test_docs.py"
    )


@pytest.mark.parametrize("page", RUN_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_runnable_blocks_are_self_contained(page: Path) -> None:
    unknown = free_names(run_script(page))
    assert not unknown, f"the <!-- run --> blocks of {page} use undefined names: {unknown}"


@pytest.mark.parametrize("page", RUN_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_runnable_blocks_run(page: Path, tmp_path: Path) -> None:
    script = tmp_path / "doc_script.py"
    script.write_text(run_script(page), encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-W", "error", str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_python_blocks_type_check(tmp_path: Path) -> None:
    if importlib.util.find_spec("mypy") is None:
        if os.environ.get("CI"):
            pytest.fail("mypy is not installed (the lint dependency group)")
        pytest.skip("mypy is not installed (the lint dependency group)")
    # One mypy run over every block: each block is a module, preceded by its prelude; the
    # <!-- run --> blocks of a page are one module, as they run.
    modules: dict[str, list[tuple[int, Block]]] = {}  # file -> (first line, block) in order
    for n, block in enumerate(CHECKED):
        head = prelude(free_names(block.code))
        modules[f"doc_block_{n}.py"] = [(head.count("\n") + 1, block)]
        (tmp_path / f"doc_block_{n}.py").write_text(head + block.code, encoding="utf-8")
    for n, page in enumerate(RUN_PAGES):
        first, parts = 1, []
        for block in (b for b in PYTHON_BLOCKS if b.path == page and b.marker == "run"):
            parts.append((first, block))
            first += block.code.count("\n")
        modules[f"doc_page_{n}.py"] = parts
        (tmp_path / f"doc_page_{n}.py").write_text(run_script(page), encoding="utf-8")
    config = tmp_path / "mypy.ini"
    config.write_text(
        "[mypy]\n"
        "plugins = pydantic.mypy\n"
        "ignore_missing_imports = True\n"
        "follow_imports = silent\n"
        "check_untyped_defs = True\n",
        encoding="utf-8",
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(config),
            "--cache-dir",
            str(ROOT / ".mypy_cache" / "docs"),
            "--no-error-summary",
            "--hide-error-context",
            *sorted(str(tmp_path / name) for name in modules),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    errors = []
    for line in result.stdout.splitlines():
        match = re.match(r"^(?:.*[/\\])?(doc_\w+\.py):(\d+): (.*)$", line)
        if match is None:
            errors.append(line)
            continue
        number = int(match[2])
        parts = modules[match[1]]
        # An error in a prelude is reported at the block's first line.
        first, block = next(((f, b) for f, b in reversed(parts) if f <= number), parts[0])
        line_no = block.line + max(0, number - first)
        errors.append(f"{block.path.relative_to(ROOT)}:{line_no}: {match[3]}")
    assert result.returncode == 0, "\n".join(errors or [result.stderr])
    assert not errors, "\n".join(errors)


def test_readme_is_at_most_8000_characters() -> None:
    size = len(README.read_text(encoding="utf-8"))
    assert size <= README_MAX_CHARS, f"README.md has {size} characters: move some to docs/"


def test_readme_links_point_at_files_that_exist() -> None:
    text = README.read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if "://" not in link]
    assert local, "the README links to the docs"
    missing = [link for link in local if not (ROOT / link).is_file()]
    assert not missing, missing


def test_snippets_name_sections_that_exist() -> None:
    # pymdownx.snippets includes README sections into the site; a renamed marker would
    # silently include nothing.
    for page in DOCS.rglob("*.md"):
        for file, section in re.findall(r'--8<-- "([^":]+)(?::([\w-]+))?"', page.read_text()):
            assert (ROOT / file).is_file(), f"{page}: {file}"
            source = (ROOT / file).read_text(encoding="utf-8")
            if section:
                start = f"--8<-- [start:{section}]"
                end = f"--8<-- [end:{section}]"
                assert start in source, f"{page}: no {start} in {file}"
                assert end in source, f"{page}: no {end} in {file}"
                assert source.index(start) < source.index(end)


def test_the_reference_documents_the_public_api_through_public_names() -> None:
    identifiers = [
        line.split(":::", 1)[1].strip()
        for page in (DOCS / "reference").rglob("*.md")
        for line in page.read_text(encoding="utf-8").splitlines()
        if line.startswith(":::")
    ]
    public = {f"celery_domain_events.{name}" for name in celery_domain_events.__all__} | {
        f"celery_domain_events.testing.{name}" for name in celery_domain_events.testing.__all__
    }
    # The integrations are public through their own modules' __all__ (read without importing
    # them: Django's needs settings), as is the inbox protocol's DUPLICATE.
    integrations = {
        i
        for i in identifiers
        if i.startswith(("celery_domain_events.contrib.", "celery_domain_events.inbox."))
    }
    for identifier in sorted(integrations):
        module, name = identifier.rsplit(".", 1)
        path = ROOT / (module.replace(".", "/") + ".py")
        exported = _module_all(path)
        assert name in exported, f"{identifier} is not in {module}.__all__"
    # Internal module paths move; the reference names objects only through the public API.
    assert set(identifiers) - integrations <= public, sorted(set(identifiers) - public)
    assert public - set(identifiers) == {"celery_domain_events.__version__"}


def _module_all(path: Path) -> list[str]:
    import ast

    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return [ast.literal_eval(e) for e in node.value.elts]  # type: ignore[attr-defined]
    return []
