# Transport http (docs/protocol.md §5.2): a small ranged, keep-alive HTTP/1.1 client for
# MicroPython (unix port and boards) and CPython. Not micropython-lib's `requests`, which
# skips certificate checks (CERT_NONE) and closes the connection after every request.
#
# Fetch streams one blob from a byte offset to its end as a series of ranged GETs
# (`Range: bytes=a-b`, SEGMENT bytes each) on one kept-alive connection, and cuts the
# bodies into the job's chunks: step() returns the next whole chunk, a view of the one
# buffer it reads into (valid until the next step), or None when nothing is complete yet.
# Like the MQTT client, the socket is non-blocking after the connect and the TLS handshake,
# and select.poll waits for data, so a step is bounded by its wait. The checks that matter
# for safety (hash, size, signature) are the core's; this module enforces the HTTP side:
# the status, that the range served is the one asked for, redirects only to the same origin
# or to hosts the signed command allows (never from https to http), and certificate
# verification against the CA the device was provisioned with.
#
# Errors: HttpError(code, reason) ends the job (an E_HTTP_* code); OSError is a failure the
# next attempt may not have (a cut, a reset, a 5xx): the runner calls failed(), and the fetch
# starts again from its next chunk after a back-off (RETRY_MS, doubling up to RETRY_MAX_MS);
# the core's stall deadline ends the job if nothing gets through.

import errno
import select
import socket

from fota.device.mqtt import nonblocking_io, ticks_ms, ticks_diff, ticks_add, sleep_ms
from fota.device import protocol as P

SEGMENT = 65536       # bytes per ranged GET (a multiple of the chunk size is used)
MAX_REDIRECTS = 4
RETRY_MS = 200        # first wait after a failed attempt
RETRY_MAX_MS = 5000
HEADER_BUFFER = 1024  # smallest read buffer: the longest header line (a Location) must fit
HEADER_WAIT_S = 30    # longest wait for a response's headers: a loaded server answers in turn,
                      # and a request given up on is sent again behind the others (bench/fleet)

_AGAIN = (errno.EAGAIN, getattr(errno, "EWOULDBLOCK", errno.EAGAIN))
_REDIRECTS = (301, 302, 303, 307, 308)
_RETRY = (408, 425, 429, 500, 502, 503, 504)  # the server may answer the next attempt


class HttpError(Exception):
    def __init__(self, code, reason):
        super().__init__(reason)
        self.code = code
        self.reason = reason


def parse_url(url):
    """(scheme, host, port, target) of an http(s) URL; raises ValueError."""
    if url.startswith("https://"):
        scheme, rest, port = "https", url[8:], 443
    elif url.startswith("http://"):
        scheme, rest, port = "http", url[7:], 80
    else:
        raise ValueError("not an http(s) URL")
    i = 0
    while i < len(rest) and rest[i] not in "/?":
        i += 1
    netloc, target = rest[:i], rest[i:] or "/"
    if target[0] == "?":
        target = "/" + target
    if "@" in netloc:
        raise ValueError("credentials in a URL are not supported")
    host = netloc
    if netloc.startswith("["):  # [IPv6]:port
        end = netloc.find("]")
        if end < 0:
            raise ValueError("bad host")
        host = netloc[1:end]
        if netloc[end + 1:end + 2] == ":":
            port = int(netloc[end + 2:])
    elif ":" in netloc:
        host, p = netloc.rsplit(":", 1)
        port = int(p)
    if not host or not 0 < port < 65536:
        raise ValueError("bad host or port")
    return scheme, host, port, target


def _again(e):
    return (e.args and e.args[0] in _AGAIN) or type(e).__name__.startswith("SSLWant")


class Fetch:
    """One download's HTTP side. tls(host): an ssl context-like object with
    wrap_socket(sock, server_hostname) for https URLs; timeout_s bounds the connect, the TLS
    handshake and a request's write; a response's headers are awaited for the longer of it and
    HEADER_WAIT_S."""

    def __init__(self, tls=None, timeout_s=10, log=None):
        self.tls = tls
        self.timeout_s = timeout_s
        self.log = log
        self.sock = None
        self.origin = None    # (scheme, host, port) of the open connection
        self.buf = None
        self.url = None
        self.job = None
        self.bytes_received = 0
        self.requests = 0     # GETs sent (a test counts resumes and keep-alive by them)
        self.connections = 0  # connections opened
        self.phase = 0
        self.done = True
        self.error = None     # an HttpError met by start(), for the runner's next step
        self.failures = 0     # failed attempts in a row
        self.retry_at = None  # ticks_ms of the next attempt after a failure

    # ---- the download ------------------------------------------------------------------------
    def start(self, job, http, offset, size, chunk):
        """Stream the blob of `http` (the command's signed object) from byte `offset` (a
        multiple of `chunk`) to `size`. A restart of the same job keeps the connection only if
        no response is half read; one from the offset whose request is sent and whose response
        has not begun keeps waiting for it (until the header timeout): a loaded server answers
        requests in turn, and a new one would queue behind the old."""
        self.error = None
        if job == self.job and self.phase == 1 and self.sock is not None and offset == self.pos \
                and not self.done and self.url is not None:
            return
        if self.job != job:
            self.url = None
        self.job = job
        try:
            self.signed = parse_url(http["url"])
        except ValueError as e:
            raise HttpError(P.E_HTTP_STATUS, "bad URL: %s" % e)
        if self.url is None:
            self.url = http["url"]   # a redirect's target is kept for the later segments
        self.hosts = http.get("hosts") or ()
        self.pos = offset
        self.size = size
        self.chunk = chunk
        self.seg = chunk * max(1, SEGMENT // chunk)
        need = max(chunk, HEADER_BUFFER)
        if self.buf is None or len(self.buf) < need:
            self.buf = None
            self.buf = bytearray(need)
        if self.state_body():
            self.close()  # a response half read cannot be left behind on a kept-alive socket
        self.redirects = 0
        self.retry_at = None
        self.phase = 0        # 0: send a request, 1: read headers, 2: read the body
        self.lo = self.hi = 0
        self.done = offset >= size

    def state_body(self):
        return self.sock is not None and self.phase != 0

    def step(self, wait_ms):
        """The next whole chunk (a memoryview valid until the next call), or None."""
        if self.done:
            return None
        if self.retry_at is not None:
            wait = ticks_diff(self.retry_at, ticks_ms())
            if wait > 0:
                sleep_ms(min(wait, wait_ms))
                return None
            self.retry_at = None
        if self.phase == 0:
            self._request()
        if self.phase == 1:
            if not self._headers(wait_ms):
                return None
            wait_ms = 0
        return self._body(wait_ms)

    def begin(self, job, http, offset, size, chunk):
        """start(), with a refusal (HttpError: a bad URL) kept in `error` instead of raised: the
        runners start a fetch while executing the core's actions, and report it at the next step."""
        try:
            self.start(job, http, offset, size, chunk)
        except HttpError as e:
            self.done = True
            self.error = e

    def wanted(self, core):
        """Whether `core` still wants this fetch stepped: downloading its http job, or with an
        error to report. For a job that ended (cancelled, superseded, failed) no socket is kept."""
        job = core.job
        if core.state == P.DOWNLOADING and job is not None and job.http and self.job == job.id:
            return not self.done or self.error is not None
        if self.sock is not None:
            self.close()
        return False

    def give_up(self):
        """After a refusal that ends the job (HttpError, handed to the core's fetch_failed)."""
        self.error = None
        self.done = True
        self.close()

    def failed(self):
        """A failed attempt (OSError): the connection is dropped and the fetch goes on from its
        next chunk after a back-off."""
        self.close()
        self.failures += 1
        self.retry_at = ticks_add(ticks_ms(), min(RETRY_MAX_MS, RETRY_MS << min(self.failures - 1, 5)))

    def close(self):
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock = None
        self.origin = None
        self.phase = 0

    # ---- connection ------------------------------------------------------------------------------
    def _connect(self, scheme, host, port):
        self.close()
        ai = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)[0]
        s = socket.socket(ai[0], socket.SOCK_STREAM, ai[2])
        try:
            s.settimeout(self.timeout_s)
            s.connect(ai[-1])
            if scheme == "https":
                if self.tls is None:
                    raise HttpError(P.E_HTTP_TLS, "https URL but no CA to verify the server with")
                try:
                    s = self.tls(host).wrap_socket(s, server_hostname=host)
                except ValueError as e:
                    # MicroPython's failed verification, and CPython's SSLCertVerificationError
                    raise HttpError(P.E_HTTP_TLS, "certificate of %s: %s" % (host, e))
                except OSError as e:
                    if "CERTIFICATE" in str(e).upper() or "VERIF" in str(e).upper():
                        raise HttpError(P.E_HTTP_TLS, "certificate of %s: %s" % (host, e))
                    raise
            s.setblocking(False)
        except BaseException:
            s.close()
            raise
        self.sock = s
        self._rd, self._wr, self._poll = nonblocking_io(s)
        self.origin = (scheme, host, port)
        self.connections += 1

    def _wait(self, event, ms):
        self._poll.modify(self.sock, event)
        try:
            return self._poll.poll(int(ms))
        finally:
            self._poll.modify(self.sock, select.POLLIN)

    def _send(self, data):
        mv = memoryview(data)
        i = 0
        while i < len(data):
            try:
                w = self._wr(mv[i:])
            except OSError as e:
                if not _again(e):
                    raise
                w = None
            if not w:
                if not self._wait(select.POLLOUT, self.timeout_s * 1000):
                    raise OSError(errno.ETIMEDOUT, "request not sent")
                continue
            i += w

    def _recv(self, mv, wait_ms):
        # One read into mv (waiting at most wait_ms for data): the byte count, 0 if none.
        for attempt in (0, 1):
            try:
                n = self._rd(mv)
            except OSError as e:
                if not _again(e):
                    raise
                n = None
            if n is None:
                if attempt or wait_ms <= 0 or not self._poll.poll(int(wait_ms)):
                    return 0
                continue
            if n == 0:
                raise OSError(errno.ECONNRESET, "connection closed by the server")
            self.bytes_received += n
            return n
        return 0

    # ---- request and response ------------------------------------------------------------------
    def _request(self):
        scheme, host, port, target = parse_url(self.url)
        if self.sock is None or self.origin != (scheme, host, port):
            self._connect(scheme, host, port)
        end = min(self.size, (self.pos // self.seg + 1) * self.seg) - 1
        default = 443 if scheme == "https" else 80
        hostport = host if port == default else "%s:%d" % (host, port)
        if ":" in host:
            hostport = "[%s]" % host if port == default else "[%s]:%d" % (host, port)
        self._send(("GET %s HTTP/1.1\r\nHost: %s\r\nRange: bytes=%d-%d\r\nUser-Agent: fota\r\n"
                    "Connection: keep-alive\r\n\r\n" % (target, hostport, self.pos, end)).encode())
        self.requests += 1
        self.asked_end = end
        self.phase = 1
        self.lo = self.hi = 0
        self.header_wait = max(self.timeout_s, HEADER_WAIT_S) * 1000

    def _headers(self, wait_ms):
        # Read until the blank line; parse the status and the headers we need.
        buf = self.buf
        while True:
            end = bytes(memoryview(buf)[:self.hi]).find(b"\r\n\r\n")
            if end >= 0:
                break
            if self.hi == len(buf):
                raise HttpError(P.E_HTTP_RANGE, "response headers longer than %d bytes" % len(buf))
            n = self._recv(memoryview(buf)[self.hi:], wait_ms)
            if not n:
                self.header_wait -= wait_ms
                if self.header_wait <= 0:
                    raise OSError(errno.ETIMEDOUT, "no response headers")
                return False
            self.hi += n
        head = bytes(memoryview(buf)[:end]).decode()
        self.lo = end + 4   # the body's first bytes may follow in the buffer
        lines = head.split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise HttpError(P.E_HTTP_RANGE, "not an HTTP/1.x response: %r" % lines[0][:64])
        status = int(parts[1])
        length = None
        crange = location = None
        keep = parts[0] != "HTTP/1.0"
        chunked = False
        for line in lines[1:]:
            i = line.find(":")
            if i < 0:
                continue
            name = line[:i].strip().lower()
            value = line[i + 1:].strip()
            if name == "content-length":
                length = int(value)
            elif name == "content-range":
                crange = value
            elif name == "location":
                location = value
            elif name == "connection":
                keep = value.lower() != "close" and (keep or value.lower() == "keep-alive")
            elif name == "transfer-encoding" and value.lower() != "identity":
                chunked = True
        head = lines = None
        self.keep = keep
        if status in _REDIRECTS:
            self._redirect(location)
            return False
        if status in _RETRY:
            self.close()
            raise OSError(errno.EAGAIN, "HTTP %d from the server" % status)
        if status == 416:
            raise HttpError(P.E_HTTP_RANGE, "HTTP 416: the server has no bytes %d- of the %d-byte blob"
                            % (self.pos, self.size))
        if status not in (200, 206):
            raise HttpError(P.E_HTTP_STATUS, "HTTP %d for %s" % (status, self.url.split("?")[0][:200]))
        if chunked or length is None:
            raise HttpError(P.E_HTTP_RANGE, "HTTP %d without a Content-Length" % status)
        self.skip = 0
        self.redirects = 0  # counted per request: a later segment may be redirected again
        if status == 206:
            # Content-Range: bytes a-b/total, exactly the range asked for, of a blob of the size
            # the signed manifest (or delta) gives.
            ok = False
            if crange and crange.startswith("bytes "):
                try:
                    span, total = crange[6:].split("/")
                    a, b = span.split("-")
                    ok = int(a) == self.pos and int(b) == self.asked_end and int(total) == self.size \
                        and length == self.asked_end - self.pos + 1
                except ValueError:
                    pass
            if not ok:
                raise HttpError(P.E_HTTP_RANGE, "asked for bytes %d-%d/%d, got %r (%d bytes)"
                                % (self.pos, self.asked_end, self.size, crange, length))
        else:
            # A server that ignores Range sends the whole blob: its size must be the signed one,
            # and the bytes before the offset are read and dropped.
            if length != self.size:
                raise HttpError(P.E_HTTP_RANGE, "HTTP 200 with %d bytes, the blob has %d" % (length, self.size))
            self.skip = self.pos
            self.asked_end = self.size - 1  # read on to the end: this response has it all
        self.left = length - (self.hi - self.lo)   # body bytes still in the socket
        if self.left < 0:
            raise HttpError(P.E_HTTP_RANGE, "more bytes than Content-Length")
        self.phase = 2
        return True

    def _redirect(self, location):
        self.redirects += 1
        if not location or self.redirects > MAX_REDIRECTS:
            raise HttpError(P.E_HTTP_REDIRECT, "redirect without a Location" if not location
                            else "more than %d redirects" % MAX_REDIRECTS)
        if location.startswith("/"):
            scheme, host, port, _ = parse_url(self.url)
            default = 443 if scheme == "https" else 80
            location = "%s://%s%s" % (scheme, host if port == default else "%s:%d" % (host, port), location)
        try:
            scheme, host, port, _ = parse_url(location)
        except ValueError:
            raise HttpError(P.E_HTTP_REDIRECT, "redirect to %r" % location[:200])
        signed = self.signed
        if signed[0] == "https" and scheme != "https":
            raise HttpError(P.E_HTTP_REDIRECT, "redirect from https to %s://%s" % (scheme, host))
        if (scheme, host, port) != signed[:3] and host not in self.hosts:
            raise HttpError(P.E_HTTP_REDIRECT, "redirect to %s, a host the command does not allow" % host)
        # The redirect's body is not read: a new connection is cheaper to get right.
        self.close()
        self.url = location
        if self.log:
            self.log("http: redirected to", host)

    def _body(self, wait_ms):
        buf = self.buf
        chunk = self.chunk
        while self.skip:
            if self.lo == self.hi:
                if not self.left:
                    raise HttpError(P.E_HTTP_RANGE, "body ended before offset %d" % self.pos)
                n = self._recv(memoryview(buf)[:min(len(buf), self.left)], wait_ms)
                if not n:
                    return None
                self.left -= n
                self.lo, self.hi = 0, n
            k = min(self.skip, self.hi - self.lo)
            self.skip -= k
            self.lo += k
        if self.lo == self.hi:
            self.lo = self.hi = 0  # the last chunk's view has been used: the buffer is free
        want = min(chunk, self.size - self.pos)
        if self.hi - self.lo < want:
            if self.lo and self.lo + want > len(buf):  # make room at the front
                k = self.hi - self.lo
                buf[:k] = memoryview(buf)[self.lo:self.hi]
                self.lo, self.hi = 0, k
            room = min(self.lo + want - self.hi, self.left)
            if room <= 0:
                raise HttpError(P.E_HTTP_RANGE, "body ended at byte %d, chunk needs %d more"
                                % (self.pos + self.hi - self.lo, want - (self.hi - self.lo)))
            n = self._recv(memoryview(buf)[self.hi:self.hi + room], wait_ms)
            self.left -= n
            self.hi += n
            if self.hi - self.lo < want:
                return None
        data = memoryview(buf)[self.lo:self.lo + want]
        self.lo += want
        self.pos += want
        self.failures = 0
        if self.pos >= self.size:
            self.done = True
            self.close()  # the download is complete: no socket (nor TLS buffers) kept
        elif self.pos > self.asked_end:
            # This response is complete: the next segment on the same connection, unless the
            # server closes it or sent more than was asked for (a 200 to a ranged request).
            if self.left or self.hi > self.lo or not self.keep:
                self.close()
            self.phase = 0
        return data
