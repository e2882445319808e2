"""DKIM signing of locally injected mail (RFC 6376, RFC 8463 for Ed25519), and its keys.

Layout: ``control/dkim/DOMAIN/selector`` names the signing selector(s), one a line (an RSA
and an Ed25519 one give two signatures); ``control/dkim/DOMAIN/SELECTOR.key`` is the
private key: PEM (PKCS#1 or PKCS#8) for rsa-sha256, or the base64 32-byte seed that
dkimpy reads for ed25519-sha256.

Which key: the From domain, lower-cased, exactly; no parent-domain fall-back (a key for
``example.com`` never signs ``mail.example.com``: a sub-domain gets its own directory, so
nobody signs for a name the operator did not list). No directory, no selector file, no
readable key: no signature and no error. A header with no From, or with more than one
From field (RFC 5322 allows one), is not signed either: its author is not defined.

What is signed: relaxed/relaxed, the header fields RFC 6376 section 5.4.1 recommends that
are present (dkimpy's ``DKIM.SHOULD``: From, Sender, Reply-To, Subject, Date, Message-ID,
To, Cc, MIME-Version, Content-*, Resent-*, In-Reply-To, References, List-*), and From
once more than present, so a From added later breaks the signature (oversigning).

Who signs: the process that writes the queue, never the injecting user's (``signing``
wraps a queue Pending). In root mode that is the queue user (qmailq): the queue service
for local users, or root's queue-writer child after it dropped to qmailq; the key is
qmailq's, mode 0600, and no other account can read it. In single-user mode the user owns
both the queue and the key. The caller decides whether a message is to be signed: local
injection (qmail-inject, sendmail, a local user through the queue service) is, and so is
mail from an authenticated SMTP session (smtp/protocol.py's AUTH; the listener's committer
process, queue/committer.py, or qmail-smtpd's own writer signs it); mail relayed in from
the network unauthenticated, bounces and QMQP/QMTP are not.

Speed: dkimpy computes the RSA signature itself, with Python integers (``pow`` on the
key's primes: about 10 ms per message for a 2048-bit key). It does everything else (the
canonical forms, the hashes, the field and its folding), then hands the finished hash and
the key it parsed to its module-level function ``RSASSA_PKCS1_v1_5_sign(hash, key)``;
:func:`fast_rsa` puts :func:`_rsa_sign` in that place, which gives the same bytes (RSASSA-
PKCS1-v1_5 is deterministic) from OpenSSL through ``cryptography`` (about 0.5 ms). It is
installed only when dkimpy has that function where this module expects it; otherwise
dkimpy signs alone, slower but the same. Ed25519 is already libsodium's (PyNaCl).

Bounded memory: dkimpy signs a whole message held in memory, so ``SigningPending`` holds
the message until commit up to ``SIGN_MAX`` bytes (10 MiB) and writes it through unsigned,
with a log line, once it is larger.
"""

from __future__ import annotations

import base64
import os
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pyqmail.home import Home

if TYPE_CHECKING:
    import dns.resolver

# dkimpy, cryptography and dnspython are imported where they are used: every process that
# writes the queue imports this module, and most never sign (about 20 MB less to load).

SIGN_MAX = 10 << 20
DIR = "dkim"
RSA = b"rsa-sha256"
ED25519 = b"ed25519-sha256"
_LABEL = r"[a-z0-9](?:[a-z0-9_-]{0,61}[a-z0-9])?"
_DOMAIN = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}")
_SELECTOR = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}", re.IGNORECASE)

Log = Callable[[str], None]


def _stderr(line: str) -> None:
    print(f"dkim: {line}", file=sys.stderr, flush=True)


def valid_domain(domain: str) -> bool:
    """A lower-case ASCII host name: safe as a directory name and as a d= tag."""
    return len(domain) <= 253 and _DOMAIN.fullmatch(domain) is not None


def valid_selector(selector: str) -> bool:
    return len(selector) <= 63 and _SELECTOR.fullmatch(selector) is not None


@dataclass(frozen=True, slots=True)
class Key:
    domain: str
    selector: str
    algorithm: bytes  # RSA or ED25519
    private: bytes  # as dkimpy takes it: PEM, or the base64 Ed25519 seed


def key_dir(home: Home, domain: str) -> Path:
    return home.control / DIR / domain


def selectors(home: Home, domain: str) -> list[str]:
    """The valid selectors named in control/dkim/DOMAIN/selector ([] if none)."""
    try:
        raw = (key_dir(home, domain) / "selector").read_bytes()
    except OSError:
        return []
    out: list[str] = []
    for line in raw.decode("ascii", "replace").splitlines():
        s = line.strip()
        if s and not s.startswith("#") and valid_selector(s) and s not in out:
            out.append(s)
    return out


def _algorithm(private: bytes) -> bytes:
    return RSA if private.lstrip().startswith(b"-----BEGIN") else ED25519


def load_keys(home: Home, domain: str, *, log: Log = _stderr) -> list[Key]:
    """The keys that sign mail From ``domain``; [] (no error) if there are none."""
    if not valid_domain(domain):
        return []
    keys = []
    for sel in selectors(home, domain):
        path = key_dir(home, domain) / f"{sel}.key"
        try:
            private = path.read_bytes()
        except FileNotFoundError:
            log(f"{path}: selector {sel} named but no key: not signing with it")
            continue
        except OSError as e:
            log(f"{path}: unreadable ({e.strerror}): not signing with it")
            continue
        keys.append(Key(domain, sel, _algorithm(private), private.strip()))
    return keys


_FIELD = re.compile(rb"^([!-9;-~]+)[ \t]*:", re.MULTILINE)


def header_of(message: bytes) -> bytes:
    """The header section: up to the first empty line (LF or CRLF endings)."""
    m = re.search(rb"(?:^|\n)\r?\n", message)
    return message if m is None else message[: m.start() + 1]


def from_domain(header: bytes) -> str | None:
    """The domain of the one From address, lower-cased; None if there is no From field,
    more than one, more than one address in it, or no valid ASCII domain."""
    fields: list[bytearray] = []
    in_from = False
    for line in header.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t"):
            if in_from:
                fields[-1] += line
            continue
        m = _FIELD.match(line)
        in_from = m is not None and m.group(1).lower() == b"from"
        if m is not None and in_from:
            fields.append(bytearray(line[m.end() :]))
    if len(fields) != 1:
        return None
    import email.utils  # here: a process that never signs need not load the email package

    text = fields[0].decode("latin-1").replace("\r", "").replace("\n", "")
    addrs = [a for _, a in email.utils.getaddresses([text]) if a]
    if len(addrs) != 1 or "@" not in addrs[0]:
        return None
    domain = addrs[0].rpartition("@")[2].strip().lower().rstrip(".")
    return domain if valid_domain(domain) else None


class Signer:
    """Signs messages with the keys of the home's control/dkim, read at each message
    (a key added or rotated takes effect at once; a few small reads per message)."""

    def __init__(self, home: Home, *, log: Log = _stderr) -> None:
        self.home = home
        self.log = log

    def signature(self, message: bytes) -> bytes:
        """The DKIM-Signature field(s) to put in front of ``message`` (LF line ends, as
        the queue stores mail); b"" when no key applies or signing fails."""
        header = header_of(message)
        domain = from_domain(header)
        if domain is None:
            return b""
        keys = load_keys(self.home, domain, log=self.log)
        if not keys:
            return b""
        import dkim as _dkimpy  # type: ignore[import-untyped]

        fast_rsa(_dkimpy)
        crlf = message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")  # what \r?\n -> CRLF does
        out = []
        for key in keys:
            try:
                sig = _dkimpy.sign(
                    crlf,
                    key.selector.encode(),
                    domain.encode(),
                    key.private,
                    canonicalize=(b"relaxed", b"relaxed"),
                    signature_algorithm=key.algorithm,
                    linesep=b"\n",
                )
            except Exception as e:  # dkimpy's errors: a bad key or an unparsable header
                self.log(f"not signed with {key.selector}._domainkey.{domain}: {e}")
                continue
            out.append(bytes(sig))
        return b"".join(out)


_RSA_KEYS: dict[tuple[int, int], Any] = {}  # (n, d) -> cryptography's key, for _rsa_sign
_RSA_KEYS_MAX = 64


def _rsa_sign(hash_: Any, key: dict[str, int]) -> bytes:
    """dkimpy's ``RSASSA_PKCS1_v1_5_sign(hash, private_key)`` (RFC 8017 8.2.1), by OpenSSL:
    ``hash_`` is dkimpy's finished hash object (``name``, ``digest()``), ``key`` the
    numbers dkimpy parsed from the PEM. The key object is built once per key."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

    algorithm: hashes.HashAlgorithm
    name = str(hash_.name).lower()
    if name == "sha256":
        algorithm = hashes.SHA256()
    elif name == "sha1":
        algorithm = hashes.SHA1()
    else:
        return bytes(_DKIMPY_RSA_SIGN(hash_, key))
    ident = (key["modulus"], key["privateExponent"])
    priv = _RSA_KEYS.get(ident)
    if priv is None:
        try:
            priv = rsa.RSAPrivateNumbers(
                p=key["prime1"],
                q=key["prime2"],
                d=key["privateExponent"],
                dmp1=key["exponent1"],
                dmq1=key["exponent2"],
                iqmp=key["coefficient"],
                public_numbers=rsa.RSAPublicNumbers(key["publicExponent"], key["modulus"]),
            ).private_key()
        except ValueError:  # numbers OpenSSL refuses: dkimpy's own arithmetic decides
            return bytes(_DKIMPY_RSA_SIGN(hash_, key))
        if len(_RSA_KEYS) >= _RSA_KEYS_MAX:
            _RSA_KEYS.clear()
        _RSA_KEYS[ident] = priv
    try:
        return bytes(priv.sign(hash_.digest(), padding.PKCS1v15(), utils.Prehashed(algorithm)))
    except ValueError:  # a modulus too small for the digest: dkimpy's error for it
        return bytes(_DKIMPY_RSA_SIGN(hash_, key))


_DKIMPY_RSA_SIGN: Any = None


def fast_rsa(dkimpy: Any) -> bool:
    """Have dkimpy sign RSA through :func:`_rsa_sign` (module docstring); whether it does.
    Done once per process; nothing is changed when dkimpy's layout is not the expected."""
    global _DKIMPY_RSA_SIGN
    current = getattr(dkimpy, "RSASSA_PKCS1_v1_5_sign", None)
    if current is _rsa_sign:
        return True
    crypto = getattr(dkimpy, "crypto", None)
    if current is None or current is not getattr(crypto, "RSASSA_PKCS1_v1_5_sign", None):
        return False
    _DKIMPY_RSA_SIGN = current
    dkimpy.RSASSA_PKCS1_v1_5_sign = _rsa_sign
    return True


class QueuePending(Protocol):
    msgnum: int
    qp: int

    def write(self, data: bytes) -> None: ...
    def commit(self, sender: bytes, recipients: Iterable[bytes]) -> int: ...
    def abort(self) -> None: ...


class SigningPending:
    """A queue Pending whose message is signed at commit: held in memory until then, up
    to ``limit`` bytes; a larger message is written through unsigned (and logged)."""

    def __init__(self, inner: QueuePending, signer: Signer, *, limit: int = SIGN_MAX) -> None:
        self.inner = inner
        self.signer = signer
        self.limit = limit
        self._buf: bytearray | None = bytearray()
        self.msgnum = inner.msgnum
        self.qp = inner.qp

    def write(self, data: bytes) -> None:
        if self._buf is None:
            self.inner.write(data)
            return
        self._buf += data
        if len(self._buf) > self.limit:
            self.signer.log(f"message over {self.limit} bytes: queued unsigned")
            self.inner.write(bytes(self._buf))
            self._buf = None

    def finish(self) -> QueuePending:
        """Write the signature and the held message into the inner Pending and return it,
        for a caller that commits the inner one itself (queue/committer.py's batches)."""
        self._sign()
        return self.inner

    def _sign(self) -> None:
        if self._buf is not None:
            message = bytes(self._buf)
            self._buf = None
            try:
                sig = self.signer.signature(message)
            except Exception as e:  # never lose or refuse a message for its signature
                self.signer.log(f"not signed: {type(e).__name__}: {e}")
                sig = b""
            if sig:
                self.inner.write(sig)
            self.inner.write(message)

    def commit(self, sender: bytes, recipients: Iterable[bytes]) -> int:
        self._sign()
        try:
            return self.inner.commit(sender, recipients)
        finally:
            self.msgnum, self.qp = self.inner.msgnum, self.inner.qp

    def abort(self) -> None:
        self._buf = None
        self.inner.abort()


def has_keys(home: Home) -> bool:
    return (home.control / DIR).is_dir()


def preload(home: Home) -> None:
    """Import the signing libraries now if ``home`` has keys: called before a process
    drops to the queue user, who may not be able to read the interpreter's own files
    (a venv under /root). A key directory made later is served by a lazy import."""
    if has_keys(home):
        try:
            import dkim  # type: ignore[import-untyped]  # noqa: F401
        except ImportError as e:
            _stderr(f"cannot load dkimpy ({e}): mail will not be signed")


def signing(home: Home, pending: QueuePending, *, log: Log = _stderr) -> QueuePending:
    """``pending``, signed at commit if the home has control/dkim (else unchanged). Called
    by the process that writes the queue, for the messages its caller wants signed."""
    if not has_keys(home):
        return pending
    return SigningPending(pending, Signer(home, log=log))


# -- keys and their DNS records ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Record:
    name: str  # SELECTOR._domainkey.DOMAIN
    value: str  # v=DKIM1; k=...; p=...


def record_for(key: Key) -> Record:
    """The TXT record that publishes ``key``'s public half."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    if key.algorithm == RSA:
        priv = serialization.load_pem_private_key(key.private, password=None)
        if not isinstance(priv, rsa.RSAPrivateKey):
            raise ValueError("not an RSA key")
        der = priv.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        kind = "rsa"
    else:
        seed = base64.b64decode(key.private, validate=True)
        pub = ed25519.Ed25519PrivateKey.from_private_bytes(seed).public_key()
        der = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        kind = "ed25519"
    p = base64.b64encode(der).decode()
    return Record(f"{key.selector}._domainkey.{key.domain}", f"v=DKIM1; k={kind}; p={p}")


def new_private(*, ed: bool = False, bits: int = 2048) -> bytes:
    """A new private key in the form the key file holds."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    if ed:
        seed = ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return base64.b64encode(seed) + b"\n"
    if bits < 1024:
        raise ValueError("RSA keys under 1024 bits are refused by verifiers (RFC 8301)")
    return rsa.generate_private_key(public_exponent=65537, key_size=bits).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


class KeygenError(Exception):
    pass


def signing_account(home: Home) -> tuple[int, int] | None:
    """(uid, gid) to own keys: the queue user in root mode; None = the caller."""
    if home.single_user or os.geteuid() != 0:
        return None
    ids = home.ids()
    return ids.uid("queue"), ids.gid("qmail")


def keygen(
    home: Home,
    domain: str,
    selector: str,
    *,
    ed: bool = False,
    bits: int = 2048,
    owner: tuple[int, int] | None = None,
) -> tuple[Record, bool]:
    """Write control/dkim/DOMAIN/SELECTOR.key (mode 0600, owned by ``owner``, else the
    caller) and name the selector if none is named. Returns the record and whether the
    selector file was written. An existing key is never replaced (KeygenError)."""
    domain = domain.lower().rstrip(".")
    if not valid_domain(domain):
        raise KeygenError(f"not a domain name: {domain!r}")
    if not valid_selector(selector):
        raise KeygenError(f"not a selector: {selector!r}")
    d = key_dir(home, domain)
    for p in (d.parent, d):
        try:
            p.mkdir(mode=0o755)
        except FileExistsError:
            pass
    path = d / f"{selector}.key"
    if path.exists():
        raise KeygenError(f"{path} exists: choose another selector to rotate keys")
    private = new_private(ed=ed, bits=bits)
    _write_new(path, private, 0o600, owner)
    named = False
    if not selectors(home, domain):
        _write_new(d / "selector", f"{selector}\n".encode(), 0o644, None, replace=True)
        named = True
    key = Key(domain, selector, _algorithm(private), private.strip())
    return record_for(key), named


def _write_new(
    path: Path, data: bytes, mode: int, owner: tuple[int, int] | None, *, replace: bool = False
) -> None:
    """Write ``path`` whole (tmp, fsync, link or rename, fsync dir); the mode and owner
    are set on the descriptor before any byte is written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        if owner is not None:
            os.fchown(fd, *owner)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    try:
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # never over an existing key
    finally:
        if not replace:
            os.unlink(tmp)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# -- is the published record the key's? (pyqmail check) -----------------------------------


@dataclass(frozen=True, slots=True)
class RecordCheck:
    record: Record
    state: str  # "ok" | "mismatch" | "missing" | "unreachable" | "badkey"
    detail: str = ""


def resolver(spec: str | None = None, *, lifetime: float = 5.0) -> dns.resolver.Resolver:
    """A resolver for ``IP[:PORT]``, else PYQMAIL_RESOLVER, else resolv.conf."""
    import dns.resolver

    spec = spec if spec is not None else os.environ.get("PYQMAIL_RESOLVER") or None
    if spec is None:
        res = dns.resolver.Resolver()
    else:
        host, port = spec, 53
        if spec.startswith("["):
            host, _, rest = spec[1:].partition("]")
            port = int(rest[1:]) if rest.startswith(":") else 53
        elif spec.count(":") == 1:
            host, _, p = spec.partition(":")
            port = int(p)
        res = dns.resolver.Resolver(configure=False)
        res.nameservers = [host]
        res.port = port
    res.lifetime = lifetime
    res.timeout = min(res.timeout, lifetime)
    return res


def _tag_p(value: str) -> str | None:
    for part in value.split(";"):
        k, eq, v = part.strip().partition("=")
        if eq and k.strip() == "p":
            return re.sub(r"\s", "", v)
    return None


def check_records(home: Home, res: dns.resolver.Resolver) -> list[RecordCheck]:
    """For each signing key in control/dkim: is its published TXT record its own?"""
    base = home.control / DIR
    try:
        domains = sorted(p.name for p in base.iterdir() if p.is_dir())
    except OSError:
        return []
    out = []
    for domain in domains:
        for key in load_keys(home, domain, log=lambda _line: None):
            try:
                want = record_for(key)
            except ValueError as e:
                rec = Record(f"{key.selector}._domainkey.{domain}", "")
                out.append(RecordCheck(rec, "badkey", str(e)))
                continue
            out.append(_check_one(want, res))
    return out


def _check_one(want: Record, res: dns.resolver.Resolver) -> RecordCheck:
    import dns.exception
    import dns.resolver

    try:
        answer = res.resolve(want.name, "TXT")
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return RecordCheck(want, "missing")
    except dns.exception.DNSException as e:
        return RecordCheck(want, "unreachable", type(e).__name__)
    mine = _tag_p(want.value)
    seen = []
    for rr in answer:
        text = b"".join(rr.strings).decode("ascii", "replace")  # type: ignore[attr-defined]
        if _tag_p(text) == mine:
            return RecordCheck(want, "ok")
        seen.append(text)
    return RecordCheck(want, "mismatch", seen[0][:80] if seen else "")
