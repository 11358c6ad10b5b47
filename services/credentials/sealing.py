"""Envelope encryption of credential secrets.

Each credential has its own 256-bit data key. The secret is sealed with it
(AES-256-GCM, the credential id as associated data) and only the sealed form
goes into events. The data key is wrapped by the master key and kept in a
JetStream key-value bucket, outside the immutable log: deleting the entry
makes every sealed copy of the secret in the log unreadable for good.
"""

import base64
import json
import os
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from nats.aio.client import Client as NATS
from nats.js import api
from nats.js.errors import (
    BucketNotFoundError,
    KeyNotFoundError,
    NoKeysError,
    NotFoundError,
)
from nats.js.kv import KeyValue

from contracts.events import SealedSecret
from contracts.subjects import CREDENTIAL_KEYS_BUCKET
from services.credentials.domain import CredentialError

log = structlog.get_logger(__name__)


class SealingError(CredentialError):
    """A secret could not be sealed or opened."""


class DataKeyDestroyedError(SealingError):
    """The credential's data key no longer exists: its secret is gone."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


@dataclass(frozen=True)
class MasterKeyring:
    """Versioned master keys; the highest version wraps new data keys."""

    keys: dict[int, bytes]

    @property
    def active_version(self) -> int:
        return max(self.keys)

    @classmethod
    def load_or_create(cls, path: Path) -> "MasterKeyring":
        """Read the key file, creating it (mode 0600) on first run."""
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            ring = cls({1: AESGCM.generate_key(bit_length=256)})
            ring.save(path)
            log.info("master key created", path=str(path))
            return ring
        raw = json.loads(path.read_text())
        return cls({int(v): _unb64(k) for v, k in raw["keys"].items()})

    def save(self, path: Path) -> None:
        body = json.dumps({"keys": {str(v): _b64(k) for v, k in self.keys.items()}})
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(body)
        os.replace(tmp, path)

    def rotated(self) -> "MasterKeyring":
        new = dict(self.keys)
        new[self.active_version + 1] = AESGCM.generate_key(bit_length=256)
        return MasterKeyring(new)

    def wrap(self, entry: str, data_key: bytes) -> dict[str, str | int]:
        nonce = secrets.token_bytes(12)
        version = self.active_version
        wrapped = AESGCM(self.keys[version]).encrypt(nonce, data_key, entry.encode())
        return {"master_version": version, "nonce": _b64(nonce), "key": _b64(wrapped)}

    def unwrap(self, entry: str, record: dict[str, str | int]) -> bytes:
        version = int(record["master_version"])
        if version not in self.keys:
            raise SealingError(f"master key version {version} is not loaded")
        try:
            return AESGCM(self.keys[version]).decrypt(
                _unb64(str(record["nonce"])),
                _unb64(str(record["key"])),
                entry.encode(),
            )
        except InvalidTag as exc:
            raise SealingError("a data key failed its integrity check") from exc


@dataclass(frozen=True)
class DataKey:
    version: int
    key: bytes


class DataKeyStore:
    """Wrapped data keys in a JetStream key-value bucket, one per credential."""

    def __init__(
        self,
        kv: KeyValue,
        ring: MasterKeyring,
        reload: Callable[[], MasterKeyring] | None = None,
    ) -> None:
        self._kv = kv
        self._ring = ring
        self._reload = reload

    @classmethod
    async def open(
        cls,
        nc: NATS,
        ring: MasterKeyring,
        replicas: int = 1,
        bucket: str = CREDENTIAL_KEYS_BUCKET,
        reload: Callable[[], MasterKeyring] | None = None,
    ) -> "DataKeyStore":
        js = nc.jetstream()
        try:
            kv = await js.key_value(bucket)
        except (BucketNotFoundError, NotFoundError):
            kv = await js.create_key_value(
                api.KeyValueConfig(
                    bucket=bucket,
                    history=1,
                    storage=api.StorageType.FILE,
                    replicas=replicas,
                )
            )
        return cls(kv, ring, reload)

    async def create(self, credential_id: str, version: int) -> DataKey:
        """A fresh data key for one version of the credential's secret."""
        key = AESGCM.generate_key(bit_length=256)
        name = _entry(credential_id, version)
        await self._kv.put(name, json.dumps(self._ring.wrap(name, key)).encode())
        return DataKey(version, key)

    async def get(self, credential_id: str, version: int) -> DataKey:
        name = _entry(credential_id, version)
        try:
            entry = await self._kv.get(name)
        except KeyNotFoundError as exc:
            raise DataKeyDestroyedError(name) from exc
        assert entry.value is not None
        record = json.loads(entry.value)
        if int(record["master_version"]) not in self._ring.keys and self._reload:
            # The master key was rotated since this process loaded it.
            self._ring = self._reload()
        return DataKey(version, self._ring.unwrap(name, record))

    async def destroy(self, credential_id: str, versions: Iterable[int]) -> None:
        """Purge keys and their history: those sealed secrets are gone for good."""
        for version in versions:
            await self._kv.purge(_entry(credential_id, version))

    async def rewrap_all(self, ring: MasterKeyring) -> int:
        """Wrap every live data key under ``ring``'s active master key."""
        try:
            names = await self._kv.keys()
        except (NoKeysError, NotFoundError):
            return 0
        for name in names:
            entry = await self._kv.get(name)
            assert entry.value is not None
            key = self._ring.unwrap(name, json.loads(entry.value))
            await self._kv.put(name, json.dumps(ring.wrap(name, key)).encode())
        self._ring = ring
        return len(names)


def _entry(credential_id: str, version: int) -> str:
    return f"{credential_id}.{version}"


def seal(credential_id: str, key: DataKey, secret: str) -> SealedSecret:
    nonce = secrets.token_bytes(12)
    ciphertext = AESGCM(key.key).encrypt(nonce, secret.encode(), credential_id.encode())
    return SealedSecret(
        key_version=key.version, nonce=_b64(nonce), ciphertext=_b64(ciphertext)
    )


def unseal(credential_id: str, key: DataKey, sealed: SealedSecret) -> str:
    try:
        plain = AESGCM(key.key).decrypt(
            _unb64(sealed.nonce), _unb64(sealed.ciphertext), credential_id.encode()
        )
    except InvalidTag as exc:
        raise SealingError("a sealed secret failed its integrity check") from exc
    return plain.decode()
