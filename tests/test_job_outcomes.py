"""What the center records a job did, against real MicroPython devices through the real Mosquitto:
the history holds what took effect, a command the device refuses for good ends its job, and an
operator's `fota deployment cancel` stops a running deployment.
"""
from __future__ import annotations

import json
import os
import struct
import threading
import time

from fota.device import protocol as P
from fota.examples import hello_files
from fota.server.center.chunks import ChunkServer, parse_request
from fota.server.deployments import cancel_deployment, create_deployment, deployment_summary, device_history
from fota.server.releases import create_release, update_command
from fota.server.store import Job, utcnow
from fota.tools.waiting import wait_until
from fota.tools.bundle import pack_files


def _release(fleet, version, *, broken=False, padding=0):
    files = hello_files(version, broken=broken)
    if padding:
        files["blob.bin"] = os.urandom(padding)
    return create_release(fleet.store, fleet.blobs, fleet.key, pack_files(files), version, ["unix"])


def _status(job, state, boot, seq, **fields) -> bytes:
    return json.dumps({"job": job, "state": state, "code": None, "reason": None, "progress": None,
                       "version": "1.0.0", "boot": boot, "seq": seq, **fields}).encode()


def test_history_leaves_out_a_foreign_status_and_a_confirmed_after_reverted(fleet):
    sick, other = "truth-sick", "truth-other"
    for dev in (sick, other):
        fleet.add_device(dev)
    fleet.wait_online(sick, other)
    dep = create_deployment(fleet.store, _release(fleet, "4.0.0", broken=True), device_ids=[sick])
    job = dep.jobs[0].id
    assert (fleet.wait_job(job, timeout=90).state, fleet.job(job).code) == ("reverted", P.E_HEALTH)
    fleet.wait_online(sick, version="1.0.0")
    # Arriving on the device's own status topic: a late `confirmed` for the reverted job, and on
    # another device's topic a status naming it.
    fleet.spy.publish(sick, P.STATUS, _status(job, "confirmed", 9000, 1, version="4.0.0"))
    fleet.spy.publish(other, P.STATUS, _status(job, "failed", 9000, 1, code=P.E_TIMEOUT))

    def of_job(device, **kw):
        return [(e.state, e.ignored) for e in device_history(fleet.store, device, **kw) if e.job_id == job]
    wait_until(lambda: ("confirmed", "job_ended") in of_job(sick, include_ignored=True)
               and of_job(other, include_ignored=True), what="both stored")
    assert (fleet.job(job).state, fleet.job(job).code) == ("reverted", P.E_HEALTH)
    shown = of_job(sick)
    assert shown[-1] == ("reverted", None) and "confirmed" not in [state for state, _ in shown]
    assert of_job(sick, include_ignored=True) == shown + [("confirmed", "job_ended")]
    assert of_job(other) == [] and of_job(other, include_ignored=True) == [("failed", "other_device")]


def test_an_update_the_device_refuses_ends_its_job_with_the_code(fleet):
    """A device whose last accepted job id is ahead of the center's (a database restored from a
    backup) refuses the center's update as stale: the job ends failed E_STALE_JOB and its
    deployment finishes, instead of the job staying `sent` for ever."""
    dev = "truth-ahead"
    fleet.add_device(dev)
    fleet.wait_online(dev)
    fleet.spy.publish(dev, P.CMD, fleet.signer.command({"type": "inventory", "job": 5000, "device": dev}))
    wait_until(lambda: json.loads((fleet.root(dev) / "agent.json").read_text())["last_job"] == 5000,
               what="job 5000 accepted")
    dep = create_deployment(fleet.store, _release(fleet, "2.0.0"), device_ids=[dev])
    job = fleet.wait_job(dep.jobs[0].id)
    assert (job.state, job.code) == ("failed", P.E_STALE_JOB) and "older than job 5000" in job.reason
    wait_until(lambda: deployment_summary(fleet.store, dep.id)["state"] == "done", what="deployment done")
    assert fleet.running_version(dev) == "1.0.0"


def test_a_bad_chunk_or_a_redelivered_command_does_not_end_the_job(fleet, monkeypatch):
    """E_BAD_CHUNK is about one chunk and E_DUPLICATE_JOB about a command already accepted: the
    job goes on and confirms."""
    dev = "truth-chunk"
    fleet.add_device(dev)
    fleet.wait_online(dev)
    rel = _release(fleet, "3.0.0", padding=20000)
    real_serve = ChunkServer.serve
    bad_sent, go_on = [], threading.Event()

    async def serve_with_a_bad_chunk_first(self, device_id, payload, forwarded=False):
        if not bad_sent:  # on the same connection, so it reaches the device before the real chunks
            job = parse_request(payload).job
            bad_sent.append(job)
            self.mqtt.publish(P.topic(device_id, P.DATA), struct.pack(P.CHUNK_HEADER, job, 9999) + b"x" * 64,
                              qos=0)
        elif not go_on.is_set():
            return  # the download waits (the device asks again) until both refusals are stored
        await real_serve(self, device_id, payload, forwarded)
    monkeypatch.setattr(ChunkServer, "serve", serve_with_a_bad_chunk_first)
    dep = create_deployment(fleet.store, rel, device_ids=[dev])
    job = dep.jobs[0].id
    wait_until(lambda: fleet.spy.of(dev, job), what="first status")
    fleet.spy.publish(dev, P.CMD, update_command(job, dev, rel, fleet.signer))  # the same command again
    wait_until(lambda: {P.E_BAD_CHUNK, P.E_DUPLICATE_JOB} <= {e.code for e in device_history(fleet.store, dev)
                                                              if e.state == "rejected"}, what="both refusals stored")
    assert fleet.job(job).state == "downloading"
    go_on.set()
    assert fleet.wait_job(job).state == "confirmed"


def test_deployment_cancel_stops_a_download_and_never_sends_a_pending_job(fleet, monkeypatch):
    busy, asleep = "truth-busy", "truth-asleep"
    fleet.add_device(busy)
    fleet.add_device(asleep, start=False)  # never connected: its job waits, pending
    fleet.wait_online(busy)
    served = []
    real_serve = ChunkServer.serve

    async def serve_one_window(self, device_id, payload, forwarded=False):
        if not served:  # one window of data, then nothing: the download stays in progress
            served.append(payload)
            await real_serve(self, device_id, payload, forwarded)
    monkeypatch.setattr(ChunkServer, "serve", serve_one_window)
    dep = create_deployment(fleet.store, _release(fleet, "5.0.0", padding=100_000), device_ids=[busy, asleep])
    running, pending = (j.id for j in dep.jobs)
    fleet.wait_job(running, states=("downloading",))
    with fleet.store.session() as s:
        outcome = cancel_deployment(s, dep.id, utcnow())
    assert outcome == {"withdrawn": [pending], "cancelling": [running], "finishing": []}
    assert deployment_summary(fleet.store, dep.id)["state"] == "cancelled"
    job = fleet.wait_job(running)
    assert (job.state, job.reason) == ("cancelled", f"cancelled by job {running + 2}")
    with fleet.store.session() as s:
        cancel = s.query(Job).filter(Job.kind == "cancel").one()
    assert (cancel.target_job, cancel.state) == (running, "cancelled")  # ended with its target
    assert fleet.running_version(busy) == "1.0.0" and fleet.devices[busy].reboots == 0
    # The device that was asleep comes online: nothing is sent to it.
    fleet.devices[asleep].start()
    fleet.wait_online(asleep)
    time.sleep(1.0)
    assert (fleet.job(pending).state, fleet.job(pending).sent_at) == ("cancelled", None)
    assert json.loads((fleet.root(asleep) / "agent.json").read_text())["last_job"] == 0
    assert not fleet.spy.of(asleep, pending)
    summary = deployment_summary(fleet.store, dep.id)
    assert (summary["state"], summary["counts"]) == ("cancelled", {"cancelled": 2})
