"""The SMTP server's certificate: ``control/servercert.pem`` to an :class:`ssl.SSLContext`.

``servercert.pem`` is the qmail-tls patch's file: the private key and the certificate
chain in one PEM file. This module owns

* :func:`server_context`: the context every door uses (TLS 1.2 at least, no
  compression, no renegotiation, the server's cipher order); an encrypted key is refused,
  never prompted for (under tcpserver, stdin is the client);
* :class:`CertStore`: the current context, reloaded when the file changes, without a
  restart: the file is stat'ed at most once per ``ttl`` seconds, when a connection asks.
  A bad or missing file means no STARTTLS (:class:`~pyqmail.smtp.protocol.TlsOffer`),
  with one warning per change of the file, never a crash. A replacement that cannot be
  loaded (half written, or unreadable to the account that reloads it) keeps the previous
  certificate, with a warning; a removed file turns STARTTLS off;
* :func:`self_signed` / :func:`ensure_servercert`: what ``pyqmail init`` writes;
* :func:`cert_problems`: what ``pyqmail check`` says about the file.

Who reads the key (``pyqmail run`` as root, daemon/split.py): the listener process loads
the certificate while still root, before it drops to qmaild, so a start always works; a
reload happens in that process as qmaild. ``pyqmail init`` therefore makes the file
owned by qmaild, mode 0600, as the qmail-tls patch has qmaild read it (its qmail-smtpd
runs as qmaild under tcpserver, as ours does). That exposes nothing new: the process
that terminates TLS is qmaild and holds the key in memory, so code running as qmaild
can read it anyway. Group and other get nothing: qmaild's group ``nofiles`` also holds
the ``alias`` account, whose ``.qmail`` programs must not read the key, and group
``qmail`` holds the queue and delivery accounts, which do not need it.
"""

from __future__ import annotations

import datetime
import logging
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pyqmail.smtp.protocol import TlsOffer
from pyqmail.smtp.session import TlsInfo

log = logging.getLogger("pyqmail.smtpd")

SERVERCERT = "servercert.pem"
MIN_VERSION = ssl.TLSVersion.TLSv1_2
EXPIRY_WARNING_DAYS = 30


class TlsError(Exception):
    """The certificate file cannot be used; the text says why (for a warning line)."""


def _no_password() -> bytes:
    raise TlsError("the private key is encrypted (servercert.pem needs an unencrypted key)")


def server_context(pem: Path) -> ssl.SSLContext:
    """A server context from ``pem`` (key and chain in one file); TlsError if unusable."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MIN_VERSION
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    try:
        ctx.load_cert_chain(pem, password=_no_password)
    except TlsError:
        raise
    except FileNotFoundError as e:
        raise TlsError("no such file") from e
    except ssl.SSLError as e:  # before OSError, its base class
        raise TlsError(f"not a key and certificate in PEM form ({e.reason or e})") from e
    except OSError as e:
        raise TlsError(e.strerror or str(e)) from e
    return ctx


def info(obj: ssl.SSLObject | ssl.SSLSocket) -> TlsInfo:
    """The version and cipher an established TLS connection agreed."""
    cipher = obj.cipher()
    return TlsInfo(obj.version() or "TLS", cipher[0] if cipher else "unknown")


_Key = tuple[int, int, int, int]


@dataclass(frozen=True, slots=True)
class Offer:
    """What a new connection gets: the STARTTLS offer and the context to use for it."""

    offer: TlsOffer
    context: ssl.SSLContext | None


class CertStore:
    """The current context for ``path``; see the module docstring for the reload rules."""

    def __init__(
        self,
        path: Path,
        *,
        ttl: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.path = path
        self.ttl = ttl
        self._clock = clock
        self._warn = warn or (lambda text: log.warning("%s", text))
        self._key: _Key | None = None
        self._checked = -1e18
        self._current = Offer(TlsOffer.OFF, None)
        self._loaded = False

    def load(self, *, warn_missing: bool = True) -> Offer:
        """Load now (at start-up): a missing file is warned about when ``warn_missing``."""
        self._checked = self._clock()
        key = self._stat()
        if key is None and warn_missing:
            self._warn(f"warning: no control/{SERVERCERT}: STARTTLS is not offered")
        self._update(key)
        return self._current

    def get(self) -> Offer:
        """The offer for a new connection; re-checks the file at most every ``ttl``."""
        now = self._clock()
        if not self._loaded or now - self._checked >= self.ttl:
            self._checked = now
            key = self._stat()
            if not self._loaded or key != self._key:
                self._update(key)
        return self._current

    def front_context(self) -> ssl.SSLContext:
        """A context for a listener with implicit TLS (465): at each handshake it switches
        to the current certificate's context (the SNI callback runs for every ClientHello,
        with or without SNI), so a replaced certificate needs no new listener. With no
        usable certificate the handshake fails with an alert."""
        front = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        front.minimum_version = MIN_VERSION

        def switch(obj: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> int | None:
            current = self.get().context
            if current is None:
                return ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE
            obj.context = current
            return None

        front.sni_callback = switch  # type: ignore[assignment]
        return front

    def _stat(self) -> _Key | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)

    def _update(self, key: _Key | None) -> None:
        self._loaded = True
        self._key = key
        if key is None:
            self._current = Offer(TlsOffer.OFF, None)
            return
        try:
            ctx = server_context(self.path)
        except TlsError as e:
            old = self._current.context
            if old is not None:
                self._warn(
                    f"warning: control/{SERVERCERT} changed but cannot be used ({e}); "
                    "keeping the previous certificate"
                )
            else:
                self._warn(
                    f"warning: control/{SERVERCERT} cannot be used ({e}); STARTTLS is not offered"
                )
                self._current = Offer(TlsOffer.UNAVAILABLE, None)
            return
        self._current = Offer(TlsOffer.ON, ctx)


# -- the certificate pyqmail init makes, and what pyqmail check says ----------------------


def self_signed(name: str, *, days: int = 3650, now: datetime.datetime | None = None) -> bytes:
    """A new RSA 2048 key and a self-signed certificate for ``name``, in one PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    now = now or datetime.datetime.now(datetime.UTC)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem_key = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return pem_key + cert.public_bytes(serialization.Encoding.PEM)


def ensure_servercert(control: Path, name: str, owner: tuple[int, int] | None) -> bool:
    """Write a self-signed ``control/servercert.pem`` for ``name`` unless one exists.

    Mode 0600, owned by ``owner`` (qmaild and its group in root mode, see the module
    docstring; None: the caller). Written under a temporary name and linked into place,
    so a reader never sees half a key, and an existing file is never replaced.
    True if it was written.
    """
    path = control / SERVERCERT
    if os.path.lexists(path):
        return False
    data = self_signed(name)
    tmp = control / f".{SERVERCERT}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        try:
            if owner is not None:
                os.fchown(fd, owner[0], owner[1])
            os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


@dataclass(frozen=True, slots=True)
class CertProblem:
    error: bool  # True: an error (TLS does not work); False: a warning
    message: str
    fix: str


def cert_problems(
    path: Path,
    *,
    now: datetime.datetime | None = None,
    reader: tuple[int, int] | None = None,
) -> list[CertProblem]:
    """What is wrong with ``path`` (none if it does not exist: TLS is simply off).

    ``reader``: the (uid, gid) that must be able to read it (qmaild in root mode).
    """
    from cryptography import x509

    try:
        st = os.stat(path)
    except FileNotFoundError:
        return []
    except OSError as e:
        return [CertProblem(True, f"cannot be examined ({e.strerror})", "")]
    out: list[CertProblem] = []
    try:
        server_context(path)
    except TlsError as e:
        return [
            CertProblem(
                True,
                f"cannot be used ({e}): STARTTLS is not offered",
                "put the private key and the certificate chain in it, in PEM form",
            )
        ]
    if st.st_mode & 0o077:
        out.append(
            CertProblem(
                False,
                f"the private key is readable by more than its owner (mode {st.st_mode & 0o777:o})",
                f"chmod 600 {path}",
            )
        )
    if reader is not None and st.st_uid != reader[0] and reader[0] != 0:
        out.append(
            CertProblem(
                True,
                "qmaild does not own it: qmail-smtpd under tcpserver and pyqmail run's "
                "listener (after it drops to qmaild) cannot reload it",
                f"chown qmaild {path}",
            )
        )
    with open(path, "rb") as f:
        certs = x509.load_pem_x509_certificates(f.read())
    leaf = certs[0]
    now = now or datetime.datetime.now(datetime.UTC)
    after = leaf.not_valid_after_utc
    if after <= now:
        out.append(CertProblem(True, f"the certificate expired on {after:%Y-%m-%d}", "renew it"))
    elif after - now <= datetime.timedelta(days=EXPIRY_WARNING_DAYS):
        out.append(
            CertProblem(
                False,
                f"the certificate expires on {after:%Y-%m-%d}, in {(after - now).days} days",
                "renew it",
            )
        )
    if leaf.issuer == leaf.subject:
        out.append(
            CertProblem(
                False,
                "the certificate is self-signed: clients encrypt but cannot authenticate "
                "this server (fine for opportunistic STARTTLS on port 25)",
                "install a certificate from a CA (e.g. Let's Encrypt) for submission ports",
            )
        )
    return out
