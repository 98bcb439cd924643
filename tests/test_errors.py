"""The error boundary: a medfm error is one line and status 2, a bug is one line and status 1 (traceback on demand),
and nothing inside the package imports the command line."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import medfm
from medfm.errors import CheckpointError, ConfigError, ManifestError, MedfmError, ModelError, run_guarded

SRC = Path(medfm.__file__).parent


def _imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; ``from medfm import cli`` counts as ``medfm.cli``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_nothing_in_the_package_imports_the_command_line():
    files = [p for p in SRC.rglob("*.py") if p != SRC / "cli.py"]
    assert len(files) > 50  # the walk really reads the package
    importers = [str(p.relative_to(SRC)) for p in files if "medfm.cli" in _imported_modules(p)]
    assert importers == []


def test_the_walk_sees_an_import_of_the_command_line(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from medfm import cli\n    return cli\n")
    assert "medfm.cli" in _imported_modules(sample)


def test_error_classes_are_also_the_builtin_they_specialise():
    assert issubclass(ConfigError, MedfmError) and issubclass(ConfigError, ValueError)
    assert issubclass(ManifestError, ValueError) and issubclass(CheckpointError, ValueError)
    assert issubclass(ModelError, LookupError)
    assert str(ModelError("unknown model x")) == "unknown model x"  # no KeyError quoting


def _raise(err: BaseException):
    def command():
        raise err

    return command


def test_a_medfm_error_is_one_line_and_status_2(capsys, monkeypatch):
    monkeypatch.delenv("MEDFM_DEBUG", raising=False)
    assert run_guarded(_raise(ConfigError("--cv 1: give at least 2 folds"))) == 2
    assert capsys.readouterr().err == "medfm: error: --cv 1: give at least 2 folds\n"


@pytest.mark.parametrize("bug", [ValueError("bad\nvalue"), KeyError("feat_0"), ZeroDivisionError("division by zero")])
def test_a_bug_is_not_reported_as_a_user_error(bug, capsys, monkeypatch):
    monkeypatch.delenv("MEDFM_DEBUG", raising=False)
    assert run_guarded(_raise(bug)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"medfm: internal error: {type(bug).__name__}: ")
    assert err.endswith("(run with MEDFM_DEBUG=1 for the traceback)\n")
    assert "medfm: error:" not in err


def test_medfm_debug_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("MEDFM_DEBUG", "1")
    with pytest.raises(KeyError, match="feat_0"):
        run_guarded(_raise(KeyError("feat_0")))
    with pytest.raises(ConfigError):
        run_guarded(_raise(ConfigError("x")))
    monkeypatch.setenv("MEDFM_DEBUG", "0")
    assert run_guarded(_raise(ConfigError("x"))) == 2


def test_interrupt_and_success(capsys):
    assert run_guarded(lambda: None) == 0
    assert run_guarded(_raise(KeyboardInterrupt()), "continue with --resume") == 130
    assert capsys.readouterr().err == "medfm: interrupted; continue with --resume\n"


def test_a_bad_option_value_from_the_library_is_a_user_error(tmp_path, capsys):
    from medfm.cli import main

    table = tmp_path / "t.csv"
    table.write_text("feat_0,feat_1,y\n" + "".join(f"{i},{i % 3},{i % 2}\n" for i in range(20)))
    assert main(["fewshot", str(table), "--label", "y", "--ways", "2", "--shots", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medfm: error: ") and "shots" in err


@pytest.fixture
def tables(tmp_path, monkeypatch):
    """A good feature table with labels and survival columns, and copies with a word where a number belongs (the
    commands run in tmp_path, where any default output folder goes)."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    good = pd.DataFrame(rng.normal(size=(40, 3)), columns=["feat_0", "feat_1", "feat_2"])
    good["y"] = [0, 1] * 20
    good["time"] = np.arange(40) + 1.0
    good["event"] = [1, 0] * 20
    paths = {"good": tmp_path / "good.csv"}
    good.to_csv(paths["good"], index=False)
    bad = good.astype({"feat_1": object, "time": object})
    bad.loc[3, "feat_1"] = "abc"
    bad.loc[2, "time"] = "soon"
    bad.loc[7, "time"] = "later"
    paths["bad"] = tmp_path / "bad.csv"
    bad.to_csv(paths["bad"], index=False)
    return paths


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["probe", "{bad}", "--label", "y", "--out", "{out}"], "column feat_1, row 3 holds 'abc', not a number"),
        (["knn", "{bad}", "--label", "y"], "column feat_1, row 3 holds 'abc', not a number"),
        (["compare", "{good}", "{bad}", "--label", "y"], "column feat_1, row 3 holds 'abc', not a number"),
    ],
    ids=["probe", "knn", "compare"],
)
def test_a_word_in_a_feature_column_is_a_user_error(tables, tmp_path, capsys, command, expected):
    from medfm.cli import main

    args = [a.format(bad=tables["bad"], good=tables["good"], out=tmp_path / "out") for a in command]
    assert main(args) == 2
    assert capsys.readouterr().err == f"medfm: error: feature table {tables['bad']}: {expected}\n"


def test_a_word_in_a_survival_time_is_a_user_error(tables, tmp_path, capsys):
    from medfm.cli import main

    table = tables["bad"].with_name("times.csv")
    frame = pd.read_csv(tables["bad"])
    frame["feat_1"] = pd.read_csv(tables["good"])["feat_1"]
    frame.to_csv(table, index=False)
    assert main(["probe", str(table), "--survival", "time", "event", "--out", str(tmp_path / "s")]) == 2
    assert capsys.readouterr().err == (
        f"medfm: error: feature table {table}: column time, row 2 holds 'soon', not a number (2 rows like it)\n"
    )


def test_compare_of_a_damaged_results_file(tmp_path, capsys):
    from medfm.cli import main

    results = tmp_path / "results.json"
    results.write_text('{"label": "y"')
    assert main(["compare", str(results), str(results)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"medfm: error: {results}: not a JSON results file")
