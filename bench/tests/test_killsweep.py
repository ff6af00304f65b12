"""Sampled run of bench/killsweep.py (the full sweep, 200+ kills, is `./run bench killsweep`)."""
import time

from bench import killsweep as K


def test_sampled_kill_sweep_every_phase_no_brick_no_lost_status(tmp_path):
    """~15 SIGKILLs of 3 real agents between command and download, during download, install,
    trial boot and confirm; every job ends confirmed at the control center and every device on
    a verified slot."""
    t0 = time.monotonic()
    # window 2: the download lasts ~0.7 s instead of ~0.08 s with the default 8, so a kill aimed at
    # it still lands there on a loaded machine (a CI run under load once got none in 95 kills)
    s = K.sweep(tmp_path, devices=3, kills=15, min_per_phase=1, seed=11, image_kib=128, window=2, timeout=60,
                max_rounds=15)
    per_phase = {r["phase"]: r["kills"] for r in s["phases"]}
    # Since a device publishes `trial` and `confirmed` back to back after a trial boot (protocol
    # §1.1), the confirm phase lasts ~2 ms: the sample no longer lands a kill there every time
    # (the full bench still aims at it).
    assert s["kills"] >= 15 and all(per_phase.get(p, 0) >= 1 for p in K.PHASES if p != "confirm"), per_phase
    assert s["bricked"] == 0 and s["lost_statuses"] == 0
    assert s["completed"] == s["jobs"] and s["verified"] == s["jobs"]
    assert s["bad_statuses"] == []
    print(f"\n{s['kills']} kills in {s['rounds']} rounds ({time.monotonic() - t0:.0f} s): {per_phase}")
