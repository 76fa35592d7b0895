"""The key store: issuers' master keys by key version.

Master keys never reach the database, a log or an error message, so the
types here refuse to print their bytes and the loaders name files and
fields, never values. The ``KeyStore`` protocol is all the rest of the code
sees, which leaves room for an HSM that would never hand out key bytes.
"""

from __future__ import annotations

import errno
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
            raise KeyStoreError(f"{role} must be 16 bytes, got {len(material)} bytes")
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


_ENTRY_FIELDS = ("suite", "mtk", "mlk")


def _kind(value: object) -> str:
    """What a value is, never what it says: the wrong place may hold a master key."""
    if isinstance(value, str):
        return f"a string of {len(value)} characters"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    if isinstance(value, dict):
        return f"an object of {len(value)} members"
    return "null" if value is None else type(value).__name__


def _name(key: object, position: int, valid: bool) -> str:
    """A member's name for the path when it is valid; else its position.

    A name that breaks its rule is not shown: a master key pasted where an
    issuer code or key version belongs would otherwise be printed whole.
    """
    return str(key) if valid else f"(member {position})"


def parse_key_document(doc: object, source: str) -> list[KeyVersion]:
    """Key file layout::

    {"issuers": {"3104": {"1": {"suite": "pboc-3des", "mtk": "<32 hex>", "mlk": "<32 hex>"}}}}

    Every refusal names the place (``source`` and the path in the document)
    and the rule; a value is described by its kind and length only.
    """
    if not isinstance(doc, dict):
        raise KeyStoreError(
            f'{source}: must be a JSON object {{"issuers": {{...}}}}, got {_kind(doc)}'
        )
    issuers = doc.get("issuers")
    if not isinstance(issuers, dict):
        got = "missing" if issuers is None else _kind(issuers)
        raise KeyStoreError(f"{source}: issuers must be an object of issuer codes, got {got}")
    out: list[KeyVersion] = []
    for i, (issuer, versions) in enumerate(issuers.items(), 1):
        valid = isinstance(issuer, str) and len(issuer) == 4
        valid = valid and issuer.isascii() and issuer.isdigit()
        at = f"issuers.{_name(issuer, i, valid)}"
        if not valid:
            raise KeyStoreError(
                f"{source}: {at}: an issuer code must be 4 decimal digits, got {_kind(issuer)}"
            )
        if not isinstance(versions, dict):
            raise KeyStoreError(
                f"{source}: {at} must be an object of key versions, got {_kind(versions)}"
            )
        for j, (kv_text, entry) in enumerate(versions.items(), 1):
            valid = isinstance(kv_text, str) and 1 <= len(kv_text) <= 3
            valid = valid and kv_text.isascii() and kv_text.isdigit() and int(kv_text) <= 255
            where = f"{source}: {at}.{_name(kv_text, j, valid)}"
            if not valid:
                raise KeyStoreError(
                    f"{where}: a key version must be a number from 0 to 255, got {_kind(kv_text)}"
                )
            out.append(_key_version(issuer, int(kv_text), entry, where))
    return out


def _key_version(issuer: str, kv: int, entry: object, where: str) -> KeyVersion:
    if not isinstance(entry, dict):
        raise KeyStoreError(
            f"{where} must be an object with {', '.join(_ENTRY_FIELDS)}, got {_kind(entry)}"
        )
    for name in _ENTRY_FIELDS:
        if name not in entry:
            raise KeyStoreError(f"{where}.{name} is missing")
    label = entry["suite"]
    labels = [s.label for s in Suite]
    if not isinstance(label, str) or label not in labels:
        raise KeyStoreError(f"{where}.suite must be one of {', '.join(labels)}, got {_kind(label)}")
    suite = Suite.from_label(label)
    mtk = MasterKey(_unhex(entry["mtk"], f"{where}.mtk"), "MTK")
    mlk = MasterKey(_unhex(entry["mlk"], f"{where}.mlk"), "MLK")
    return KeyVersion(issuer, kv, suite, mtk, mlk)


def _unhex(text: object, where: str) -> bytes:
    """16 key bytes from 32 hex digits (bytes may be spaced, as bytes.fromhex allows)."""
    expected = f"{where} must be 32 hex digits (16 bytes)"
    if not isinstance(text, str):
        raise KeyStoreError(f"{expected}, got {_kind(text)}")
    try:
        material = bytes.fromhex(text)
    except ValueError:
        raise KeyStoreError(f"{expected}, got {_kind(text)} that is not hex") from None
    if len(material) != 16:
        raise KeyStoreError(f"{expected}, got {len(material)} bytes")
    return material


#: What a path is shown as when it looks like key material: a key pasted
#: where a file name goes (ONECARD_KEYS for ONECARD_KEYS_JSON) was quoted
#: whole in the error that said no such file exists.
NOT_A_PATH = (
    "(not shown: it looks like key material, not a file name; card keys given inline "
    "go in ONECARD_KEYS_JSON)"
)


def shown_path(path: str | os.PathLike[str]) -> str:
    """``path`` as errors and logs show it: not at all if it could be a key."""
    text = os.fspath(path)
    stripped = text.strip()
    hexish = len(stripped) >= 32 and all(c in "0123456789abcdefABCDEF" for c in stripped)
    if stripped.startswith(("{", "[", '"')) or "\n" in text or len(text) > 1024 or hexish:
        return NOT_A_PATH
    return text


def read_private_file(path: Path, what: str) -> bytes:
    """The bytes of a secret file that only its owner, this process's user, can read.

    The file is opened once and checked as opened (fstat): a check by name
    followed by a second open let a symlink re-pointed in between (to a
    file others can read) pass. A file another user owns is refused too:
    that user can read it whatever its mode.
    """
    shown = shown_path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KeyStoreError(f"{what} {shown} does not exist") from None
    except OSError as exc:
        raise KeyStoreError(
            f"{what} {shown} cannot be read: {exc.strerror or type(exc).__name__}"
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyStoreError(f"{what} {shown} cannot be read: not a regular file")
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyStoreError(
                f"{what} {shown} is accessible by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {shown}"
            )
        if st.st_uid != os.geteuid():
            raise KeyStoreError(
                f"{what} {shown} belongs to another user (uid {st.st_uid}), who can read it; "
                "it must belong to the user the server runs as"
            )
        with open(fd, "rb", closefd=False) as fh:
            return fh.read()
    except OSError as exc:
        raise KeyStoreError(
            f"{what} {shown} cannot be read: {exc.strerror or type(exc).__name__}"
        ) from None
    finally:
        os.close(fd)


def _open_new_private_file(path: Path, what: str) -> int | None:
    """A descriptor of a new file only its owner can read, open for writing; None if it exists.

    Its directory is made as needed. A directory where it cannot be made (not
    writable, under a regular file) is a KeyStoreError naming the file: the
    bare OSError reached the command as "cannot reach the database or the
    network" and exit 3, which a supervisor takes for an outage to retry.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.parent.is_dir():
            return None
        exc: OSError = NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
    except OSError as error:
        exc = error
    raise KeyStoreError(
        f"{what} {shown_path(path)} cannot be made: {exc.strerror or type(exc).__name__}"
    )


def write_new_private_file(path: Path, what: str, text: str) -> bool:
    """Write ``text`` to a new owner-only file and make it durable; False if it exists.

    The personal-data key's digests go into the database as soon as it is
    made: a key file still in the page cache when the machine loses power
    could come back empty or missing while the digests made with it stay,
    and no registered holder's check would pass again. So the file and its
    directory entry are flushed to disk before the key is used.
    """
    fd = _open_new_private_file(path, what)
    if fd is None:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return True


class FileKeyStore(MemoryKeyStore):
    """Keys from a JSON file only its owner can read; ``reload()`` re-reads it (SIGHUP)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        super().__init__(self._load())

    def _load(self) -> list[KeyVersion]:
        shown = shown_path(self.path)
        text = read_private_file(self.path, "key file")
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise KeyStoreError(f"key file {shown} is not JSON (line {exc.lineno})") from None
        except UnicodeDecodeError as exc:
            # Its own text quotes the offending byte: say only where it is.
            raise KeyStoreError(
                f"key file {shown} is not UTF-8 text (at byte {exc.start})"
            ) from None
        except RecursionError:
            raise KeyStoreError(f"key file {shown} is nested too deeply") from None
        except ValueError:
            # json's int() refuses a number of over 4,300 digits (CPython's
            # guard against quadratic conversion): a traceback at start-up.
            raise KeyStoreError(f"key file {shown} holds a number too long to read") from None
        return parse_key_document(doc, shown)

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
    except RecursionError:
        raise KeyStoreError(f"{ENV_KEYS} is nested too deeply") from None
    except ValueError:  # a number of over 4,300 digits, as in a key file
        raise KeyStoreError(f"{ENV_KEYS} holds a number too long to read") from None
    return MemoryKeyStore(parse_key_document(doc, ENV_KEYS))
