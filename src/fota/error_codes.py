"""What each error code of docs/protocol.md §8 means, in words: one table for the dashboard and
the CLI (tests/test_error_codes.py checks it against the protocol document, row by row)."""
from __future__ import annotations

__all__ = ["MEANINGS", "explain"]

# code -> (the statuses it comes with, what it means); the words of docs/protocol.md "Error codes"
MEANINGS: dict[str, tuple[str, str]] = {
    'E_BAD_COMMAND': ('rejected',
        'command not a signed envelope, not JSON, a field missing or of the wrong type'),
    'E_OVERSIZE': ('rejected',
        'command larger than 8192 bytes'),
    'E_UNKNOWN_COMMAND': ('rejected',
        '`type` not understood'),
    'E_STALE_JOB': ('rejected',
        'job id older than the last accepted one (a replay)'),
    'E_DUPLICATE_JOB': ('rejected',
        'job id equal to the last accepted one (a redelivery)'),
    'E_NOT_RUNNING': ('rejected',
        'cancel of a job that is not downloading or postponed, or an update while installing/rebooting/on trial'),
    'E_BAD_CHUNK': ('rejected',
        'chunk too short, too long, wrong length for its index, or beyond the image'),
    'E_WRONG_DEVICE': ('rejected',
        'command signed for another device'),
    'E_EXPIRED': ('rejected / failed',
        "command's `exp` is before the device's trusted time (§4, step 7); as a job's code: the device "
        'refused its command as expired on every re-send (§9)'),
    'E_STALE_KEYS': ('rejected',
        "key update not newer than the device's trust document"),
    'E_BAD_KEYS': ('rejected',
        'key update malformed or a certificate not signed by the root'),
    'E_UNKNOWN_KEY': ('rejected / failed',
        'signer (of the command / of the manifest) not certified by the root for that use'),
    'E_KEY_REVOKED': ('rejected / failed',
        'signer revoked by the root'),
    'E_KEY_EXPIRED': ('rejected / failed',
        "signer used outside its certificate's validity"),
    'E_BAD_SIGNATURE': ('rejected / failed',
        'signature (of the command / of the manifest) does not verify'),
    'E_BAD_MANIFEST': ('failed',
        'manifest not JSON, a field missing/invalid, or a kind the backend cannot install'),
    'E_HW_MISMATCH': ('failed',
        'device hardware type not in manifest `hw`'),
    'E_DOWNGRADE': ('failed',
        'manifest security counter below the highest one the device confirmed'),
    'E_TOO_LARGE': ('failed',
        'image larger than the inactive slot'),
    'E_SPACE': ('failed',
        "the device's filesystem has no room for the image, its unpacked files and a 16 KiB margin (§5, step "
        '6); nothing is written, and the job may succeed once space is freed'),
    'E_HASH_MISMATCH': ('failed',
        'SHA-256 of the received image differs from the manifest'),
    'E_INSTALL': ('failed',
        'writing or finalising the inactive slot failed'),
    'E_BAD_BUNDLE': ('failed',
        "the bundle's format is invalid, or a file differs from the manifest's `files`"),
    'E_TIMEOUT': ('failed',
        'transfer stalled past its deadline'),
    'E_DECRYPT': ('failed',
        'encrypted release: the wrapped key does not unwrap with the device key, or decryption fails'),
    'E_BASE_MISMATCH': ('failed',
        'delta update whose base is not the image the device runs (nothing written)'),
    'E_DELTA': ('failed',
        "delta patch: window larger than the device takes or other than the command's, a format it does not "
        'decode or other than the '
        "command's, SHA-256 differs from the command's, corrupt (a record or match outside the images, a "
        "stream that ends early or has bytes left over), or it does not produce the manifest's image (the "
        'slot is not marked bootable)'),
    'E_HEALTH': ('reverted',
        'the new firmware failed its trial boots'),
    'E_LOW_BATTERY': ('postponed',
        "battery below the update's `min_battery`: the job waits (§5.1), nothing is written or installed"),
    'E_HTTP_STATUS': ('failed',
        'transport `http` (§5.2): the server refused the URL (a status other than 200/206, a redirect or a '
        'retried one: 403 for a forged or expired URL, 404, ...)'),
    'E_HTTP_RANGE': ('failed',
        'transport `http`: 416, or a response whose range, total or length is not the one asked for, or '
        'without a `Content-Length`'),
    'E_HTTP_REDIRECT': ('failed',
        'transport `http`: a redirect to a host the command does not allow, from https to http, without a '
        '`Location`, or more than 4 in a row'),
    'E_HTTP_TLS': ('failed',
        "transport `http`: the server's certificate does not verify against the device's CA, or an https URL "
        'with no CA to verify it'),
    'E_CRASH': ('failed',
        'the agent failed (an exception such as `MemoryError`: a heap too small for this job) 3 times in a '
        'row without the download getting past the same checkpoint; instead of resuming into the same '
        'failure at every boot, the job ends at the next boot and the device keeps its firmware (§9). A '
        'failure after the download moved on starts the count over'),
}


def explain(code: str | None) -> str | None:
    """The meaning of an error code in words; None for no code, a plain note for an unknown one."""
    if not code:
        return None
    known = MEANINGS.get(code)
    return known[1] if known else f"{code}: not a code of this protocol version"
