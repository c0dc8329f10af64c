"""The mutation run's line record (harness/mutation_lines.py): which tests a mutant's child runs. A record measured on
an older mutated copy of a file must not choose the tests: mutmut writes the copy again when the source changes and
re-runs its stats only for new tests, so old line numbers would point at other statements (seen on tiles.py: a line
added at the top moved every record by one, and the micro-conditioning mutants ran no test at all)."""
from __future__ import annotations

import json

from harness import mutation_lines

SOURCE = '''def x_f__mutmut_orig(a):
    b = a + 1
    return b * 2


def x_f__mutmut_1(a):
    b = a + 1
    return b * 3
'''


def test_a_session_adds_its_tests_to_a_record_of_the_same_copy():
    old = {"files": {"m.py": {"hash": "h1", "tests": ["t1", "t2"], "lines": {"2": ["t1"], "3": ["t1", "t2"]}}}}
    new = mutation_lines.merged(old, {"t2", "t3"}, {"m.py": {"3": {"t3"}}}, {"m.py": "h1"})
    # t2 ran again and executed nothing of m.py this time: what it recorded before is replaced
    assert new == {"files": {"m.py": {"hash": "h1", "tests": ["t1", "t2", "t3"],
                                      "lines": {"2": ["t1"], "3": ["t1", "t3"]}}}}


def test_a_changed_copy_forgets_what_earlier_tests_recorded_of_it():
    old = {"files": {"m.py": {"hash": "h1", "tests": ["t1", "t2"], "lines": {"2": ["t1"], "3": ["t2"]}},
                     "n.py": {"hash": "g1", "tests": ["t1"], "lines": {"9": ["t1"]}}}}
    new = mutation_lines.merged(old, {"t3"}, {"m.py": {"4": {"t3"}}}, {"m.py": "h2", "n.py": "g1"})
    assert new["files"]["m.py"] == {"hash": "h2", "tests": ["t3"], "lines": {"4": ["t3"]}}
    assert new["files"]["n.py"] == {"hash": "g1", "tests": ["t1", "t3"], "lines": {"9": ["t1"]}}


def _record(root, lines, tests):
    path = root / "pixart_core" / "m.py"
    record = {"files": {"pixart_core/m.py": {"hash": mutation_lines.file_hash(path), "tests": tests, "lines": lines}}}
    (root / mutation_lines.RECORD).write_text(json.dumps(record))


def test_a_mutant_runs_the_tests_that_executed_its_statement_on_the_copy_measured(tmp_path):
    (tmp_path / "pixart_core").mkdir()
    path = tmp_path / "pixart_core" / "m.py"
    path.write_text(SOURCE)
    _record(tmp_path, {"2": ["t1", "t2"], "3": ["t2"]}, ["t1", "t2", "t3"])
    # the mutant changes line 3 of the file (`return b * 2`): only t2 executed it; t1 and t3 are known and left out
    assert mutation_lines.tests_for("pixart_core.m.x_f__mutmut_1", tmp_path) == ({"t2"}, {"t1", "t2", "t3"})
    path.write_text("\n" + SOURCE)  # mutmut wrote the copy again: every line moved down by one
    assert mutation_lines.tests_for("pixart_core.m.x_f__mutmut_1", tmp_path) is None
    (tmp_path / mutation_lines.RECORD).unlink()
    assert mutation_lines.tests_for("pixart_core.m.x_f__mutmut_1", tmp_path) is None
