"""`chatterd gencert`: a self-signed certificate that Android and iOS accept as a user CA.

The phones install it as a certificate authority and then trust chatterd's HTTPS, so it
is both: a CA (basicConstraints CA:TRUE) and a server certificate for the server's IP
(subjectAltName, extendedKeyUsage serverAuth), valid for about a year (iOS refuses
server certificates valid for longer than 825 days).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 365


def make_certificate(
    ips: list[str], names: list[str], days: int = VALID_DAYS
) -> tuple[bytes, bytes]:
    """A PEM certificate and its PEM private key for these IP addresses and DNS names."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else ips[0]),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "chatterd"),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    alt_names = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    alt_names += [x509.DNSName(name) for name in names]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=True,
                key_cert_sign=True,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


def gencert(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="chatterd gencert",
        description="Write a self-signed certificate and key for chatterd's HTTPS.",
    )
    parser.add_argument(
        "--ip", action="append", required=True, help="the server's IP address (repeat for several)"
    )
    parser.add_argument(
        "--dns", action="append", default=[], help="a DNS name of the server (repeat for several)"
    )
    parser.add_argument(
        "--cert",
        type=Path,
        default=Path("chatterd.crt"),
        help="where to write the certificate (default: chatterd.crt)",
    )
    parser.add_argument(
        "--key",
        type=Path,
        default=Path("chatterd.key"),
        help="where to write the private key (default: chatterd.key)",
    )
    parser.add_argument(
        "--days", type=int, default=VALID_DAYS, help=f"validity in days (default: {VALID_DAYS})"
    )
    args = parser.parse_args(argv)
    try:
        for ip in args.ip:
            ipaddress.ip_address(ip)
    except ValueError as exc:
        parser.error(str(exc))
    certificate, key = make_certificate(args.ip, args.dns, args.days)
    args.cert.write_bytes(certificate)
    # The key is written readable by its owner only.
    descriptor = os.open(args.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as key_file:
        key_file.write(key)
    print(f"wrote {args.cert} and {args.key}", file=sys.stderr)
