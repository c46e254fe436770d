"""Docs that cannot drift: the README stays short, docs/architecture.md's map names exactly the
package's modules, and every repository path the docs or a docstring name exists.

What counts as a repository path (`repository_paths`): a token that starts with the name of a
top-level file or folder git tracks (`llm_packager/...`, `conf/model/*.yaml`, `MLproject`,
`.ci/run`, ...), not preceded by a letter, `/`, `.` or `:` (so `~/.cache/llm_packager/logs/` and
`git show <commit>:llm_packager/...` are not read as paths of today's tree). `<placeholder>`
segments and `*` are globs, `{a,b}` is expanded, and a path is there when its glob matches
something. Dotted module names count too (`python -m benchmarks.memory`,
`llm_packager.choices.Device`): each component must be a module or package, and the first name
after a module must occur in that module's source. Two-part `llm_packager.<name>` is a tag key
(`llm_packager.outputs`) unless `python -m` runs it. Relative Markdown links in the docs must
reach a file, and their `#anchor` a heading of it.
"""

from __future__ import annotations

import ast
import itertools
import re
import subprocess
from functools import cache
from pathlib import Path

import pytest

from llm_packager.project import PROJECT_DIR

README_MAX_LINES = 300
ARCHITECTURE = PROJECT_DIR / "docs" / "architecture.md"
# The heading of the section in docs/architecture.md that maps the package.
MAP_HEADING = "## The map"
DOCSTRING_FOLDERS = ("llm_packager", "steps", "benchmarks", "tests")
MODULE_ROOTS = ("llm_packager", "steps", "benchmarks", "tests")

# Dotted names ending in these are file names (a link to `steps.md`), not modules.
FILE_SUFFIXES = {"md", "py", "json", "jsonl", "yaml", "yml", "txt", "html", "png", "csv", "log"}
_SEGMENT = r"(?:[\w.*-]|<[^<>\s/]+>|\{[\w.,*-]+\})+"
_NOT_AFTER = r"(?<![\w./:-])"


@cache
def tracked_roots(project_dir: Path = PROJECT_DIR) -> tuple[str, ...]:
    """The top-level names git tracks, longest first so `requirements-dev.txt` beats
    `requirements.txt`; ignored things (`mlruns/`, `mlflow.db`) are not the repository's."""
    listed = subprocess.run(
        ["git", "-C", str(project_dir), "ls-files"], capture_output=True, text=True, check=True
    ).stdout.split()
    return tuple(sorted({path.split("/")[0] for path in listed}, key=len, reverse=True))


def _path_pattern(roots: tuple[str, ...]) -> re.Pattern:
    names = "|".join(re.escape(root) for root in roots)
    return re.compile(rf"{_NOT_AFTER}(?:{names})(?:/{_SEGMENT})*/?(?![\w-])")


def _expand_braces(path: str) -> list[str]:
    parts = re.split(r"(\{[^{}]*\})", path)
    options = [part[1:-1].split(",") if part.startswith("{") else [part] for part in parts]
    return ["".join(choice) for choice in itertools.product(*options)]


def repository_paths(text: str, roots: tuple[str, ...] | None = None) -> set[str]:
    """The repository paths (as globs, braces expanded) that `text` names."""
    pattern = _path_pattern(roots or tracked_roots())
    found = set()
    for match in pattern.finditer(text):
        token = match.group(0).rstrip(".,")
        for path in _expand_braces(token):
            found.add(re.sub(r"<[^<>]*>", "*", path))
    return found


def missing_paths(paths: set[str], project_dir: Path = PROJECT_DIR) -> list[str]:
    """The paths of `paths` that match nothing in the project."""
    return sorted(p for p in paths if not any(project_dir.glob(p.rstrip("/") or ".")))


def module_names(text: str) -> set[str]:
    """Dotted module references: `steps.main`, `benchmarks.memory`, `llm_packager.config.specs`,
    `llm_packager.choices.Device` and `python -m llm_packager.generate`. A two-part
    `llm_packager.<name>` is a tag key."""
    roots = "|".join(MODULE_ROOTS)
    dotted = re.compile(
        rf"{_NOT_AFTER}(?P<run>python -m )?(?P<name>(?:{roots})(?:\.(?:\w+|<\w+>))+)"
    )
    found = set()
    for match in dotted.finditer(text):
        name = match["name"]
        if name.rsplit(".", 1)[1] in FILE_SUFFIXES:
            continue  # a file name such as steps.md, not a module
        if not match["run"] and _is_stored_key(name):
            continue  # a tag or metric key such as llm_packager.outputs, not a module
        found.add(name)
    return found


@cache
def _stored_keys() -> frozenset[str]:
    """Every key string the project stores: the values of llm_packager.keys."""
    import llm_packager.keys as keys

    return frozenset(v for k, v in vars(keys).items() if k.isupper() and isinstance(v, str))


def _is_stored_key(name: str) -> bool:
    """A key, or one of a family's keys (``llm_packager.upstream.`` + a step name; the bare
    namespace ``llm_packager.`` is no family, or every module name would pass)."""
    families = [key for key in _stored_keys() if key.endswith(".") and key.count(".") > 1]
    return name in _stored_keys() or any(
        name.startswith(family) or name == family[:-1] for family in families
    )


def missing_modules(names: set[str], project_dir: Path = PROJECT_DIR) -> list[str]:
    """The dotted names of `names` that do not resolve to a module, package or module attribute."""
    return sorted(name for name in names if not _resolves(name.split("."), project_dir))


def _mentions(module: Path, name: str) -> bool:
    return re.search(rf"\b{re.escape(name)}\b", module.read_text()) is not None


def _resolves(parts: list[str], project_dir: Path) -> bool:
    here = project_dir / parts[0]
    for index, part in enumerate(parts[1:], start=1):
        if not here.is_dir():
            return False
        glob = "*" if part.startswith("<") else part
        if module := next(here.glob(f"{glob}.py"), None):
            rest = parts[index + 1 :]
            return not rest or _mentions(module, rest[0])
        if (here / part).is_dir():
            here = here / part
            continue
        # A name a package's __init__ exports (`llm_packager.pipeline.run_pipeline`).
        init = here / "__init__.py"
        return init.is_file() and _mentions(init, part)
    return here.is_dir() or here.with_suffix(".py").is_file()


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def broken_links(path: Path, project_dir: Path = PROJECT_DIR) -> list[str]:
    """The relative Markdown links of `path` whose file or `#anchor` does not exist."""
    text = path.read_text()
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # a URL
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", linked.read_text(), flags=re.MULTILINE)
            if anchor not in {_slug(heading) for heading in headings}:
                broken.append(target)
    return broken


def docstrings(path: Path) -> str:
    """Every module, class and function docstring of a Python file, one after another."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = [tree, *(node for node in ast.walk(tree) if isinstance(
        node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))]  # fmt: skip
    return "\n".join(text for node in nodes if (text := ast.get_docstring(node)))


def documents(project_dir: Path = PROJECT_DIR) -> dict[Path, str]:
    """What the drift check reads: README.md, docs/*.md, and the docstrings of the code."""
    texts = {project_dir / "README.md": (project_dir / "README.md").read_text()}
    texts |= {path: path.read_text() for path in sorted((project_dir / "docs").rglob("*.md"))}
    for folder in DOCSTRING_FOLDERS:
        for path in sorted((project_dir / folder).rglob("*.py")):
            if "__pycache__" not in path.parts:
                texts[path] = docstrings(path)
    return texts


def map_section(text: str) -> str:
    """The map section of docs/architecture.md: from its heading to the next `## ` heading."""
    start = text.index(MAP_HEADING + "\n")
    end = text.find("\n## ", start + len(MAP_HEADING))
    return text[start:] if end == -1 else text[start:end]


def package_entries(project_dir: Path = PROJECT_DIR) -> set[str]:
    """Every module of llm_packager/ but the `__init__.py` files, and every subpackage, in the
    path form the map uses (`llm_packager/sources/hub.py`, `llm_packager/sources/`)."""
    package = project_dir / "llm_packager"
    modules = {
        path.relative_to(project_dir).as_posix()
        for path in package.rglob("*.py")
        if "__pycache__" not in path.parts and path.name != "__init__.py"
    }
    folders = {
        path.parent.relative_to(project_dir).as_posix() + "/"
        for path in package.rglob("__init__.py")
        if path.parent != package
    }
    return modules | folders


def map_drift(map_text: str, project_dir: Path = PROJECT_DIR) -> tuple[list[str], list[str]]:
    """(entries the map leaves out, paths the map names that do not exist)."""
    named = {p for p in repository_paths(map_text, ("llm_packager",)) if "*" not in p}
    left_out = sorted(package_entries(project_dir) - named)
    gone = sorted(p for p in named if not (project_dir / p).exists())
    return left_out, gone


def line_count(path: Path) -> int:
    return len(path.read_text().splitlines())


def test_the_readme_is_at_most_300_lines():
    lines = line_count(PROJECT_DIR / "README.md")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move reference text to docs/"


def test_the_architecture_map_names_every_module_and_only_modules_that_exist():
    left_out, gone = map_drift(map_section(ARCHITECTURE.read_text()))
    assert not left_out, f"docs/architecture.md's map leaves out: {', '.join(left_out)}"
    assert not gone, f"docs/architecture.md's map names what does not exist: {', '.join(gone)}"


def test_every_repository_path_in_the_docs_and_docstrings_exists():
    problems = []
    for path, text in documents().items():
        where = path.relative_to(PROJECT_DIR)
        problems += [f"{where}: {p}" for p in missing_paths(repository_paths(text))]
        problems += [f"{where}: {name}" for name in missing_modules(module_names(text))]
        if path.suffix == ".md":
            problems += [f"{where}: link {target}" for target in broken_links(path)]
    assert not problems, "named but not in the repository:\n" + "\n".join(problems)


def test_the_readme_keeps_the_test_command_that_ci_runs():
    # .ci/run runs the code block right after this marker; without it CI runs nothing.
    readme = (PROJECT_DIR / "README.md").read_text()
    assert re.search(r"<!-- test command: run by \.ci/run -->\n```bash\n.*python -m pytest", readme)


# The checks above pass on today's tree; these show each one fails on a planted fault.


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("see `llm_packager/sources/hub.py`.", {"llm_packager/sources/hub.py"}),
        ("steps/<step>.py and conf/model/*.yaml", {"steps/*.py", "conf/model/*.yaml"}),
        ("llm_packager/{errors,choices}.py", {"llm_packager/errors.py", "llm_packager/choices.py"}),
        ("run .ci/run, edit MLproject.", {".ci/run", "MLproject"}),
        ("~/.cache/llm_packager/logs/ and git show abc:steps/old.py", set()),
        ("requirements-dev.txt", {"requirements-dev.txt"}),
    ],
)
def test_repository_paths_are_read_from_text(text, expected):
    assert repository_paths(text) == expected


def test_a_planted_missing_path_is_reported():
    paths = repository_paths("`llm_packager/no_such_module.py`, conf/model/<name>.yaml, docs/")
    assert missing_paths(paths) == ["llm_packager/no_such_module.py"]
    assert missing_paths(repository_paths("conf/nowhere/*.yaml")) == ["conf/nowhere/*.yaml"]


def test_a_planted_missing_module_name_is_reported():
    names = module_names(
        "python -m benchmarks.memory, `llm_packager.choices.Device`, the tag llm_packager.outputs,"
        " python -m benchmarks.nothing, llm_packager.choices.NoSuchName, steps.<step>,"
        " the old module llm_packager.memory_budget,"
        " the key family llm_packager.upstream.fetch_model,"
        " [x](steps.md)"
    )
    assert "llm_packager.outputs" not in names and "steps.md" not in names
    assert "llm_packager.upstream.fetch_model" not in names
    assert missing_modules(names) == [
        "benchmarks.nothing",
        "llm_packager.choices.NoSuchName",
        "llm_packager.memory_budget",
    ]


def test_a_planted_broken_link_is_reported(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## Reusing step runs\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#reusing-step-runs) [gone](missing.md) [bad anchor](other.md#nothing)"
        " [web](https://example.org/x)"
    )
    assert broken_links(page, tmp_path) == ["missing.md", "other.md#nothing"]


def test_the_map_check_reports_a_module_left_out_and_one_that_is_gone():
    complete = "\n".join(sorted(package_entries()))
    assert map_drift(complete) == ([], [])
    left_out, gone = map_drift(
        complete.replace("llm_packager/sources/hub.py", "") + "\nllm_packager/old_name.py"
    )
    assert left_out == ["llm_packager/sources/hub.py"]
    assert gone == ["llm_packager/old_name.py"]


def test_line_count_counts_a_last_line_without_a_newline(tmp_path):
    # A README of 301 lines whose last one has no newline must still count as 301.
    readme = tmp_path / "README.md"
    readme.write_text("line\n" * README_MAX_LINES + "one too many")
    assert line_count(readme) == README_MAX_LINES + 1
