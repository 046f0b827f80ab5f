"""C2PA Content Credentials: a local signing identity, signing a PNG, reading a manifest back.

C2PA validators refuse a self-signed signing certificate, so offline signing needs a small chain: on first
use :func:`signing_identity` makes a local certificate authority (ECDSA P-256, CA=true) and a leaf it issues
(CA=false, KeyUsage digitalSignature, ExtendedKeyUsage emailProtection, subject and authority key
identifiers), and signs with ES256. They live in :func:`home` ``/c2pa/`` (``ca.pem``, ``cert.pem`` = leaf +
CA chain, ``key.pem``, mode 0600). A user's own identity: ``REVERIE_C2PA_CERT`` (PEM chain, leaf first) and
``REVERIE_C2PA_KEY`` (PEM private key), ES256 unless ``REVERIE_C2PA_ALG`` names another C2PA algorithm.

The manifest (:func:`manifest_for`) holds a ``c2pa.created`` action whose ``digitalSourceType`` is IPTC's
``trainedAlgorithmicMedia``, with the model name, model hash and generation parameters, and a
``org.reverie.generation`` assertion with the SHA-256 of the decoded pixels (so ``reverie verify`` can say
whether the pixels still match even when the file bytes changed, e.g. after a lossless re-save). The
thumbnail C2PA adds by default is off: it would make a 32 px PNG 60x larger.
"""

from __future__ import annotations

import datetime
import io
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
GENERATION_LABEL = "org.reverie.generation"
CERT_DAYS = 3650


def home() -> Path:
    """Where reverie keeps its keys: ``$REVERIE_HOME``, else ``$XDG_CONFIG_HOME/reverie`` (``~/.config/reverie``).
    A config folder, not a cache: losing the watermark key would make earlier images undetectable."""
    if os.environ.get("REVERIE_HOME"):
        return Path(os.environ["REVERIE_HOME"])
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "reverie"


def c2pa_module():
    """The ``c2pa`` module, or None when c2pa-python is not installed (images are then saved unsigned)."""
    try:
        import c2pa
    except ImportError:
        return None
    return c2pa


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` readable by the owner only, atomically (a concurrent first use sees a whole file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "reverie (local)")])


def _key_usage(sign: bool):
    from cryptography import x509

    return x509.KeyUsage(digital_signature=sign, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=not sign, crl_sign=not sign,
                         encipher_only=False, decipher_only=False)


def make_local_ca(folder: Path) -> None:
    """A local CA and a leaf signing certificate it issues (see the module docstring), written to ``folder``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(days=1), now + datetime.timedelta(days=CERT_DAYS)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("reverie local CA")).issuer_name(_name("reverie local CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(_key_usage(sign=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(_name("reverie image signer")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(sign=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    write_private(folder / "key.pem", key_pem)
    write_private(folder / "cert.pem", leaf.public_bytes(pem) + ca.public_bytes(pem))
    write_private(folder / "ca.pem", ca.public_bytes(pem))  # last: its presence marks a complete identity


@dataclass(frozen=True)
class Identity:
    """A signing certificate chain (PEM, leaf first), its private key, the algorithm, and the trust anchor
    (PEM) that validates it: the local CA, or the user's own chain's last certificate."""

    chain: bytes
    key: bytes
    alg: str
    anchor: bytes
    source: str


def signing_identity() -> Identity:
    """The user's own identity (``REVERIE_C2PA_CERT`` / ``REVERIE_C2PA_KEY``) or the local one, made on first use."""
    cert, key = os.environ.get("REVERIE_C2PA_CERT"), os.environ.get("REVERIE_C2PA_KEY")
    if cert or key:
        if not (cert and key):
            raise ValueError("set both REVERIE_C2PA_CERT (PEM certificate chain) and REVERIE_C2PA_KEY (PEM key)")
        chain = _read(Path(cert), "REVERIE_C2PA_CERT")
        anchor = chain[chain.rfind(b"-----BEGIN CERTIFICATE-----"):]
        return Identity(chain, _read(Path(key), "REVERIE_C2PA_KEY"), os.environ.get("REVERIE_C2PA_ALG", "es256"),
                        anchor, cert)
    folder = home() / "c2pa"
    if not (folder / "ca.pem").is_file():
        make_local_ca(folder)
    return Identity((folder / "cert.pem").read_bytes(), (folder / "key.pem").read_bytes(), "es256",
                    (folder / "ca.pem").read_bytes(), str(folder))


def _read(path: Path, what: str) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} not found")
    return path.read_bytes()


@lru_cache(maxsize=4)
def _signer(identity: Identity):
    c2pa = c2pa_module()
    try:
        return c2pa.Signer.from_info(c2pa.C2paSignerInfo(identity.alg.encode(), identity.chain, identity.key, None))
    except c2pa.C2paError as e:
        raise ValueError(f"cannot sign with the certificate from {identity.source}: {e}") from None


def manifest_for(params: dict, pixel_sha256: str, title: str, fmt: str = "image/png",
                 content_key: str = "pixels_sha256") -> dict:
    """The C2PA manifest of a generated image (see the module docstring); ``fmt`` / ``content_key``: another
    media type and the name of its content hash (a WAV's ``audio_sha256``, ``reverie.provenance.wav``)."""
    __version__ = _version()
    model = {"model": params.get("model"), "model_hash": params.get("model_hash")}
    return {
        "claim_generator_info": [{"name": "reverie", "version": __version__}],
        "title": title,
        "format": fmt,
        "assertions": [
            {"label": "c2pa.actions", "data": {"actions": [{
                "action": "c2pa.created", "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
                "softwareAgent": {"name": "reverie", "version": __version__},
                "parameters": {**model, "generation": params}}]}},
            {"label": GENERATION_LABEL, "data": {**model, "parameters": params, content_key: pixel_sha256}},
        ],
    }


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("reverie")
    except PackageNotFoundError:
        return "unknown"


def sign_png(data: bytes, manifest: dict, mime: str = "image/png") -> bytes:
    """``data`` (a PNG file's bytes, or a file of another ``mime`` type c2pa reads, e.g. ``audio/wav``) with
    ``manifest`` signed and embedded; its other chunks are kept."""
    c2pa = c2pa_module()
    identity = signing_identity()
    context = c2pa.Context(c2pa.Settings.from_dict({"builder": {"thumbnail": {"enabled": False}}}))
    out = io.BytesIO()
    c2pa.Builder(manifest, context=context).sign(_signer(identity), mime, io.BytesIO(data), out)
    return out.getvalue()


@dataclass
class Credentials:
    """What a file's C2PA manifest says: ``state`` is None (no manifest), ``"Invalid"``, ``"Valid"`` (signature and
    data hash check) or ``"Trusted"`` (and the signer chains to a trust anchor); ``problems`` lists the failed
    validation codes; ``manifest`` is the active manifest (a dict) and ``why`` explains a missing one."""

    state: str | None
    manifest: dict | None = None
    problems: list | None = None
    why: str = ""

    def assertion(self, label: str) -> dict | None:
        for item in (self.manifest or {}).get("assertions", []):
            if item.get("label") == label:
                return item.get("data")
        return None


def read_credentials(data: bytes, anchors: bytes | None = None, mime: str = "image/png") -> Credentials:
    """Validate the C2PA manifest embedded in PNG ``data`` against ``anchors`` (PEM trust anchors; default:
    the signing identity's own CA, so files signed here read as Trusted)."""
    c2pa = c2pa_module()
    if c2pa is None:
        return Credentials(None, why='c2pa-python is not installed (pip install "reverie[provenance]"), so the '
                                     'C2PA manifest cannot be read')
    if anchors is None:
        anchors = signing_identity().anchor
    settings = {"trust": {"trust_anchors": anchors.decode()}, "verify": {"verify_trust": True}}
    try:
        reader = c2pa.Reader(mime, io.BytesIO(data), context=c2pa.Context(c2pa.Settings.from_dict(settings)))
    except c2pa.C2paError as e:
        text = str(e)
        if "ManifestNotFound" in type(e).__name__ or "ManifestNotFound" in text:
            return Credentials(None, why="the file carries no C2PA manifest (stripped, or never signed)")
        return Credentials("Invalid", problems=[text], why=f"the C2PA data cannot be read: {text}")
    results = reader.get_validation_results() or {}
    failures = (results.get("activeManifest") or {}).get("failure", [])
    return Credentials(reader.get_validation_state(), reader.get_active_manifest(),
                       [f"{f.get('code')}: {f.get('explanation', '')}" for f in failures])

