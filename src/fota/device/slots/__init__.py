# Slot backends: one interface, one backend per kind of port.
#
#   KINDS                      manifest kinds the backend installs ("bundle", "image")
#   capacity                   largest image (bytes) a slot takes
#   begin(slot, size)          prepare the slot for a new image of `size` bytes
#   resume(slot, offset)       after a restart, continue an image whose first `offset` bytes
#                              were flushed; returns the offset writing continues from (<= offset;
#                              None: offset). The runner re-sends from a chunk boundary at or
#                              below it; replayed bytes below it must equal those already written
#   write(slot, offset, data)  sequential writes of image bytes
#   flush(slot)                make what was written so far durable, as far as a later resume()
#                              relies on it
#   read(slot, offset, n)      read image bytes back (re-hash on resume; the base of a delta)
#   has_image(slot)            whether the slot still holds its installed image (a delta base)
#   finalize(slot, size, files, key, plain_size, sha256)
#                              turn the verified image into a bootable slot (raises on
#                              failure); files: the manifest's [name, size, sha256] list; key,
#                              plain_size: payload decryption; sha256: the image's (hex), for a
#                              backend that checks what it wrote by reading it back (esp32)
#   app_dir(slot)              directory holding the slot's app (files) or None
#   confirm()                  optional: the running image passed its health check (esp32: cancel
#                              the bootloader's rollback)
#   booted_slot()              optional: the slot a bootloader chose (esp32); the boot record
#                              follows it at boot (boot.select: its rollback happened before the agent runs)
#   free_space(slot)           optional: bytes a new image for `slot` may use on the device's
#                              filesystem (files); checked before a download (E_SPACE)


def open_backend(kind, root, config):
    if kind == "files":
        from fota.device.slots.files import FilesBackend
        return FilesBackend(root + "/slots", config.get("capacity", 1 << 20))
    if kind == "sim":
        from fota.device.slots.sim import SimFlash, SimBackend
        slot_size = config.get("capacity", 256 * 1024)
        geometry = config.get("flash") or {}  # {"sector", "align", "erased"}: the simulated chip
        flash = SimFlash(2 * slot_size, sector=geometry.get("sector", 4096), align=geometry.get("align", 4),
                         erased=geometry.get("erased", 0xFF), path=root + "/flash.bin")
        return SimBackend(flash, slot_size)
    if kind == "esp32":
        from fota.device.slots.esp32 import CHIP_IDS, Esp32Backend
        chip = config.get("chip_id")  # the board's chip: an id, or a name in CHIP_IDS
        return Esp32Backend(CHIP_IDS[config.get("chip", "esp32")] if chip is None else chip)
    raise ValueError("unknown slot backend %r" % kind)
