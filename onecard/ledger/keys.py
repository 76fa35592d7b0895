"""The key store: issuers' master keys by key version.

Master keys never reach the database, a log or an error message, so the
types here refuse to print their bytes and the loaders name files and
fields, never values. The ``KeyStore`` protocol is all the rest of the code
sees, which leaves room for an HSM that would never hand out key bytes.
"""

from __future__ import annotations

import json
import os
import stat
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from onecard.ledger.crypto.suites import Suite


class KeyStoreError(Exception):
    """A key file or variable that cannot be used; the message never holds key bytes."""


class MasterKey:
    """16 bytes of key material that will not show itself.

    ``repr``/``str`` print only the role, so a key that ends up in a log line
    or a traceback's locals leaks nothing.
    """

    __slots__ = ("_material", "role")

    def __init__(self, material: bytes, role: str) -> None:
        if len(material) != 16:
            raise KeyStoreError(f"{role} must be 16 bytes, got {len(material)}")
        self._material = bytes(material)
        self.role = role

    def reveal(self) -> bytes:
        """The key bytes, for the crypto layer only."""
        return self._material

    def __repr__(self) -> str:
        return f"MasterKey({self.role}, <hidden>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        import hmac

        return isinstance(other, MasterKey) and hmac.compare_digest(self._material, other._material)

    def __hash__(self) -> int:
        return hash(self.role)

    def __reduce__(self) -> Any:
        raise TypeError("master keys are not picklable")


@dataclass(frozen=True)
class KeyVersion:
    """One issuer key version: a suite and its two master keys (PROTOCOL.md "Keys")."""

    issuer: str
    kv: int
    suite: Suite
    mtk: MasterKey = field(repr=False)
    mlk: MasterKey = field(repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.kv <= 255:
            raise KeyStoreError(f"key version must be one byte, got {self.kv}")


class KeyStore(Protocol):
    """What the ledger needs from wherever master keys live."""

    def get(self, issuer: str, kv: int) -> KeyVersion | None: ...

    def versions(self) -> Iterable[KeyVersion]: ...

    @property
    def generation(self) -> int:
        """Bumped on every reload so derived-key caches know to drop what they hold."""
        ...


class MemoryKeyStore:
    """A key store over an in-memory set of key versions; the base of the file loader."""

    def __init__(self, versions: Iterable[KeyVersion] = ()) -> None:
        self._lock = threading.Lock()
        self._by_id: dict[tuple[str, int], KeyVersion] = {}
        self._generation = 0
        self.replace(versions)

    def replace(self, versions: Iterable[KeyVersion]) -> None:
        new = {(v.issuer, v.kv): v for v in versions}
        with self._lock:
            self._by_id = new
            self._generation += 1

    def get(self, issuer: str, kv: int) -> KeyVersion | None:
        return self._by_id.get((issuer, kv))

    def versions(self) -> Iterator[KeyVersion]:
        return iter(list(self._by_id.values()))

    @property
    def generation(self) -> int:
        return self._generation

    def __repr__(self) -> str:
        ids = sorted(self._by_id)
        return f"{type(self).__name__}({len(ids)} key versions: {ids})"


def parse_key_document(doc: Mapping[str, Any], source: str) -> list[KeyVersion]:
    """Key file layout::

    {"issuers": {"3104": {"1": {"suite": "pboc-3des", "mtk": "<32 hex>", "mlk": "<32 hex>"}}}}
    """
    issuers = doc.get("issuers")
    if not isinstance(issuers, dict):
        raise KeyStoreError(f"{source}: top-level 'issuers' object missing")
    out: list[KeyVersion] = []
    for issuer, versions in issuers.items():
        if not isinstance(versions, dict):
            raise KeyStoreError(f"{source}: issuers.{issuer} must be an object of key versions")
        for kv_text, entry in versions.items():
            where = f"{source}: issuers.{issuer}.{kv_text}"
            try:
                kv = int(kv_text)
                suite = Suite.from_label(entry["suite"])
                mtk = MasterKey(_unhex(entry["mtk"], f"{where}.mtk"), "MTK")
                mlk = MasterKey(_unhex(entry["mlk"], f"{where}.mlk"), "MLK")
                out.append(KeyVersion(issuer, kv, suite, mtk, mlk))
            except KeyStoreError as exc:
                raise KeyStoreError(f"{where}: {exc}") from None
            except (KeyError, TypeError, ValueError) as exc:
                # ValueError text from int()/Suite never includes key bytes.
                raise KeyStoreError(f"{where}: {type(exc).__name__}: {exc}") from None
    return out


def _unhex(text: object, where: str) -> bytes:
    if not isinstance(text, str):
        raise KeyStoreError(f"{where} must be a hex string")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise KeyStoreError(f"{where} is not valid hex") from None


def check_private(path: Path) -> None:
    """Refuse a key file that users other than its owner can read or write."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyStoreError(
            f"key file {path} is accessible by group or others (mode {stat.S_IMODE(mode):04o}); "
            f"run: chmod 600 {path}"
        )


class FileKeyStore(MemoryKeyStore):
    """Keys from a JSON file only its owner can read; ``reload()`` re-reads it (SIGHUP)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        super().__init__(self._load())

    def _load(self) -> list[KeyVersion]:
        try:
            check_private(self.path)
            with self.path.open("rb") as fh:
                doc = json.load(fh)
        except FileNotFoundError:
            raise KeyStoreError(f"key file {self.path} does not exist") from None
        except json.JSONDecodeError as exc:
            raise KeyStoreError(f"key file {self.path} is not JSON (line {exc.lineno})") from None
        return parse_key_document(doc, str(self.path))

    def reload(self) -> None:
        """Swap in the file's current versions; on error the old set stays in force."""
        self.replace(self._load())


ENV_KEYS = "ONECARD_KEYS_JSON"


def key_store_from_env(environ: Mapping[str, str] | None = None) -> MemoryKeyStore | None:
    """Keys given inline as JSON in ``ONECARD_KEYS_JSON`` (containers, CI secrets)."""
    env = os.environ if environ is None else environ
    text = env.get(ENV_KEYS)
    if not text:
        return None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise KeyStoreError(f"{ENV_KEYS} is not JSON (column {exc.colno})") from None
    return MemoryKeyStore(parse_key_document(doc, ENV_KEYS))
