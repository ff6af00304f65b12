"""fota.testkit.mpharness: the power-cut harness answered from a MicroPython process (the power-cut
bench's --interpreter) gives what the harness module gives on CPython, types included."""
from __future__ import annotations

import pytest

from conftest import both_interpreters
from fota.powercut import harness as H
from fota.powercut.scenario import build
from fota.testkit.mpharness import HarnessError, MicroPythonHarness


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    out = tmp_path_factory.mktemp("mpharness")
    return H.Scenario(str(build(out / "s", image_size=4096, chunk=1024, window=2)["update"]))


def _same(a: dict, b: dict) -> bool:
    """Outcomes equal but for the boot epoch of the statuses (random at every first boot)."""
    seqs = lambda o: [st[1:] for st in o["statuses"]]  # noqa: E731
    rest = lambda o: {k: v for k, v in o.items() if k != "statuses"}  # noqa: E731
    return rest(a) == rest(b) and seqs(a) == seqs(b)


@both_interpreters
def test_the_harness_in_micropython_answers_as_on_cpython(scenario, interpreter, tmp_path):
    remote = MicroPythonHarness(interpreter)
    try:
        assert remote.Scenario is H.Scenario      # built here, passed by its directory
        out, log = remote.clean_run(scenario, str(tmp_path / "mp"))
        py_out, py_log = H.clean_run(scenario, str(tmp_path / "py"))
        assert _same(out, py_out) and log == py_log and out["ok"]
        assert isinstance(log[0], tuple)          # tuples come back as tuples
        cut = out["ops"] // 2
        assert _same(remote.run_case(scenario, str(tmp_path / "mp"), (cut,), True),
                     H.run_case(scenario, str(tmp_path / "py"), (cut,), True))
        known = {((cut,), (cut,)): out["ops"] + 3}  # a dict with tuple keys crosses too
        cases = remote.chained_cases(scenario, str(tmp_path / "mp"), 7, 2, 2, known)
        py_cases = H.chained_cases(scenario, str(tmp_path / "py"), 7, 2, 2, known)
        assert [c[:2] for c in cases] == [c[:2] for c in py_cases] and len(cases) == 2
        assert all(_same(a[2], b[2]) for a, b in zip(cases, py_cases))
        with pytest.raises(HarnessError, match="AttributeError"):
            remote.clean_run("not a scenario", str(tmp_path / "mp"))  # the error crosses back
    finally:
        remote.close()
