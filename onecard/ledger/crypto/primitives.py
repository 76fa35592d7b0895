"""Pure-Python block ciphers and MACs for the reference twin (PROTOCOL.md, "MAC functions").

Nothing here touches OpenSSL or the ``cryptography`` package: the point of
this module is to be an independent implementation that the OpenSSL-based
fast path is tested against, so a bug in one is unlikely to be mirrored in
the other. Only the encryption direction is exposed (DES decryption exists
internally because 3DES-EDE needs it for its middle step).

Tables are computed once at import time and key schedules are cached, so
the code stays readable without being needlessly slow.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

__all__ = [
    "aes128_encrypt_block",
    "aes_cmac",
    "cbc_mac",
    "des_encrypt_block",
    "pad80",
    "sm4_encrypt_block",
    "tdes_ecb_encrypt",
    "tdes_encrypt_block",
    "xor_bytes",
]

BlockEncrypt = Callable[[bytes], bytes]

_SCHEDULE_CACHE = 1024


def xor_bytes(a: bytes, b: bytes) -> bytes:
    """Byte-wise XOR of two equal-length strings (used for CBC chaining and key folding)."""
    if len(a) != len(b):
        raise ValueError(f"xor of unequal lengths {len(a)} and {len(b)}")
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def _check_len(data: bytes, n: int, what: str) -> None:
    if len(data) != n:
        raise ValueError(f"{what} must be {n} bytes, got {len(data)}")


# --------------------------------------------------------------------------- DES (FIPS 46-3)

_IP = (
    58, 50, 42, 34, 26, 18, 10, 2, 60, 52, 44, 36, 28, 20, 12, 4,
    62, 54, 46, 38, 30, 22, 14, 6, 64, 56, 48, 40, 32, 24, 16, 8,
    57, 49, 41, 33, 25, 17, 9, 1, 59, 51, 43, 35, 27, 19, 11, 3,
    61, 53, 45, 37, 29, 21, 13, 5, 63, 55, 47, 39, 31, 23, 15, 7,
)  # fmt: skip
_FP = tuple(_IP.index(i) + 1 for i in range(1, 65))
_PC1 = (
    57, 49, 41, 33, 25, 17, 9, 1, 58, 50, 42, 34, 26, 18,
    10, 2, 59, 51, 43, 35, 27, 19, 11, 3, 60, 52, 44, 36,
    63, 55, 47, 39, 31, 23, 15, 7, 62, 54, 46, 38, 30, 22,
    14, 6, 61, 53, 45, 37, 29, 21, 13, 5, 28, 20, 12, 4,
)  # fmt: skip
_PC2 = (
    14, 17, 11, 24, 1, 5, 3, 28, 15, 6, 21, 10,
    23, 19, 12, 4, 26, 8, 16, 7, 27, 20, 13, 2,
    41, 52, 31, 37, 47, 55, 30, 40, 51, 45, 33, 48,
    44, 49, 39, 56, 34, 53, 46, 42, 50, 36, 29, 32,
)  # fmt: skip
_SHIFTS = (1, 1, 2, 2, 2, 2, 2, 2, 1, 2, 2, 2, 2, 2, 2, 1)
_P = (
    16, 7, 20, 21, 29, 12, 28, 17, 1, 15, 23, 26, 5, 18, 31, 10,
    2, 8, 24, 14, 32, 27, 3, 9, 19, 13, 30, 6, 22, 11, 4, 25,
)  # fmt: skip
_SBOXES = (
    (
        14, 4, 13, 1, 2, 15, 11, 8, 3, 10, 6, 12, 5, 9, 0, 7,
        0, 15, 7, 4, 14, 2, 13, 1, 10, 6, 12, 11, 9, 5, 3, 8,
        4, 1, 14, 8, 13, 6, 2, 11, 15, 12, 9, 7, 3, 10, 5, 0,
        15, 12, 8, 2, 4, 9, 1, 7, 5, 11, 3, 14, 10, 0, 6, 13,
    ),
    (
        15, 1, 8, 14, 6, 11, 3, 4, 9, 7, 2, 13, 12, 0, 5, 10,
        3, 13, 4, 7, 15, 2, 8, 14, 12, 0, 1, 10, 6, 9, 11, 5,
        0, 14, 7, 11, 10, 4, 13, 1, 5, 8, 12, 6, 9, 3, 2, 15,
        13, 8, 10, 1, 3, 15, 4, 2, 11, 6, 7, 12, 0, 5, 14, 9,
    ),
    (
        10, 0, 9, 14, 6, 3, 15, 5, 1, 13, 12, 7, 11, 4, 2, 8,
        13, 7, 0, 9, 3, 4, 6, 10, 2, 8, 5, 14, 12, 11, 15, 1,
        13, 6, 4, 9, 8, 15, 3, 0, 11, 1, 2, 12, 5, 10, 14, 7,
        1, 10, 13, 0, 6, 9, 8, 7, 4, 15, 14, 3, 11, 5, 2, 12,
    ),
    (
        7, 13, 14, 3, 0, 6, 9, 10, 1, 2, 8, 5, 11, 12, 4, 15,
        13, 8, 11, 5, 6, 15, 0, 3, 4, 7, 2, 12, 1, 10, 14, 9,
        10, 6, 9, 0, 12, 11, 7, 13, 15, 1, 3, 14, 5, 2, 8, 4,
        3, 15, 0, 6, 10, 1, 13, 8, 9, 4, 5, 11, 12, 7, 2, 14,
    ),
    (
        2, 12, 4, 1, 7, 10, 11, 6, 8, 5, 3, 15, 13, 0, 14, 9,
        14, 11, 2, 12, 4, 7, 13, 1, 5, 0, 15, 10, 3, 9, 8, 6,
        4, 2, 1, 11, 10, 13, 7, 8, 15, 9, 12, 5, 6, 3, 0, 14,
        11, 8, 12, 7, 1, 14, 2, 13, 6, 15, 0, 9, 10, 4, 5, 3,
    ),
    (
        12, 1, 10, 15, 9, 2, 6, 8, 0, 13, 3, 4, 14, 7, 5, 11,
        10, 15, 4, 2, 7, 12, 9, 5, 6, 1, 13, 14, 0, 11, 3, 8,
        9, 14, 15, 5, 2, 8, 12, 3, 7, 0, 4, 10, 1, 13, 11, 6,
        4, 3, 2, 12, 9, 5, 15, 10, 11, 14, 1, 7, 6, 0, 8, 13,
    ),
    (
        4, 11, 2, 14, 15, 0, 8, 13, 3, 12, 9, 7, 5, 10, 6, 1,
        13, 0, 11, 7, 4, 9, 1, 10, 14, 3, 5, 12, 2, 15, 8, 6,
        1, 4, 11, 13, 12, 3, 7, 14, 10, 15, 6, 8, 0, 5, 9, 2,
        6, 11, 13, 8, 1, 4, 10, 7, 9, 5, 0, 15, 14, 2, 3, 12,
    ),
    (
        13, 2, 8, 4, 6, 15, 11, 1, 10, 9, 3, 14, 5, 0, 12, 7,
        1, 15, 13, 8, 10, 3, 7, 4, 12, 5, 6, 11, 0, 14, 9, 2,
        7, 11, 4, 1, 9, 12, 14, 2, 0, 6, 10, 13, 15, 3, 5, 8,
        2, 1, 14, 7, 4, 10, 8, 13, 15, 12, 9, 0, 3, 5, 6, 11,
    ),
)  # fmt: skip


def _permute(value: int, table: Sequence[int], in_bits: int) -> int:
    """Bit permutation in FIPS 46 notation: output bit i (from the MSB) is input bit table[i]."""
    out = 0
    for src in table:
        out = (out << 1) | ((value >> (in_bits - src)) & 1)
    return out


def _byte_tables(table: Sequence[int], in_bits: int) -> tuple[tuple[int, ...], ...]:
    """Per-input-byte lookup tables: a 64-bit permutation costs 8 lookups, not 64 shifts."""
    nbytes = in_bits // 8
    out: list[tuple[int, ...]] = []
    for j in range(nbytes):
        shift = (nbytes - 1 - j) * 8
        out.append(tuple(_permute(v << shift, table, in_bits) for v in range(256)))
    return tuple(out)


_IP_TABLES = _byte_tables(_IP, 64)
_FP_TABLES = _byte_tables(_FP, 64)


def _permute64(value: int, tables: tuple[tuple[int, ...], ...]) -> int:
    out = 0
    for j in range(8):
        out |= tables[j][(value >> (56 - 8 * j)) & 0xFF]
    return out


def _make_sp() -> tuple[tuple[int, ...], ...]:
    """S-box i combined with the P permutation, indexed by the 6-bit S-box input."""
    sp: list[tuple[int, ...]] = []
    for i, box in enumerate(_SBOXES):
        row_vals: list[int] = []
        for six in range(64):
            row = ((six >> 4) & 2) | (six & 1)
            col = (six >> 1) & 0xF
            row_vals.append(_permute(box[row * 16 + col] << (28 - 4 * i), _P, 32))
        sp.append(tuple(row_vals))
    return tuple(sp)


_SP = _make_sp()


@functools.lru_cache(maxsize=_SCHEDULE_CACHE)
def _des_schedule(key: bytes) -> tuple[tuple[int, ...], ...]:
    """16 round keys, each split into the eight 6-bit chunks that meet the S-boxes.

    Parity bits are ignored, as every DES implementation does.
    """
    _check_len(key, 8, "DES key")
    cd = _permute(int.from_bytes(key, "big"), _PC1, 64)
    c, d = cd >> 28, cd & 0xFFFFFFF
    rounds: list[tuple[int, ...]] = []
    for s in _SHIFTS:
        c = ((c << s) | (c >> (28 - s))) & 0xFFFFFFF
        d = ((d << s) | (d >> (28 - s))) & 0xFFFFFFF
        k = _permute((c << 28) | d, _PC2, 56)
        rounds.append(tuple((k >> (42 - 6 * i)) & 0x3F for i in range(8)))
    return tuple(rounds)


def _des_crypt(block: bytes, schedule: Sequence[tuple[int, ...]]) -> bytes:
    _check_len(block, 8, "DES block")
    v = _permute64(int.from_bytes(block, "big"), _IP_TABLES)
    left, right = v >> 32, v & 0xFFFFFFFF
    sp0, sp1, sp2, sp3, sp4, sp5, sp6, sp7 = _SP
    for k in schedule:
        # Expansion E: bit 32, bits 1..32, bit 1 laid out as a 34-bit word; chunk i starts at 4i.
        x = ((right & 1) << 33) | (right << 1) | (right >> 31)
        f = (
            sp0[((x >> 28) & 0x3F) ^ k[0]]
            | sp1[((x >> 24) & 0x3F) ^ k[1]]
            | sp2[((x >> 20) & 0x3F) ^ k[2]]
            | sp3[((x >> 16) & 0x3F) ^ k[3]]
            | sp4[((x >> 12) & 0x3F) ^ k[4]]
            | sp5[((x >> 8) & 0x3F) ^ k[5]]
            | sp6[((x >> 4) & 0x3F) ^ k[6]]
            | sp7[(x & 0x3F) ^ k[7]]
        )
        left, right = right, left ^ f
    return _permute64((right << 32) | left, _FP_TABLES).to_bytes(8, "big")


def des_encrypt_block(key: bytes, block: bytes) -> bytes:
    """Single DES of one 8-byte block: the PBOC MAC and the 8-byte session-key MAC use it."""
    return _des_crypt(block, _des_schedule(bytes(key)))


def _des_decrypt_block(key: bytes, block: bytes) -> bytes:
    """Only the middle step of 3DES-EDE needs it."""
    return _des_crypt(block, _des_schedule(bytes(key))[::-1])


def tdes_encrypt_block(key: bytes, block: bytes) -> bytes:
    """3DES-EDE of one block; a 16-byte key is two-key 3DES (K3 = K1), a 24-byte key three-key.

    PBOC card keys and the load session key both come from two-key 3DES with a
    16-byte key; note that with K1 == K2 this degenerates to single DES.
    """
    if len(key) == 16:
        k1, k2, k3 = key[:8], key[8:], key[:8]
    elif len(key) == 24:
        k1, k2, k3 = key[:8], key[8:16], key[16:]
    else:
        raise ValueError(f"3DES key must be 16 or 24 bytes, got {len(key)}")
    return des_encrypt_block(k3, _des_decrypt_block(k2, des_encrypt_block(k1, block)))


def tdes_ecb_encrypt(key: bytes, data: bytes) -> bytes:
    """3DES-EDE in ECB mode over whole 8-byte blocks (no padding)."""
    if len(data) % 8:
        raise ValueError(f"ECB input must be whole 8-byte blocks, got {len(data)} bytes")
    return b"".join(tdes_encrypt_block(key, data[i : i + 8]) for i in range(0, len(data), 8))


# --------------------------------------------------------------------------- AES-128 (FIPS 197)


def _gf_mul(a: int, b: int) -> int:
    """Multiplication in GF(2^8) modulo x^8 + x^4 + x^3 + x + 1."""
    p = 0
    while b:
        if b & 1:
            p ^= a
        a = ((a << 1) ^ 0x11B) if a & 0x80 else (a << 1)
        b >>= 1
    return p


def _make_aes_sbox() -> tuple[int, ...]:
    """Computed from its definition (inverse then affine map) rather than typed in."""
    box: list[int] = []
    for a in range(256):
        inv = 0
        if a:
            inv = 1
            for _ in range(254):  # a^254 == a^-1 in GF(2^8)
                inv = _gf_mul(inv, a)
        s = inv
        for r in range(1, 5):
            s ^= ((inv << r) | (inv >> (8 - r))) & 0xFF
        box.append(s ^ 0x63)
    return tuple(box)


_AES_SBOX = _make_aes_sbox()


def _ror32(x: int, n: int) -> int:
    return ((x >> n) | (x << (32 - n))) & 0xFFFFFFFF


_TE0 = tuple((_gf_mul(s, 2) << 24) | (s << 16) | (s << 8) | _gf_mul(s, 3) for s in _AES_SBOX)
_TE1 = tuple(_ror32(t, 8) for t in _TE0)
_TE2 = tuple(_ror32(t, 16) for t in _TE0)
_TE3 = tuple(_ror32(t, 24) for t in _TE0)


@functools.lru_cache(maxsize=_SCHEDULE_CACHE)
def _aes128_schedule(key: bytes) -> tuple[int, ...]:
    """The 44 round-key words of AES-128."""
    _check_len(key, 16, "AES-128 key")
    w = [int.from_bytes(key[i : i + 4], "big") for i in range(0, 16, 4)]
    rcon = 1
    sb = _AES_SBOX
    for i in range(4, 44):
        t = w[i - 1]
        if i % 4 == 0:
            t = (
                (sb[(t >> 16) & 0xFF] << 24)
                | (sb[(t >> 8) & 0xFF] << 16)
                | (sb[t & 0xFF] << 8)
                | sb[t >> 24]
            ) ^ (rcon << 24)
            rcon = _gf_mul(rcon, 2)
        w.append(w[i - 4] ^ t)
    return tuple(w)


def aes128_encrypt_block(key: bytes, block: bytes) -> bytes:
    """AES-128 of one 16-byte block (T-table form): AES card keys, SESLK and CMAC use it."""
    _check_len(block, 16, "AES block")
    rk = _aes128_schedule(bytes(key))
    s0, s1, s2, s3 = (int.from_bytes(block[i : i + 4], "big") ^ rk[i // 4] for i in (0, 4, 8, 12))
    t0, t1, t2, t3 = _TE0, _TE1, _TE2, _TE3
    for r in range(1, 10):
        k = 4 * r
        s0, s1, s2, s3 = (
            t0[s0 >> 24] ^ t1[(s1 >> 16) & 0xFF] ^ t2[(s2 >> 8) & 0xFF] ^ t3[s3 & 0xFF] ^ rk[k],
            t0[s1 >> 24] ^ t1[(s2 >> 16) & 0xFF] ^ t2[(s3 >> 8) & 0xFF] ^ t3[s0 & 0xFF] ^ rk[k + 1],
            t0[s2 >> 24] ^ t1[(s3 >> 16) & 0xFF] ^ t2[(s0 >> 8) & 0xFF] ^ t3[s1 & 0xFF] ^ rk[k + 2],
            t0[s3 >> 24] ^ t1[(s0 >> 16) & 0xFF] ^ t2[(s1 >> 8) & 0xFF] ^ t3[s2 & 0xFF] ^ rk[k + 3],
        )
    sb = _AES_SBOX
    out = bytearray(16)
    cols = (s0, s1, s2, s3)
    for c in range(4):
        w = (
            (sb[cols[c] >> 24] << 24)
            | (sb[(cols[(c + 1) % 4] >> 16) & 0xFF] << 16)
            | (sb[(cols[(c + 2) % 4] >> 8) & 0xFF] << 8)
            | sb[cols[(c + 3) % 4] & 0xFF]
        ) ^ rk[40 + c]
        out[4 * c : 4 * c + 4] = w.to_bytes(4, "big")
    return bytes(out)


# --------------------------------------------------------------------------- SM4 (GB/T 32907-2016)

_SM4_SBOX = bytes.fromhex(
    "d690e9fecce13db716b614c228fb2c05"
    "2b679a762abe04c3aa44132649860699"
    "9c4250f491ef987a33540b43edcfac62"
    "e4b31ca9c908e89580df94fa758f3fa6"
    "4707a7fcf37317ba83593c19e6854fa8"
    "686b81b27164da8bf8eb0f4b70569d35"
    "1e240e5e6358d1a225227c3b01217887"
    "d40046579fd327524c3602e7a0c4c89e"
    "eabf8ad240c738b5a3f7f2cef96115a1"
    "e0ae5da49b341a55ad933230f58cb1e3"
    "1df6e22e8266ca60c02923ab0d534e6f"
    "d5db3745defd8e2f03ff6a726d6c5b51"
    "8d1baf92bbddbc7f11d95c411f105ad8"
    "0ac13188a5cd7bbd2d74d012b8e5b4b0"
    "8969974a0c96777e65b9f109c56ec684"
    "18f07dec3adc4d2079ee5f3ed7cb3948"
)
_SM4_FK = (0xA3B1BAC6, 0x56AA3350, 0x677D9197, 0xB27022DC)
_SM4_CK = tuple(
    int.from_bytes(bytes(((4 * i + j) * 7) & 0xFF for j in range(4)), "big") for i in range(32)
)


def _rotl32(x: int, n: int) -> int:
    return ((x << n) | (x >> (32 - n))) & 0xFFFFFFFF


def _sm4_l(b: int) -> int:
    """The linear transform L of the round function."""
    return b ^ _rotl32(b, 2) ^ _rotl32(b, 10) ^ _rotl32(b, 18) ^ _rotl32(b, 24)


def _sm4_l_key(b: int) -> int:
    """The linear transform L' of the key schedule."""
    return b ^ _rotl32(b, 13) ^ _rotl32(b, 23)


# T(x) = L(tau(x)) and L is linear, so one table per byte position covers S-box and L.
_SM4_T = tuple(tuple(_sm4_l(_SM4_SBOX[v] << (24 - 8 * j)) for v in range(256)) for j in range(4))


def _sm4_tau(a: int) -> int:
    sb = _SM4_SBOX
    return (
        (sb[a >> 24] << 24)
        | (sb[(a >> 16) & 0xFF] << 16)
        | (sb[(a >> 8) & 0xFF] << 8)
        | sb[a & 0xFF]
    )


@functools.lru_cache(maxsize=_SCHEDULE_CACHE)
def _sm4_schedule(key: bytes) -> tuple[int, ...]:
    """The 32 round keys of SM4."""
    _check_len(key, 16, "SM4 key")
    k = [int.from_bytes(key[i : i + 4], "big") ^ _SM4_FK[i // 4] for i in (0, 4, 8, 12)]
    for i in range(32):
        k.append(k[i] ^ _sm4_l_key(_sm4_tau(k[i + 1] ^ k[i + 2] ^ k[i + 3] ^ _SM4_CK[i])))
    return tuple(k[4:])


def sm4_encrypt_block(key: bytes, block: bytes) -> bytes:
    """SM4 of one 16-byte block: SM4 card keys, SESLK and the SM4 CBC-MAC use it."""
    _check_len(block, 16, "SM4 block")
    rk = _sm4_schedule(bytes(key))
    x0, x1, x2, x3 = (int.from_bytes(block[i : i + 4], "big") for i in (0, 4, 8, 12))
    t0, t1, t2, t3 = _SM4_T
    for r in rk:
        a = x1 ^ x2 ^ x3 ^ r
        x0, x1, x2, x3 = (
            x1,
            x2,
            x3,
            x0 ^ t0[a >> 24] ^ t1[(a >> 16) & 0xFF] ^ t2[(a >> 8) & 0xFF] ^ t3[a & 0xFF],
        )
    return b"".join(x.to_bytes(4, "big") for x in (x3, x2, x1, x0))


# --------------------------------------------------------------------------- MACs


def pad80(data: bytes, block: int) -> bytes:
    """ISO/IEC 9797-1 padding method 2: 0x80 then zeros; always adds at least one byte."""
    if block <= 0:
        raise ValueError(f"block size must be positive, got {block}")
    padded = bytes(data) + b"\x80"
    return padded + b"\x00" * (-len(padded) % block)


def cbc_mac(encrypt: BlockEncrypt, data: bytes, block: int) -> bytes:
    """CBC-MAC with zero IV over pad80(data): ISO 9797-1 / GB/T 15852.1 algorithm 1.

    Returns the full last cipher block; the protocol layer truncates.
    """
    padded = pad80(data, block)
    state = bytes(block)
    for i in range(0, len(padded), block):
        state = encrypt(xor_bytes(state, padded[i : i + block]))
        if len(state) != block:
            raise ValueError(f"block function returned {len(state)} bytes, expected {block}")
    return state


def _cmac_double(b: bytes) -> bytes:
    """Multiply by x in GF(2^128) (RFC 4493 subkey generation, Rb = 0x87)."""
    v = int.from_bytes(b, "big") << 1
    if v >> 128:
        v = (v ^ 0x87) & ((1 << 128) - 1)
    return v.to_bytes(16, "big")


def aes_cmac(key: bytes, data: bytes) -> bytes:
    """AES-128-CMAC (RFC 4493 / NIST SP 800-38B), full 16-byte tag.

    For 17..31-byte inputs this is exactly NXP AN10922 diversification (which
    pads to 32 bytes and uses K2); for inputs under 16 bytes AN10922 would pad
    to 32 bytes and differ, but the protocol's input is always 17 bytes.
    """

    def enc(b: bytes) -> bytes:
        return aes128_encrypt_block(key, b)

    k1 = _cmac_double(enc(bytes(16)))
    k2 = _cmac_double(k1)
    data = bytes(data)
    if data and len(data) % 16 == 0:
        head, last = data[:-16], xor_bytes(data[-16:], k1)
    else:
        cut = len(data) - len(data) % 16
        head, last = data[:cut], xor_bytes(pad80(data[cut:], 16), k2)
    state = bytes(16)
    for i in range(0, len(head), 16):
        state = enc(xor_bytes(state, head[i : i + 16]))
    return enc(xor_bytes(state, last))
