"""Campaign states and device-in-campaign states: one table each (docs/campaigns.md repeats them).

Everything that moves a campaign from one state to another goes through ``advance``: an event
the table does not allow raises CampaignError instead of being guessed at.
"""
from __future__ import annotations

from fota.server.campaigns.spec import CampaignStateError

__all__ = ["ACTIVE", "DEVICE_STATES", "STATES", "TRANSITIONS", "UNSETTLED", "advance"]

DRAFT = "draft"          # created, nothing sent yet
RUNNING = "running"      # starting devices (inside the window, within pacing)
PAUSED = "paused"        # by an operator or the failure threshold: no new device starts
WAITING = "waiting"      # a wave succeeded and the next needs an operator's approval (resume)
ABORTING = "aborting"    # no new device; in-flight downloads are cancelled, the rest finish
ABORTED = "aborted"      # terminal
DONE = "done"            # terminal: every targeted device settled

STATES = (DRAFT, RUNNING, PAUSED, WAITING, ABORTING, ABORTED, DONE)
ACTIVE = (RUNNING, PAUSED, WAITING, ABORTING)  # states the engine steps

TRANSITIONS = (
    (DRAFT, "start", RUNNING),
    (DRAFT, "abort", ABORTED),
    (RUNNING, "pause", PAUSED),
    (RUNNING, "failure_threshold", PAUSED),       # on_failure: pause
    (RUNNING, "failure_threshold_abort", ABORTING),  # on_failure: abort
    (RUNNING, "wave_needs_approval", WAITING),
    (RUNNING, "all_settled", DONE),
    (RUNNING, "abort", ABORTING),
    (PAUSED, "resume", RUNNING),
    (PAUSED, "all_settled", DONE),               # nothing left to start (not dynamic)
    (PAUSED, "abort", ABORTING),
    (PAUSED, "failure_threshold_abort", ABORTING),
    (WAITING, "resume", RUNNING),
    (WAITING, "pause", PAUSED),
    (WAITING, "abort", ABORTING),
    (WAITING, "failure_threshold", PAUSED),
    (WAITING, "failure_threshold_abort", ABORTING),
    (ABORTING, "nothing_in_flight", ABORTED),
)
_TABLE = {(f, e): t for f, e, t in TRANSITIONS}

# A device's part of a campaign.
QUEUED = "queued"          # waiting for its wave, the window, pacing, or to come online
IN_FLIGHT = "in_flight"    # an update job is out (download, install, reboot, trial)
PROBATION = "probation"    # confirmed; must stay healthy for the probation time
RETRY = "retry"            # an attempt failed or timed out; next attempt after a back-off
SUCCEEDED = "succeeded"    # confirmed and healthy through probation
FAILED = "failed"          # failed (reverted, unhealthy, out of retries, permanent error)
SKIPPED = "skipped"        # not driven: other hardware, held by an older campaign, version too old or current
CANCELLED = "cancelled"    # the campaign was aborted before the device finished

DEVICE_STATES = (QUEUED, IN_FLIGHT, PROBATION, RETRY, SUCCEEDED, FAILED, SKIPPED, CANCELLED)
UNSETTLED = (QUEUED, IN_FLIGHT, PROBATION, RETRY)


def advance(state: str, event: str) -> str:
    """The state after ``event``; CampaignStateError if the table does not allow it."""
    to = _TABLE.get((state, event))
    if to is None:
        raise CampaignStateError(f"cannot {event.replace('_', ' ')} a campaign that is {state}")
    return to
