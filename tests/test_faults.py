"""Lost statuses measured the same way in every fault bench and test (fota.testkit.faults): the
(epoch, boot, seq) gaps, and health reports the device dropped unsent told apart from lost ones."""
import json
from types import SimpleNamespace

from fota.device.runner import DROPPED_HEALTH
from fota.server.store import StatusEvent, Store
from fota.testkit.faults import seq_gaps, status_gaps


def test_seq_gaps_are_the_seqs_missing_below_each_boots_last_stored_one():
    keys = [("a", 0, 1, 1), ("a", 0, 1, 2), ("a", 0, 1, 5), ("a", 0, 2, 2), ("b", 0, 7, 1), ("b", 0, 7, 2)]
    # a/1: 3 and 4 missing; a/2: 1 missing; b/7 whole. What came after the last stored one of a
    # boot (a crash's tail) is no gap.
    assert seq_gaps(keys) == [("a", 0, 1, 3), ("a", 0, 1, 4), ("a", 0, 2, 1)]
    assert seq_gaps([]) == []


def test_seq_gaps_count_each_epoch_apart():
    """A device that starts over numbers its boots again in a new epoch: boot 1 of epoch 5 does
    not fill, nor extend, boot 1 of epoch 9."""
    keys = [("a", 5, 1, 1), ("a", 5, 1, 2), ("a", 5, 1, 3), ("a", 5, 1, 4),
            ("a", 9, 1, 1), ("a", 9, 1, 3)]
    assert seq_gaps(keys) == [("a", 9, 1, 2)]
    # seqs of epoch 5's boot 1 beyond epoch 9's highest are no gaps of epoch 9 either
    assert seq_gaps([("a", 5, 1, 4), ("a", 9, 1, 1)]) == [("a", 5, 1, 1), ("a", 5, 1, 2), ("a", 5, 1, 3)]


def test_status_gaps_reads_the_table_and_tells_dropped_health_reports_from_lost_statuses(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'fota.db'}")
    try:
        with store.session() as s:
            for device, epoch, boot, seq in [("d1", 8, 3, 1), ("d1", 8, 3, 3), ("d1", 8, 3, 6), ("d2", 0, 1, 2),
                                             ("other", 0, 1, 9),
                                             # d2 started over (epoch 4): its boot 1 again, whole
                                             ("d2", 4, 1, 1), ("d2", 4, 1, 2), ("d2", 4, 1, 3)]:
                s.add(StatusEvent(device_id=device, epoch=epoch, boot=boot, seq=seq, state="health", payload={}))
            s.commit()
        dropped = json.dumps({"job": None, "state": "health", "epoch": 8, "boot": 3, "seq": 4})
        logs = {"d1": f"[fota] connected as d1\n[fota] {DROPPED_HEALTH} {dropped}\n", "d2": ""}
        fleet = SimpleNamespace(store=store, devices={d: SimpleNamespace(log_text=lambda t=t: t)
                                                      for d, t in logs.items()})
        gaps = status_gaps(fleet, ["d1", "d2"], seen_on_broker=[("d2", 0, 1, 3), ("other", 0, 1, 1)])
        # d1/8/3: 2 and 5 lost, 4 dropped by the device on purpose; d2/0/1: 1 is a gap (epoch 4's
        # boot 1 does not fill it), 3 was seen on the broker and never stored (epoch 4's seq 3 is
        # another status); "other" is not asked about.
        assert gaps == {"lost": [("d1", 8, 3, 2), ("d1", 8, 3, 5), ("d2", 0, 1, 1), ("d2", 0, 1, 3)],
                        "superseded": [("d1", 8, 3, 4)]}
    finally:
        store.dispose()
