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
