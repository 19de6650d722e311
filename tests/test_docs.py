"""The README and docs/ against the code: the README's size and CI's test command, the sweep-field
table against the config classes, the claim table against the registry, the store's reader
snippets run on a real store, and every path, sweep name and link the docs mention exists."""

import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^```[^\n]*\n.*?^```[ \t]*$", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
CELL_SPLIT = re.compile(r"(?<!\\)\|")  # a Markdown table's cell separator (not an escaped \|)


def _prose(text: str) -> str:
    """The text without fenced blocks and code spans: what Markdown renders as links and headings."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def _table(path: Path, header: str) -> list[list[str]]:
    """The rows (lists of stripped cells) of the table whose header row starts with `header`."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:  # after the header and the |---| line
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in CELL_SPLIT.split(line.strip())[1:-1]])
    assert rows, f"{path.name}: no rows under {header!r}"
    return rows


def _ticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


# 1. the README: small, and CI's exact test command


def test_readme_is_at_most_12_kb_and_holds_cis_test_command():
    size = len(README.read_bytes())
    assert size <= 12_000, f"README.md is {size} bytes"
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci_command.startswith("python3 -m venv .venv")
    assert f"```bash\n{ci_command}\n```" in README.read_text(), "the README's test command is not the line .ci/run runs"


def test_readme_dependency_table_names_every_dependency():
    """Each requirement of pyproject.toml (run time, the extras, dev) has a row saying what it is for."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = [*project["dependencies"], *(d for extra in project["optional-dependencies"].values() for d in extra)]
    names = {re.match(r"[A-Za-z0-9_.-]+", d).group(0).lower() for d in required}
    rows = _table(README, "| package |")
    documented = {t.split("[")[0].lower() for row in rows for t in _ticked(row[0])}
    assert names <= documented, f"not in the README's dependency table: {sorted(names - documented)}"
    assert all(row[1] for row in rows)


# 2. the sweep-field table against the config classes


def _family_estimators() -> dict[str, set[str]]:
    from study.estimators import ESTIMATORS  # family -> name -> entry

    return {family: set(names) for family, names in ESTIMATORS.items()}


def test_sweep_field_table_lists_exactly_the_config_fields():
    from study import config

    classes = [*config.TASK_CONFIGS.values(), *config.MODEL_CONFIGS.values(), config.Train, config.Eval]
    fields = {name for cls in classes for name in cls.model_fields}
    rows = _table(ROOT / "docs" / "sweeps.md", "| field |")
    documented = {name for row in rows for name in _ticked(row[0])}
    assert fields - documented == set(), "config fields missing from docs/sweeps.md"
    assert documented - fields == set(), "docs/sweeps.md documents fields no config has"


def test_sweep_field_table_lists_each_familys_estimators():
    (row,) = [r for r in _table(ROOT / "docs" / "sweeps.md", "| field |") if _ticked(r[0]) == ["estimators"]]
    text = " | ".join(row[1:])
    listed = {family: set(_ticked(names)) for family, names in re.findall(r"(\w+): ((?:`\w+`(?:, )?)+)", text)}
    assert listed == _family_estimators()


# 3. the claim table against the registry


def test_claim_table_matches_the_registry():
    from analysis.claims import CLAIMS

    documented = {}
    for row in _table(ROOT / "docs" / "claims.md", "| claim | kind |"):
        kind = row[1].split()[0]
        for name in _ticked(row[0]):
            assert name not in documented, f"{name} twice in docs/claims.md"
            documented[name] = kind
    assert documented == {c.name: c.kind for c in CLAIMS}


# 4. the reader snippets of docs/store.md run on a real store

SNIPPETS = re.findall(r"^```python reader\n(.*?)^```", (ROOT / "docs" / "store.md").read_text(), re.M | re.S)
READERS = ("pandas", "pyarrow", "duckdb", "polars")
TABLES = ("trials", "evals", "fits")
TINY = {
    "name": "docs",
    "family": "gmm",
    "fixed": {"d": 2, "c": 2, "snr": 1.0, "lr": 2.0, "steps": 40, "log_every": 5, "B": 128, "M": [4, "inf"], "n_eval": 32},
    "grid": {"N": [5, 10]},
    "seeds": 2,
}


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    """A directory holding a store at `results`: 4 gmm runs written as a trial writes them, then
    `icl-study fit`, so that `fits` has rows (gmm-1-rate, per run)."""
    from typer.testing import CliRunner

    from pipelines.cli import app
    from pipelines.runner import execute_bundle
    from pipelines.sweep import parse_sweep

    here = tmp_path_factory.mktemp("docs")
    results = here / "results"
    sweep = parse_sweep(TINY, "docs.yaml")
    for bundle in sweep.bundles():
        execute_bundle(bundle.to_payload(), str(results), sweep.name, "test", "cpu")
    fitted = CliRunner().invoke(app, ["fit", "--store", str(results)])
    assert fitted.exit_code == 0, fitted.output
    return here


def _rows(table: Path) -> int:
    files = [p for p in table.rglob("*.parquet") if not any(part.startswith((".", "_")) for part in p.relative_to(table).parts)]
    return sum(pq.read_metadata(p).num_rows for p in files)


def test_store_md_has_one_reader_snippet_per_reader():
    assert len(SNIPPETS) == len(READERS)
    for snippet, reader in zip(SNIPPETS, READERS):
        assert f"import {reader}" in snippet, reader


@pytest.mark.parametrize("reader", READERS)
def test_reader_snippet_reads_the_store(reader, store_dir, monkeypatch):
    snippet = next(s for s in SNIPPETS if f"import {reader}" in s)
    monkeypatch.chdir(store_dir)
    namespace: dict = {}
    exec(compile(snippet, f"docs/store.md ({reader})", "exec"), namespace)
    for table in TABLES:
        expected = _rows(store_dir / "results" / table)
        assert expected > 0, table
        got = namespace[table]
        assert len(got) == expected, (reader, table)
        columns = got.column_names if hasattr(got, "column_names") else list(got.columns)
        assert "family" in columns, (reader, table)


# 5. paths, sweep names and links


def test_the_paths_and_sweeps_the_docs_name_exist():
    from analysis.claims import CLAIMS

    shipped = {p.stem for p in (ROOT / "pipelines" / "sweeps").glob("*.yaml")}
    claims = {c.name for c in CLAIMS}
    problems = []
    for path in [README, *DOCS]:
        text = path.read_text()
        for name in re.findall(r"(?<![\w/.~-])(?:benchmarks|pipelines|study|analysis|tests|docs|clusters)/[\w./-]*[\w/]|\.ci/run|\bcluster\.yaml\b", text):
            if not (ROOT / name).exists():
                problems.append(f"{path.name}: {name}")
        for name in re.findall(r"icl-study (?:run|plan) +(\w[\w.-]*)", text):
            if name not in shipped and name != "SWEEP" and not name.endswith(".yaml"):
                problems.append(f"{path.name}: icl-study run {name}")
    for name in _ticked(FENCE.sub("", README.read_text())):  # the README's code spans
        if re.fullmatch(r"quickstart|(?:gmm|mor)-[\w-]+", name) and name not in shipped | claims:
            problems.append(f"README.md: `{name}`")
    assert problems == [], problems


def test_the_options_the_docs_give_a_benchmark_exist():
    """`benchmarks/X.py --option` in the README or a doc: X.py defines that option (the docs once
    promised a `--quick` that some scripts lack)."""
    problems = []
    for path in [README, *DOCS]:
        for script, options in re.findall(r"benchmarks/(\w+)\.py((?:\s+--[\w-]+(?:[ =][^\s`-][^\s`]*)?)+)", path.read_text()):
            source = (ROOT / "benchmarks" / f"{script}.py").read_text()
            problems += [f"{path.name}: {script}.py {o}" for o in re.findall(r"--[\w-]+", options) if f'"{o}"' not in source]
    said = re.search(r"((?:`[\w.]+`, )*`[\w.]+`) and `([\w.]+)` also take `--quick`", (ROOT / "docs" / "benchmarks.md").read_text().replace("\n", " "))
    assert said, "docs/benchmarks.md no longer says which scripts take --quick"
    quick = {*re.findall(r"`([\w.]+)`", said.group(1)), said.group(2)}
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        assert ('"--quick"' in script.read_text()) == (script.name in quick), script.name
    assert problems == [], problems


def test_the_readme_layout_lists_every_module():
    layout = next(block for block in FENCE.findall(README.read_text()) if "\nstudy/" in block)
    listed, package = set(), None
    for line in layout.splitlines()[1:-1]:
        top = re.match(r"([\w.-]+/)\s", line)
        if top:
            package = top.group(1)
        elif package and (m := re.match(r"\s+([\w]+\.py)\s", line)):
            listed.add(package + m.group(1))
    existing = {f"{p.parent.name}/{p.name}" for d in ("study", "pipelines", "analysis") for p in (ROOT / d).glob("*.py") if p.name != "__init__.py"}
    assert existing - listed == set(), "modules missing from the README's layout"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r"#{1,6} +(.*)", line)
        if m:
            slug = _slug(m.group(1))
            anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_every_relative_link_and_anchor_resolves():
    problems = []
    for path in [README, *DOCS]:
        for target in re.findall(r"\]\(([^)\s]+)\)", _prose(path.read_text())):
            if re.match(r"[a-z]+:", target):
                continue  # an absolute address
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                problems.append(f"{path.name}: {target} (no such file)")
            elif anchor and (dest.suffix != ".md" or anchor not in _anchors(dest)):
                problems.append(f"{path.name}: {target} (no such heading)")
    assert problems == [], problems


def test_readme_links_every_doc():
    text = README.read_text()
    assert [d.name for d in DOCS if f"](docs/{d.name})" not in text] == []
