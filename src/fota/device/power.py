# The power hook: battery level and external power, for the update's battery gate.
#
# read() returns (battery percent 0..100 or None if the port cannot measure it, external power),
# or None if the reading failed. Sources, first found wins:
#   config "power_hook": a module name whose read() returns {"battery": int|None, "external": bool}
#                        (a board's ADC / fuel-gauge code);
#   <device dir>/power.json: {"battery": 40, "external": false}, changeable at run time (unix
#                        port, tests, a sensor daemon replacing the file);
#   config "power": the same object, fixed.
# None of them: (None, False), "not measured", which the gate never holds back.
from fota.device import fsutil


def _clean(doc):
    battery = doc.get("battery")  # not a dict: AttributeError, a failed reading
    if not isinstance(battery, int) or isinstance(battery, bool):
        battery = None
    else:
        battery = min(100, max(0, battery))
    return battery, doc.get("external") is True


def read(root, config):
    try:
        hook = config.get("power_hook")
        if hook:
            return _clean(__import__(hook).read())
        path = root + "/power.json"
        if fsutil.exists(path):
            return _clean(fsutil.read_json(path))  # unreadable: None -> a failed reading
        doc = config.get("power")
        return _clean(doc) if doc is not None else (None, False)
    except Exception as e:  # a broken sensor must not stop the agent
        print("[fota] power reading failed:", e)
        return None
