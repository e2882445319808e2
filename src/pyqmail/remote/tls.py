"""STARTTLS policy for remote delivery (docs/remote.md, "TLS").

- Opportunistic (the default): when the server offers STARTTLS we use it without checking
  the certificate (a passive eavesdropper learns nothing; an active attacker could strip
  it, as with every opportunistic SMTP client). A failed handshake leaves the connection
  unusable, so the message is sent again over a fresh plaintext connection to the same
  address.
- Required: a recipient domain listed in control/tlsdestinations (one domain per line,
  ``.suffix`` for every subdomain) gets TLS with a certificate that verifies for the MX or
  relay host name, or nothing: no STARTTLS, a refused STARTTLS or a failed handshake is a
  temporary failure (#4.7.5), and plaintext is never tried.

Certificates are checked against the system's CAs, or against the file named by
``PYQMAIL_TLS_CAFILE`` (or the ``cafile`` argument), which tests use.
"""

from __future__ import annotations

import os
import ssl

from pyqmail.control import Control, host_listed


def tls_required(ctl: Control, domain: str) -> bool:
    """True if control/tlsdestinations lists ``domain`` (exactly or by ``.suffix``)."""
    return host_listed(domain, ctl.tlsdestinations)


def opportunistic_context() -> ssl.SSLContext:
    """Encrypt, but accept any certificate (opportunistic TLS, RFC 7435)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def verified_context(cafile: str | None = None) -> ssl.SSLContext:
    """Encrypt and verify the certificate chain and host name."""
    cafile = cafile or os.environ.get("PYQMAIL_TLS_CAFILE") or None
    return ssl.create_default_context(cafile=cafile)
