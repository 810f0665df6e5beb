"""C2PA manifests: a signed claim inside each PNG that darkroom generated it, with which model and parameters.

Optional: used only when c2pa-python is installed (`pip install 'darkroom[c2pa]'`; its wheel is about 50 MB) and
`security.c2pa` is on. Everything here works offline: no timestamp authority, no OCSP, no remote manifests.

Signing identity: `<data dir>/c2pa/` holds `chain.pem` (signing certificate, then its issuer), `key.pem` and `ca.pem`.
On first use darkroom makes them itself: an ES256 root CA and a signing certificate issued by it (C2PA refuses
self-signed signing certificates). Readers that don't trust that root still validate the manifest, but report the
signer as untrusted; `darkroom verify` trusts the root in its data dir. To sign with a certificate from a real CA,
replace the three files (same names, PEM) before starting workers.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import io
import json
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from darkroom import __version__

log = logging.getLogger(__name__)

GENERATION_LABEL = "org.darkroom.generation"
TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
MIME_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
_OFFLINE = {"verify": {"remote_manifest_fetch": False, "ocsp_fetch": False}}
_VALIDITY = dt.timedelta(days=3650)


@dataclass(frozen=True)
class Identity:
    """PEM text: the signing chain (leaf first), its private key, and the root to trust when verifying."""

    chain_pem: bytes
    key_pem: bytes
    ca_pem: bytes


def available() -> bool:
    return importlib.util.find_spec("c2pa") is not None


@lru_cache(maxsize=8)
def load_identity(folder: Path) -> Identity:
    """The identity in `folder`, made on first use. Workers sharing a data dir race safely: one rename wins."""
    if not (folder / "key.pem").exists():
        _create_identity(folder)
    return Identity(*((folder / name).read_bytes() for name in ("chain.pem", "key.pem", "ca.pem")))


def trust_anchor(folder: Path) -> bytes | None:
    """The root CA that `darkroom verify` trusts, when this data dir has one."""
    path = folder / "ca.pem"
    return path.read_bytes() if path.is_file() else None


def sign_png(png: bytes, provenance: dict[str, Any], identity: Identity) -> bytes:
    """`png` with a C2PA manifest embedded: a `c2pa.created` action and the full darkroom provenance as an assertion."""
    import c2pa

    signer, context = _signing(identity)
    builder = c2pa.Builder(_manifest(provenance), context=context)
    out = io.BytesIO()
    builder.sign(signer, "image/png", io.BytesIO(png), out)
    return out.getvalue()


_per_thread = threading.local()


def _signing(identity: Identity) -> tuple[Any, Any]:
    """This thread's signer and context for `identity`: parsing the key and building them was a quarter of each
    image's signing time (measured: 3.9 → 2.9 ms CPU at 64²). Native objects, so one set per post-processing thread
    rather than shared between threads."""
    import c2pa

    cached = getattr(_per_thread, "signing", None)
    if cached is None or cached[0] is not identity:
        settings = c2pa.Settings.from_dict({**_OFFLINE, "builder": {"thumbnail": {"enabled": False}}})
        info = c2pa.C2paSignerInfo(c2pa.C2paSigningAlg.ES256, identity.chain_pem, identity.key_pem, None)
        cached = _per_thread.signing = (identity, c2pa.Signer.from_info(info), c2pa.Context(settings=settings))
    return cached[1], cached[2]


def read_manifest(data: bytes, image_format: str, trust_anchors: bytes | None = None) -> dict[str, Any] | None:
    """The active manifest, judged: None when the file has none. `Trusted` needs a chain to `trust_anchors`."""
    import c2pa

    mime = MIME_TYPES.get(image_format)
    if mime is None:
        return None
    config: dict[str, Any] = dict(_OFFLINE)
    if trust_anchors:
        config["trust"] = {"trust_anchors": trust_anchors.decode()}
    context = c2pa.Context(settings=c2pa.Settings.from_dict(config))
    try:
        reader = c2pa.Reader.try_create(mime, io.BytesIO(data), context=context)
    except c2pa.C2paError as exc:  # a manifest is there but can't be parsed: as good as forged
        return {**dict.fromkeys(_SUMMARY_KEYS), "validation_state": "Invalid", "failures": [str(exc)]}
    if reader is None:
        return None
    with reader:
        return _summarise(reader.get_active_manifest() or {}, reader)


_SUMMARY_KEYS = ("validation_state", "failures", "signer", "issuer", "generator", "digital_source_type", "generation")


def _summarise(manifest: dict[str, Any], reader: Any) -> dict[str, Any]:
    results = (reader.get_validation_results() or {}).get("activeManifest", {})
    assertions = {a["label"]: a.get("data") for a in manifest.get("assertions", [])}
    actions = (assertions.get("c2pa.actions.v2") or assertions.get("c2pa.actions") or {}).get("actions", [])
    created: dict[str, Any] = next((a for a in actions if a.get("action") == "c2pa.created"), {})
    generator = manifest.get("claim_generator_info") or [{}]
    return {
        "validation_state": reader.get_validation_state(),
        "failures": [f["code"] for f in results.get("failure", [])],
        "signer": manifest.get("signature_info", {}).get("common_name"),
        "issuer": manifest.get("signature_info", {}).get("issuer"),
        "generator": f"{generator[0].get('name', '')} {generator[0].get('version', '')}".strip(),
        "digital_source_type": created.get("digitalSourceType"),
        "generation": assertions.get(GENERATION_LABEL),
    }


def _manifest(provenance: dict[str, Any]) -> dict[str, Any]:
    agent = {"name": "darkroom", "version": __version__}
    created = {"action": "c2pa.created", "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA, "softwareAgent": agent}
    return {
        "claim_generator_info": [agent],
        "title": f"darkroom {provenance.get('job_id', 'image')}",
        "format": "image/png",
        "assertions": [
            {"label": "c2pa.actions", "data": {"actions": [created]}},
            {"label": GENERATION_LABEL, "data": json.loads(json.dumps(provenance))},
        ],
    }


def _create_identity(folder: Path) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".c2pa-", dir=folder.parent))
    try:
        for name, pem in zip(("chain.pem", "key.pem", "ca.pem"), _new_identity(), strict=True):
            (staging / name).write_bytes(pem)
        (staging / "key.pem").chmod(0o600)
        os.rename(staging, folder)
        log.info("made a C2PA signing identity in %s", folder)
    except OSError:
        if not (folder / "key.pem").exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _new_identity() -> tuple[bytes, bytes, bytes]:
    """A root CA and an ES256 leaf it issued, with the key usages C2PA validators require."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("darkroom provenance root", ca_key, ca_key, None, is_ca=True)
    leaf = _certificate("darkroom", key, ca_key, ca, is_ca=False)
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return leaf.public_bytes(pem) + ca.public_bytes(pem), key_pem, ca.public_bytes(pem)


def _certificate(common_name: str, key: Any, issuer_key: Any, issuer: Any, *, is_ca: bool) -> Any:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "darkroom"),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    usage = {k: False for k in ("content_commitment", "key_encipherment", "data_encipherment", "key_agreement")}
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer is not None else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=0 if is_ca else None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not is_ca,
                key_cert_sign=is_ca,
                crl_sign=is_ca,
                encipher_only=False,
                decipher_only=False,
                **usage,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if not is_ca:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False
        ).add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())
