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
    # The 2 chunks received are held in the inbox: at least their bytes are in the heap, and
    # receiving them needed at least that much free.
    window = rows["window"]
    assert window["retained"] >= 2 * 2048 and window["needed"] >= window["retained"], window
    # Verifying leaves nothing behind, but its bignum temporaries need heap.
    assert rows["ecdsa"]["retained"] < 256 and rows["ecdsa"]["needed"] > 256, rows["ecdsa"]
    # The decoder's state while applying holds its 2**12-byte window.
    assert rows["delta"]["decoder"] >= 4096 and rows["delta"]["needed"] >= rows["delta"]["decoder"], rows["delta"]


def test_unknown_step_is_refused(capsys):
    with pytest.raises(SystemExit):
        heap_budget.parse(["--steps", "window,heap_of_gold"])
    assert "heap_of_gold" in capsys.readouterr().err
