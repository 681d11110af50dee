"""The mutation check's list (scripts/mutants.toml) stays runnable: every anchor occurs exactly once in its file,
every named test file exists, and the bugs the suite once missed are among the mutants. ``make mutants`` runs them."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tiny_models import REPO

# registered in sys.modules before it runs: its dataclass looks its module up there
_spec = importlib.util.spec_from_file_location("fcnseg_mutants", REPO / "scripts" / "mutants.py")
mutants = sys.modules.setdefault("fcnseg_mutants", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(mutants)
LIST = mutants.load(mutants.DEFAULT_LIST)


def test_every_anchor_matches_exactly_once():
    problems = {m.name: p for m in LIST if (p := mutants.anchor_problem(m, REPO / "src")) is not None}
    assert not problems, problems


def test_every_mutant_names_existing_tests_and_a_reason():
    for m in LIST:
        assert m.why and m.tests, m.name
        for t in m.tests:
            if not t.startswith("-"):
                assert (REPO / t.split("::")[0]).is_file(), (m.name, t)


def test_the_list_covers_the_bugs_the_suite_once_missed():
    names = {m.name for m in LIST}
    assert {"no-optimizer-step", "segmenter-mean-std-swapped", "skip-upsamplers-swapped",
            "eval-transform-mean-std-swapped", "crop-offset-off-by-one", "ignored-as-last-class",
            "bilinear-kernel-centre"} <= names
    assert len(LIST) >= 30 and len({m.file for m in LIST}) >= 15


@pytest.mark.slow  # moved out of the fast suite (issue 29: make test within 5 minutes); CI runs it
def test_a_mutant_is_killed_or_survives_in_a_copy_that_is_then_restored(tmp_path):
    src = tmp_path / "src"
    (src / "fcnseg").mkdir(parents=True)
    (src / "fcnseg" / "__init__.py").write_text("")
    target = src / "fcnseg" / "m.py"
    original = "def f():\n    return 1  # one\n"
    target.write_text(original)
    test = tmp_path / "test_m.py"
    test.write_text("from fcnseg.m import f\n\n\ndef test_f():\n    assert f() == 1\n")
    killed = mutants.Mutant("one-to-two", "m.py", "return 1", "return 2", "f gives 2", (str(test),))
    survives = mutants.Mutant("comment", "m.py", "# one", "# two", "a comment changes", (str(test),))
    assert mutants.anchor_problem(killed, src) is None
    verdict, detail, _ = mutants.run_one(killed, src, 120, [])
    assert verdict == "killed" and detail.endswith("test_m.py::test_f"), (verdict, detail)
    assert mutants.run_one(survives, src, 120, [])[0] == "SURVIVED"
    assert target.read_text() == original
    assert "0 times" in mutants.anchor_problem(mutants.Mutant("x", "m.py", "return 3", "", "", ()), src)
    assert mutants.anchor_problem(mutants.Mutant("x", "nope.py", "a", "b", "", ()), src).endswith("does not exist")
