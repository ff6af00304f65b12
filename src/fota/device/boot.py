# The boot record and the boot selector: which slot runs, trial attempts, revert.
#
# record = {"active": "a", "versions": {"a": "1.0.0", "b": None}, "counter": 0,
#           "trial": None | {"slot", "job", "version", "tries", "error"},
#           "report": None | {"job", "state", "code", "reason"}}
# "report" is a terminal status (confirmed/reverted) kept until the broker acknowledged it.
from fota.device import protocol as P

SLOTS = ("a", "b")


def new_record(version=None):
    return {"active": "a", "versions": {"a": version, "b": None}, "trial": None, "report": None, "counter": 0}


def other(slot):
    return "b" if slot == "a" else "a"


def select(record, max_tries):
    """Pick the slot to boot; mutates the record (the caller persists it before running).

    Returns (slot, on_trial).
    """
    trial = record.get("trial")
    if trial:
        if trial.get("tries", 0) >= max_tries:
            reason = "trial boot failed %d times" % trial.get("tries", 0)
            if trial.get("error"):
                reason += ": " + trial["error"]
            record["report"] = {"job": trial.get("job"), "state": P.REVERTED, "code": P.E_HEALTH,
                                "reason": reason, "version": trial.get("version")}
            record["versions"][trial["slot"]] = None  # not bootable any more
            record["trial"] = None
            return record["active"], False
        trial["tries"] = trial.get("tries", 0) + 1
        return trial["slot"], True
    return record["active"], False


def set_trial(record, job, version, counter=0):
    slot = other(record["active"])
    record["versions"][slot] = version
    record["trial"] = {"slot": slot, "job": job, "version": version, "tries": 0, "error": None,
                       "counter": counter}
    record["report"] = None


def trial_failed(record, reason):
    if record.get("trial"):
        record["trial"]["error"] = reason


def confirm(record, report):
    trial = record["trial"]
    record["active"] = trial["slot"]
    # The anti-rollback floor rises only with a confirmed image, in the same atomic write.
    record["counter"] = max(record.get("counter", 0), trial.get("counter", 0))
    record["trial"] = None
    record["report"] = report


def follow_bootloader(record, running):
    """A backend whose bootloader picks the image (esp32, with rollback on): bring a trial record
    in line with what the bootloader booted, before select(). `running`: the slot it booted.
    Returns True if the record changed (the caller persists it).

    - It booted the other slot: the bootloader rolled the trial back (the image reset before it
      was marked valid, or failed its check): the record says reverted, as the bootloader did.
    - It booted the trial slot again after a trial boot (tries >= 1): an image still pending
      verification is never booted twice (the bootloader aborts it instead), so it was marked
      valid and the reset came before the record said so: the record says confirmed.
    """
    trial = record.get("trial")
    if not trial:
        return False
    if running != trial["slot"]:
        reason = "the bootloader rolled back to slot %s" % running
        if trial.get("error"):
            reason += ": " + trial["error"]
        record["report"] = {"job": trial.get("job"), "state": P.REVERTED, "code": P.E_HEALTH,
                            "reason": reason, "version": trial.get("version")}
        record["versions"][trial["slot"]] = None
        record["trial"] = None
        record["active"] = running
        return True
    if trial.get("tries", 0) >= 1:
        confirm(record, {"job": trial.get("job"), "state": P.CONFIRMED, "code": None, "reason": None})
        return True
    return False
