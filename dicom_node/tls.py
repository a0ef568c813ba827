"""TLS contexts for every connection the node makes or accepts (DICOM PS3.15 Annex B.9 "BCP 195 TLS Profile").

One place builds them, from certificate files named in the configuration: TLS 1.2 at least, the peer's
certificate verified. Settings validation calls these functions too, so a missing or unreadable file stops the
node at start with the key named, not at the first connection.
"""

from __future__ import annotations

import ssl
from pathlib import Path

#: BCP 195 (RFC 9325) forbids anything below TLS 1.2.
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


class TLSFileError(ValueError):
    """A certificate, key or CA file that cannot be loaded; ``key`` names the setting."""

    def __init__(self, key: str, path: Path | str, detail: str) -> None:
        super().__init__(f"{key} {path}: {detail}")
        self.key = key


def _no_passphrase() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key; a service must fail instead.
    raise TLSFileError("key_file", "", "encrypted private keys are not supported")


def _load_chain(ctx: ssl.SSLContext, cert_file: Path, key_file: Path) -> None:
    try:
        ctx.load_cert_chain(cert_file, key_file, password=_no_passphrase)
    except TLSFileError as exc:
        raise TLSFileError("key_file", key_file, "encrypted private keys are not supported") from exc
    except ssl.SSLError as exc:
        # OpenSSL does not say which of the two files it choked on: try the certificate alone.
        probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            probe.load_verify_locations(cafile=cert_file)
        except ssl.SSLError:
            raise TLSFileError("cert_file", cert_file, "not a PEM certificate") from exc
        raise TLSFileError("key_file", key_file, f"not a PEM private key matching cert_file ({exc.reason})") from exc
    except OSError as exc:
        raise TLSFileError("cert_file", cert_file, f"cannot be read ({exc.strerror})") from exc


def _load_ca(ctx: ssl.SSLContext, ca_file: Path) -> None:
    try:
        ctx.load_verify_locations(cafile=ca_file)
    except (ssl.SSLError, OSError) as exc:
        raise TLSFileError("ca_file", ca_file, "not a PEM CA certificate bundle") from exc


def server_context(
    cert_file: Path, key_file: Path, *, ca_file: Path | None = None, require_client_cert: bool = False
) -> ssl.SSLContext:
    """A context for accepting TLS connections; with ``ca_file``, client certificates are checked against it.

    ``require_client_cert`` (mutual TLS) refuses a client without a certificate signed by ``ca_file``.
    """
    if require_client_cert and ca_file is None:
        raise TLSFileError("ca_file", "", "required when require_client_cert is true")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MINIMUM_VERSION
    _load_chain(ctx, cert_file, key_file)
    if ca_file is not None:
        _load_ca(ctx, ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_context(
    *,
    ca_file: Path | None = None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
    check_hostname: bool = True,
) -> ssl.SSLContext:
    """A context for connecting over TLS: the server is verified against ``ca_file`` (else the system's CAs).

    ``cert_file``/``key_file`` present a client certificate (for servers that require mutual TLS).
    """
    if (cert_file is None) != (key_file is None):
        raise TLSFileError("key_file" if key_file is None else "cert_file", "", "cert_file and key_file go together")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and hostname checking by default
    ctx.minimum_version = MINIMUM_VERSION
    if ca_file is not None:
        _load_ca(ctx, ca_file)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert_file is not None and key_file is not None:
        _load_chain(ctx, cert_file, key_file)
    ctx.check_hostname = check_hostname
    return ctx
