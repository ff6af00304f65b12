"""Sampled run of bench/board_heap.py (the emulated ESP32's smallest heap for firmware updates),
and its floor and verdict on made-up runs."""
import json

from bench import board_heap


def test_board_heap_sampled(tmp_path):
    out = tmp_path / "board_heap.json"
    assert board_heap.main(["--heaps", "256", "--runs", "1", "--image-kib", "48", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    (run,) = result["runs"]
    assert run["outcomes"] == ["full confirmed", "delta confirmed"] and run["passed"], run
    assert run["memory_errors"] == 0 and run["exits"] == [4, 4]   # the two updates' resets, nothing else
    assert result["summary"]["floor_kib"] == 256 and result["failures"] == []


def _run(heap, passed):
    return {"heap_kib": heap, "passed": passed, "memory_errors": 0 if passed else 2, "exits": [4]}


def test_the_floor_is_the_lowest_heap_with_every_heap_above_it_passing():
    runs = [_run(240, True), _run(224, True), _run(216, False), _run(208, True), _run(200, False)]
    s = board_heap.summarize(runs, [240, 224, 216, 208, 200], board_heap_kib=240, margin_kib=24)
    assert s["floor_kib"] == 224   # 208 passed, but 216 above it did not
    assert s["verdict"] == "MISSED" and s["board_heap_to_floor"] == round(240 / 224, 3)
    assert board_heap.failures({"summary": s}) == []
    s = board_heap.summarize(runs, [240, 224, 216, 208, 200], board_heap_kib=216, margin_kib=24)
    assert board_heap.failures({"summary": s}) == ["1 run(s) failed at BOARD_HEAP (216K)"]
    s = board_heap.summarize([_run(200, False)], [200], board_heap_kib=256, margin_kib=24)
    assert s["floor_kib"] is None and board_heap.failures({"summary": s}) == ["no heap of the list passed every run"]
