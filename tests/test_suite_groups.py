"""The suite's split over pytest-xdist workers (tests/conftest.py): a renamed module must not silently fall out
of its group (the stage-1 reference would run twice, two local SLURMs would fight over their fixed ports)."""
import os

from tests.conftest import LONGEST_FIRST, ROOT, SHARED_GROUPS, group_of


def test_every_named_module_exists():
    for path in [*SHARED_GROUPS, *(g for g in LONGEST_FIRST if g.endswith(".py"))]:
        assert os.path.exists(os.path.join(ROOT, path)), f"{path} is named in tests/conftest.py but is gone"
    assert set(LONGEST_FIRST) - set(SHARED_GROUPS.values()) <= {g for g in LONGEST_FIRST if g.endswith(".py")}


def test_modules_sharing_the_stage1_reference_go_to_one_worker_and_others_by_module():
    assert {group_of(f"{p}::test_x[a-b]") for p in SHARED_GROUPS} == {"stage1_job"}
    assert group_of("tests/test_cli.py::test_quickstart_is_the_readme_main_job") == "tests/test_cli.py"
