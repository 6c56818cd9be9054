"""HMAC-SHA256 signatures on the files nodes write to the shared directory (docs/RELIABILITY.md, threat model).

Anyone who can write to the shared directory (a Drive share, a mount other users reach) can plant a file
that is *well-formed*: a state that says "finished", a reward file for a future round, a peer record dated
in the future. Schema checks cannot tell such a file from ours; a per-experiment key can. Every JSON file
and every JSONL line a node writes carries ``"hmac": "<64 hex>"`` as its **last key**:

    {"schema_version":1,"round":5,...,"hmac":"9f2c..."}

The MAC is over a domain tag, the file's path relative to the experiment (or archive) directory, and the
canonical bytes of the object without the ``hmac`` key (exactly what :func:`node.strict_json.encode_json`
wrote). So a reader checks a file **before parsing it** (a slice and one HMAC), a signed file cannot be
moved to another path (another round, another node) and still verify, and the file stays plain JSON:
an older reader ignores the unknown key (its schemas ignore extra keys), a newer reader with
``exchange.require_signatures: false`` accepts an older writer's unsigned files.

The key: 32 random bytes, hex, in ``<runtime dir>/swarm.key`` (mode 0600, local disk, never in the shared
directory), created by the supervisor at the first launch and handed to its nodes as ``SWARM_KEY``. A node
started by hand, or on another host, gets it from ``--key-file``, ``SWARM_KEY`` or ``SWARM_KEY_FILE``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import stat
from pathlib import Path

KEY_ENV = "SWARM_KEY"
KEY_FILE_ENV = "SWARM_KEY_FILE"
KEY_FILE_NAME = "swarm.key"
KEY_BYTES = 32
MIN_KEY_BYTES = 16
MAX_KEY_FILE_BYTES = 4096

_DOMAIN = b"sapo-swarm/v1\x00"
_MARK = b',"hmac":"'
_HEX_LEN = 64
_TAIL = len(_MARK) + _HEX_LEN + 2  # ,"hmac":"<64 hex>"}
_HEX = re.compile(rb"[0-9a-f]{64}")

UNSIGNED = "unsigned"
BAD_SIGNATURE = "bad signature"


class SignatureError(ValueError):
    """A file (or line) refused by :meth:`Signer.verify`; ``reason`` is :data:`UNSIGNED` or :data:`BAD_SIGNATURE`."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class KeyProblem(ValueError):
    """A key that cannot be used (malformed, too short, unreadable file); the message says which and where."""


def parse_key(text: str | bytes, *, source: str) -> bytes:
    """The key bytes of a hex key (whitespace around it ignored); KeyProblem naming ``source`` otherwise."""
    raw = text.decode("ascii", "replace") if isinstance(text, bytes) else text
    raw = raw.strip()
    try:
        key = bytes.fromhex(raw)
    except ValueError:
        raise KeyProblem(f"{source}: not a hex key (expected {2 * KEY_BYTES} hex digits)") from None
    if len(key) < MIN_KEY_BYTES:
        raise KeyProblem(f"{source}: key too short ({len(key)} bytes; at least {MIN_KEY_BYTES})")
    return key


def read_key_file(path: Path | str) -> bytes:
    """The key in ``path`` (a regular file of at most 4 KiB); KeyProblem with the reason otherwise. A key
    file readable by other users is refused: whoever reads it can forge every file of the experiment."""
    p = Path(path).expanduser()
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        raise KeyProblem(f"key file {p}: {err.strerror or err}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_KEY_FILE_BYTES:
            raise KeyProblem(f"key file {p}: not a regular file of at most {MAX_KEY_FILE_BYTES} bytes")
        if st.st_mode & 0o077:
            raise KeyProblem(f"key file {p}: readable by group or others (mode {st.st_mode & 0o777:o}); "
                            f"run: chmod 600 {p}")
        data = os.read(fd, MAX_KEY_FILE_BYTES + 1)
    finally:
        os.close(fd)
    return parse_key(data, source=f"key file {p}")


def create_key_file(path: Path | str) -> bytes:
    """Create ``path`` with a fresh random key (mode 0600, O_EXCL) and return it; when another process
    created it first, read that one instead (so concurrent starters on one host agree)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(KEY_BYTES)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, key.hex().encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, p)  # atomic and exclusive: the first creator wins, complete from the start
    except FileExistsError:
        return read_key_file(p)
    finally:
        os.unlink(tmp)
    return key


def resolve_key(*, key_file: str | os.PathLike | None, runtime_dir: Path, environ=None,
                create: bool) -> tuple[bytes | None, str]:
    """(key, where it came from): ``key_file``, else ``$SWARM_KEY`` (hex), else ``$SWARM_KEY_FILE``, else
    ``<runtime_dir>/swarm.key`` (created when ``create`` and absent). (None, "") when there is none and
    ``create`` is false. Raises KeyProblem for a key that is present but unusable."""
    env = os.environ if environ is None else environ
    if key_file:
        return read_key_file(key_file), f"--key-file {key_file}"
    if env.get(KEY_ENV):
        return parse_key(env[KEY_ENV], source=f"${KEY_ENV}"), f"${KEY_ENV}"
    if env.get(KEY_FILE_ENV):
        return read_key_file(env[KEY_FILE_ENV]), f"${KEY_FILE_ENV} ({env[KEY_FILE_ENV]})"
    local = Path(runtime_dir) / KEY_FILE_NAME
    if os.path.lexists(local):
        return read_key_file(local), str(local)
    if not create:
        return None, ""
    try:
        return create_key_file(local), f"{local} (new)"
    except OSError as err:
        raise KeyProblem(f"cannot create key file {local}: {err.strerror or err}") from None


def fingerprint(key: bytes) -> str:
    """A short public identifier of a key (safe to log): the first 12 hex digits of its SHA-256."""
    return hashlib.sha256(b"fingerprint\x00" + key).hexdigest()[:12]


class Signer:
    """Signs and verifies JSON objects (files, JSONL lines) with one experiment key.

    ``key=None``: nothing is signed and nothing is verified (a library use without a swarm key), but a
    signature found on a read is still stripped, so callers always see the canonical object. ``required``:
    unsigned files are refused (else accepted: a directory shared with older versions)."""

    def __init__(self, key: bytes | None, *, required: bool = True):
        if key is not None and len(key) < MIN_KEY_BYTES:
            raise KeyProblem(f"key too short ({len(key)} bytes; at least {MIN_KEY_BYTES})")
        self.key = key
        self.required = bool(required) and key is not None

    @property
    def enabled(self) -> bool:
        return self.key is not None

    def _mac(self, context: str, body: bytes) -> bytes:
        msg = _DOMAIN + context.encode("utf-8", "surrogateescape") + b"\x00" + body
        return hmac.new(self.key, msg, hashlib.sha256).hexdigest().encode("ascii")

    def sign(self, body: bytes, context: str) -> bytes:
        """``body`` (the compact JSON of a non-empty object) with ``"hmac"`` appended as its last key."""
        if self.key is None:
            return body
        if not (body.startswith(b"{") and body.endswith(b"}")) or body == b"{}":
            raise ValueError("only a non-empty JSON object can be signed")
        return body[:-1] + _MARK + self._mac(context, body) + b'"}'

    def verify(self, data: bytes, context: str) -> bytes:
        """The canonical body of signed ``data`` (the signature removed). Unsigned data is returned as it is
        unless signatures are required (SignatureError ``unsigned``); a signature that does not match is
        SignatureError ``bad signature`` whenever we hold a key. Costs a slice and one HMAC: no parsing."""
        body, mac = _split(data)
        if mac is None:
            if self.required:
                raise SignatureError(UNSIGNED)
            return data
        if self.key is None:
            return body
        if not hmac.compare_digest(mac, self._mac(context, body)):
            raise SignatureError(BAD_SIGNATURE)
        return body


def _split(data: bytes) -> tuple[bytes, bytes | None]:
    """(body, mac) when ``data`` ends with our signature key, else (data, None)."""
    if len(data) < _TAIL + 2 or not data.endswith(b'"}') or data[-_TAIL:-_TAIL + len(_MARK)] != _MARK:
        return data, None
    mac = data[-_HEX_LEN - 2:-2]
    if not _HEX.fullmatch(mac):
        return data, None
    return data[:-_TAIL] + b"}", mac
