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


def select(record, max_tries, running=None):
    """Pick the slot to boot; mutates the record (the caller persists it before running).

    running: the slot a bootloader already started (esp32: its rollback decides, not the
    record), or None where the agent picks the slot (files, sim). The record then follows it.

    Returns (slot, on_trial); on_trial is None when the bootloader runs an image the record
    does not name: one set to boot by an install whose trial was never recorded (a power cut
    in between). The caller must reboot without marking it valid: the bootloader then abandons
    it and boots the active slot again.
    """
    trial = record.get("trial")
    if running is not None:
        if trial and running != trial["slot"]:
            # The bootloader rolled back: the trial image was reset before it was marked valid.
            _revert(record, trial, "the bootloader rolled back after %d trial boot(s)" % trial.get("tries", 0))
            return record["active"], False
        if trial and trial.get("tries", 0) >= 1:
            # The trial slot booted again: an image still pending verification is never booted
            # twice (the bootloader aborts it instead), so it was marked valid and the reset came
            # before the record said so. The record says confirmed, as the bootloader has it.
            confirm(record, {"job": trial.get("job"), "state": P.CONFIRMED, "code": None, "reason": None})
            return running, False
        if trial:  # its first boot (PENDING_VERIFY): a trial boot
            trial["tries"] = 1
            return trial["slot"], True
        if running != record["active"]:
            return running, None
        return running, False
    if trial:
        if trial.get("tries", 0) >= max_tries:
            _revert(record, trial, "trial boot failed %d times" % trial.get("tries", 0))
            return record["active"], False
        trial["tries"] = trial.get("tries", 0) + 1
        return trial["slot"], True
    return record["active"], False


def _revert(record, trial, reason):
    if trial.get("error"):
        reason += ": " + trial["error"]
    record["report"] = {"job": trial.get("job"), "state": P.REVERTED, "code": P.E_HEALTH,
                        "reason": reason, "version": trial.get("version")}
    record["versions"][trial["slot"]] = None  # not bootable any more
    record["trial"] = None


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

