"""The fleet simulator: thousands of devices in one asyncio process, each running the device's own
sans-IO UpdateCore and boot record logic against a real MQTT broker (docs/simulator.md)."""
from fota.sim.device import Profile, SimDevice
from fota.sim.fleet import FailurePlan, SimFleet, device_ids, provision

__all__ = ["FailurePlan", "Profile", "SimDevice", "SimFleet", "device_ids", "provision"]
