"""TLS helpers: server contexts from settings, and a self-signed pair for one machine."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import ssl
from pathlib import Path
from typing import cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from postbus.kit.settings import write_private


def self_signed(cert_path: Path, key_path: Path, hostname: str = "localhost") -> None:
    """Write a self-signed certificate and key (mode 0600) unless both exist."""
    if cert_path.exists() and key_path.exists():
        return
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Postbus local")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName(hostname), x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    write_private(key_path, key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def server_context(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    """A server SSLContext (TLS 1.2+), or None when no certificate is configured."""
    if not cert or not key:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


async def discard_buffered(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           chunk: int = 256 * 1024) -> int:
    """Before STARTTLS/STLS's handshake (RFC 3207 §4.2, RFC 2595 §4, CVE-2011-0411): stop
    reading the socket and drop what the stream reader already holds, octets that came in
    plaintext after the command; returns how many. The handshake resumes reading
    (``loop.start_tls``)."""
    # a socket's transport reads too (typeshed types StreamWriter.transport as a write
    # transport; uvloop's does not subclass asyncio.Transport, so no isinstance check)
    transport = cast(asyncio.Transport, writer.transport)
    dropped = 0
    while True:
        transport.pause_reading()
        read = asyncio.ensure_future(reader.read(chunk))
        await asyncio.sleep(0)  # one step: a buffered read completes in it
        if not read.done():  # nothing buffered: it waits for the socket, which is paused
            read.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await read
            return dropped
        data = read.result()
        if not data:
            return dropped
        dropped += len(data)  # reading may have resumed the socket: pause, look again
