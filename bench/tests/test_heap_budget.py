"""Sampled runs of bench/heap_budget.py (where the agent's heap goes) on both interpreters."""
import json

import pytest

from bench import heap_budget


@pytest.mark.parametrize("interpreter", ["64", "32-frozen"])
def test_heap_budget_sampled(tmp_path, interpreter):
    out = tmp_path / "heap_budget.json"
    argv = ["--interpreter", interpreter, "--image-kib", "16", "--chunk", "2048", "--window", "4096",
            "--steps", "agent_import,window,ecdsa,delta", "--out", str(out)]
    assert heap_budget.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["failures"] == [] and result["interpreter"] == interpreter
    rows = {r["step"]: r for r in result["rows"]}
    assert list(rows) == ["interpreter", "agent_import", "window", "ecdsa", "delta"]
    # The import's breakdown covers every module the runner loads and adds up to the import
    # (measured in another process: within a few GC blocks).
    modules = dict(result["agent_modules"])
    assert "fota.device.core" in modules and "fota.device.runner" in modules
    assert abs(sum(modules.values()) - rows["agent_import"]["retained"]) <= 256, (modules, rows["agent_import"])
    assert rows["interpreter"]["after"] > 0 and rows["interpreter"]["free"] > 0
    window = rows["window"]
    # Read one at a time into the client's reused buffer: the 2-chunk window holds one chunk's
    # buffer, not both chunks.
    assert 2048 <= window["retained"] < 2 * 2048 and window["needed"] >= window["retained"], window
    # Verifying leaves nothing behind, but its bignum temporaries need heap.
    assert rows["ecdsa"]["retained"] < 256 and rows["ecdsa"]["needed"] > 256, rows["ecdsa"]
    # The decoder's state while applying holds its 2**12-byte window.
    assert rows["delta"]["decoder"] >= 4096 and rows["delta"]["needed"] >= rows["delta"]["decoder"], rows["delta"]


def test_unknown_step_is_refused(capsys):
    with pytest.raises(SystemExit):
        heap_budget.parse(["--steps", "window,heap_of_gold"])
    assert "heap_of_gold" in capsys.readouterr().err


def _fake_probe(step_needs, setup_needs=0, before=1000):
    """A probe whose step completes when at least step_needs bytes are free at its start; the heap
    free after the setup is 100 000 minus the ballast."""
    def probe(mp, step, heap, data, run_id, timeout, ballast=0):
        if 100_000 - ballast < setup_needs:
            return "setup"
        free = 100_000 - ballast - 40   # the setup's own retained bytes
        if free < step_needs:
            return "step"
        return {"step": step, "before": before, "after": before + 100, "free": free, "ballast": ballast}
    return probe


def test_the_search_finds_the_smallest_free_heap_within_its_resolution(monkeypatch):
    import itertools
    monkeypatch.setattr(heap_budget, "run_probe", _fake_probe(step_needs=7000))
    r = heap_budget.measure(None, "ecdsa", None, 1 << 20, 10, itertools.count())
    assert 7000 <= r["needed"] <= 7000 + heap_budget.RESOLUTION and not r["needed_is_bound"], r
    assert r["retained"] == 100
    # The setup runs out first (it needs 9 000 free): the figure is only a bound.
    monkeypatch.setattr(heap_budget, "run_probe", _fake_probe(step_needs=2000, setup_needs=9000))
    r = heap_budget.measure(None, "sha256", None, 1 << 20, 10, itertools.count())
    assert r["needed_is_bound"] and 9000 - 40 <= r["needed"] <= 9000 + heap_budget.RESOLUTION, r


def test_a_step_out_of_heap_at_the_largest_heap_fails_the_line(monkeypatch):
    import itertools
    monkeypatch.setattr(heap_budget, "run_probe", _fake_probe(step_needs=200_000))
    with pytest.raises(heap_budget.MeasureError, match="even at the largest heap"):
        heap_budget.measure(None, "delta", None, 1 << 20, 10, itertools.count())
