# Wire protocol v1: topic names, limits, states and error codes shared by the
# device agent and the control center. docs/protocol.md is the specification;
# tests check that the two agree.

VERSION = 1
PREFIX = "fota/v1/"

# Topic suffixes, one set per device: fota/v1/<device-id>/<suffix>
CMD = "cmd"              # control center -> device, QoS 1, JSON command
STATUS = "status"        # device -> control center, QoS 1, JSON status
INVENTORY = "inventory"  # device -> control center, QoS 1, retained JSON
ONLINE = "online"        # device -> control center, QoS 1, retained "1"/"0" (will: "0")
REQ = "req"              # device -> control center, QoS 0, JSON chunk-window request
DATA = "data"            # control center -> device, QoS 0, binary chunk

# Binary chunk header on the data topic: job id (u32 BE), chunk index (u32 BE).
CHUNK_HEADER = ">II"
CHUNK_HEADER_SIZE = 8

MAX_COMMAND_BYTES = 8192     # a larger command is refused with E_OVERSIZE
MAX_STATUS_BYTES = 4096      # the control center drops a larger status (docs/protocol.md §11)
MAX_REASON = 512             # characters of a status's reason; the device cuts a longer one
DEFAULT_MAX_INFLIGHT = 16384  # bytes of chunks a device lets be in flight (config max_inflight)
MIN_CHUNK_SIZE = 64          # smallest chunk size a command or a chunk request may use
MAX_CHUNK_SIZE = 8192        # largest chunk a device may ask for
DEFAULT_CHUNK_SIZE = 2048
COMPACT = (",", ":")         # json.dumps separators of what a device publishes: no spaces on the wire
DEFAULT_WINDOW = 8           # chunks per request
MAX_WINDOW = 32              # chunks per command window and per chunk request (`count`)
MAX_ID = 2**31 - 1           # largest job id, boot and seq the control center takes (32-bit columns)
MAX_EPOCH = 2**31 - 1        # boot epoch: 1..MAX_EPOCH, chosen at random with the agent state
DELTA_WBITS = 12             # largest delta window (2**N bytes) a device takes unless configured
DELTA_FORMATS = (1, 2)       # delta patch formats this agent decodes (docs/delta.md)
TRANSPORTS = ("mqtt", "http")  # payload transports (docs/protocol.md §5.2); inventory `transports`
MAX_URL = 2048               # longest `http.url` of an update command

# Device-id rule: 1..64 chars of [A-Za-z0-9_-] (safe inside a topic and an ACL pattern).
DEVICE_ID_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"


def topic(device_id, suffix):
    return PREFIX + device_id + "/" + suffix


def valid_device_id(device_id):
    if not isinstance(device_id, str) or not 0 < len(device_id) <= 64:
        return False
    for ch in device_id:
        if ch not in DEVICE_ID_CHARS:
            return False
    return True


# Update states reported in status messages (see fota.device.core for the table).
IDLE = "idle"
DOWNLOADING = "downloading"
VERIFYING = "verifying"
INSTALLING = "installing"
REBOOTING = "rebooting"
TRIAL = "trial"
CONFIRMED = "confirmed"
FAILED = "failed"
REVERTED = "reverted"
CANCELLED = "cancelled"
POSTPONED = "postponed"  # accepted, waiting for enough battery before download or install

STATES = (IDLE, DOWNLOADING, VERIFYING, INSTALLING, REBOOTING, TRIAL,
          CONFIRMED, FAILED, REVERTED, CANCELLED, POSTPONED)
TERMINAL_STATES = (CONFIRMED, FAILED, REVERTED, CANCELLED)

# Status kinds that are not states: a refused message, an applied key update, a health report.
REJECTED = "rejected"
KEYS_UPDATED = "keys"
HEALTH = "health"        # after every boot and periodically: is the running firmware healthy

# Error codes: "code" field of a status. Each has one meaning; texts go in "reason".
E_BAD_COMMAND = "E_BAD_COMMAND"        # command not JSON, missing field or wrong type
E_OVERSIZE = "E_OVERSIZE"              # command larger than MAX_COMMAND_BYTES
E_UNKNOWN_COMMAND = "E_UNKNOWN_COMMAND"  # "type" not understood
E_STALE_JOB = "E_STALE_JOB"            # job id older than the last accepted one: ignored
E_DUPLICATE_JOB = "E_DUPLICATE_JOB"    # job id equal to the last accepted one: ignored
E_BAD_MANIFEST = "E_BAD_MANIFEST"      # signed manifest is not valid JSON or lacks fields
E_UNKNOWN_KEY = "E_UNKNOWN_KEY"        # manifest signed by a key the device does not pin
E_BAD_SIGNATURE = "E_BAD_SIGNATURE"    # signature does not verify with the pinned key
E_HW_MISMATCH = "E_HW_MISMATCH"        # device hardware type not in manifest "hw"
E_TOO_LARGE = "E_TOO_LARGE"            # image larger than the inactive slot
E_BAD_CHUNK = "E_BAD_CHUNK"            # chunk too short, wrong length or beyond the image
E_HASH_MISMATCH = "E_HASH_MISMATCH"    # sha256 of the received image != manifest sha256
E_INSTALL = "E_INSTALL"                # writing or unpacking the inactive slot failed
E_BAD_BUNDLE = "E_BAD_BUNDLE"          # app bundle format invalid (after hash passed)
E_TIMEOUT = "E_TIMEOUT"                # transfer stalled past its deadline
E_HEALTH = "E_HEALTH"                  # new firmware failed its trial boot (reverted)
E_NOT_RUNNING = "E_NOT_RUNNING"        # cancel for a job that is not in progress
E_KEY_REVOKED = "E_KEY_REVOKED"        # signed by a key the root key revoked
E_KEY_EXPIRED = "E_KEY_EXPIRED"        # signed by a key outside its certified validity
E_WRONG_DEVICE = "E_WRONG_DEVICE"      # a command signed for another device
E_DOWNGRADE = "E_DOWNGRADE"            # manifest security counter below the installed one
E_STALE_KEYS = "E_STALE_KEYS"          # key update not newer than the trust store
E_BAD_KEYS = "E_BAD_KEYS"              # key update or certificate malformed or not root-signed
E_DECRYPT = "E_DECRYPT"                # encrypted release: key unwrap or decryption failed
E_BASE_MISMATCH = "E_BASE_MISMATCH"    # delta patch for another base than the running image
E_DELTA = "E_DELTA"                    # delta patch corrupt, or it does not produce the manifest's image
E_LOW_BATTERY = "E_LOW_BATTERY"        # postponed: battery below the update's minimum
E_EXPIRED = "E_EXPIRED"                # command's "exp" is before the device's trusted time
E_SPACE = "E_SPACE"                    # the device's filesystem has no room for the image (and its unpacked files)
E_HTTP_STATUS = "E_HTTP_STATUS"        # transport http: the server refused the URL (4xx: forbidden, expired, not found)
E_HTTP_RANGE = "E_HTTP_RANGE"          # transport http: 416, or a response whose range, length or framing is not the one asked for
E_HTTP_REDIRECT = "E_HTTP_REDIRECT"    # transport http: a redirect to a host the command does not allow, to plain http, or too many
E_HTTP_TLS = "E_HTTP_TLS"              # transport http: the server's certificate does not verify against the device's CA
E_CRASH = "E_CRASH"                    # the agent failed (e.g. MemoryError) MAX_CRASHES times in a row at the same point of this job
MAX_CRASHES = 3                        # agent failures in a row, without the job's checkpoint moving, that end the job
SPACE_MARGIN = 16384                   # bytes a download leaves free beyond its files (filesystem metadata, state files)

ERROR_CODES = (E_BAD_COMMAND, E_OVERSIZE, E_UNKNOWN_COMMAND, E_STALE_JOB, E_DUPLICATE_JOB,
               E_BAD_MANIFEST, E_UNKNOWN_KEY, E_BAD_SIGNATURE, E_HW_MISMATCH, E_TOO_LARGE,
               E_BAD_CHUNK, E_HASH_MISMATCH, E_INSTALL, E_BAD_BUNDLE, E_TIMEOUT, E_HEALTH,
               E_NOT_RUNNING, E_KEY_REVOKED, E_KEY_EXPIRED, E_WRONG_DEVICE, E_DOWNGRADE, E_STALE_KEYS,
               E_BAD_KEYS, E_DECRYPT, E_BASE_MISMATCH, E_DELTA, E_LOW_BATTERY, E_EXPIRED, E_SPACE,
               E_HTTP_STATUS, E_HTTP_RANGE, E_HTTP_REDIRECT, E_HTTP_TLS, E_CRASH)
