# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False
"""Card security protocol (shared/PROTOCOL.md) over OpenSSL 3 libcrypto.

Batch verification works in three steps:

1. with the GIL, the Python records are packed into a C array of fixed-size
   structs (BCD card number, terminal id and date, uint32 amounts, a key-slot
   index), and each distinct (issuer, kv) of the batch is looked up in the
   key store once;
2. without the GIL, card keys are derived (or found in the LRU cache) and
   every MAC is computed and compared in constant time;
3. with the GIL, the result list is built in input order.

Ciphers are fetched once per process. Every key version in use has two
contexts keyed with its master keys ("slots"); MACs run on a handful of
per-verifier work contexts that are re-keyed per card. The CBC-MAC and CMAC
block loops are done here over ECB contexts, one EVP call per block.

Single DES is not in OpenSSL 3's default provider: it runs as DES-EDE3 with
K1 = K2 = K3, and two-key 3DES is DES-EDE (K3 = K1).

Key material never leaves this module except as the return value of the
simple per-call functions, which exist for terminal simulators and tests.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_Check, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.long cimport PyLong_Check
from cpython.tuple cimport PyTuple_GET_ITEM
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.unicode cimport PyUnicode_1BYTE_DATA, PyUnicode_1BYTE_KIND, PyUnicode_Check, PyUnicode_GET_LENGTH, PyUnicode_KIND
from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcmp, memcpy, memset

from onecard.ledger.crypto._openssl cimport (
    CRYPTO_memcmp,
    ERR_clear_error,
    ERR_error_string_n,
    ERR_get_error,
    EVP_CIPHER,
    EVP_CIPHER_CTX,
    EVP_CIPHER_CTX_free,
    EVP_CIPHER_CTX_new,
    EVP_CIPHER_CTX_set_padding,
    EVP_CIPHER_fetch,
    EVP_CIPHER_get_block_size,
    EVP_CIPHER_get_key_length,
    EVP_EncryptInit_ex2,
    EVP_EncryptUpdate,
    OPENSSL_cleanse,
    OPENSSL_VERSION_CONST,
    OpenSSL_version,
)

import os
import threading

from onecard.ledger.crypto.encoding import FieldError, described, parse_datetime

ctypedef unsigned char uchar

cdef enum:
    SUITE_PBOC = 1
    SUITE_SM4 = 2
    SUITE_AES = 3
    NSUITES = 4

PURPOSE_TAC = 1
PURPOSE_LOAD = 2
MAC_OK = 0
MAC_BAD = 1
KEY_UNKNOWN = 2

cdef enum:
    P_TAC = 1
    P_LOAD = 2
    R_OK = 0
    R_BAD = 1
    R_UNKNOWN = 2
    # a MAC longer than any suite's: stored as "wrong length", never compared
    LEN_WRONG = 0xFF

# ---------------------------------------------------------------------------
# Ciphers, fetched once per process.
#
# MASTER[s]: ECB cipher keyed with a 16-byte master or card key of suite s
#   (pboc: two-key 3DES "DES-EDE-ECB"; sm4: "SM4-ECB"; aes: "AES-128-ECB").
# MACC[s]: ECB cipher the MAC of suite s runs on (pboc: single DES as
#   "DES-EDE3-ECB" with a 24-byte K|K|K key; otherwise as MASTER).

cdef const EVP_CIPHER* MASTER[NSUITES]
cdef const EVP_CIPHER* MACC[NSUITES]
cdef int KEYLEN_MASTER[NSUITES]
cdef int KEYLEN_MAC[NSUITES]
cdef int BLOCK[NSUITES]
cdef int MACLEN[NSUITES]

_missing = []


cdef const EVP_CIPHER* _fetch(const char* name) except? NULL:
    cdef EVP_CIPHER* c = EVP_CIPHER_fetch(NULL, name, NULL)
    if c == NULL:
        ERR_clear_error()
        _missing.append(name.decode())
    return c


cdef int _init_ciphers() except -1:
    cdef int s
    for s in range(NSUITES):
        MASTER[s] = NULL
        MACC[s] = NULL
    MASTER[SUITE_PBOC] = _fetch(b"DES-EDE-ECB")
    MACC[SUITE_PBOC] = _fetch(b"DES-EDE3-ECB")
    MASTER[SUITE_SM4] = _fetch(b"SM4-ECB")
    MACC[SUITE_SM4] = MASTER[SUITE_SM4]
    MASTER[SUITE_AES] = _fetch(b"AES-128-ECB")
    MACC[SUITE_AES] = MASTER[SUITE_AES]
    KEYLEN_MASTER[:] = [0, 16, 16, 16]
    KEYLEN_MAC[:] = [0, 24, 16, 16]
    BLOCK[:] = [0, 8, 16, 16]
    MACLEN[:] = [0, 4, 4, 8]
    for s in range(1, NSUITES):
        if MASTER[s] != NULL and (EVP_CIPHER_get_block_size(MASTER[s]) != BLOCK[s]
                                  or EVP_CIPHER_get_key_length(MASTER[s]) != KEYLEN_MASTER[s]):
            MASTER[s] = NULL
            _missing.append(f"suite {s} cipher with unexpected geometry")
        if MACC[s] != NULL and EVP_CIPHER_get_key_length(MACC[s]) != KEYLEN_MAC[s]:
            MACC[s] = NULL
            _missing.append(f"suite {s} MAC cipher with unexpected geometry")
    return 0


_init_ciphers()


def missing_ciphers():
    """Names of ciphers this libcrypto could not provide (empty when all suites work)."""
    return list(_missing)


def openssl_version():
    return OpenSSL_version(OPENSSL_VERSION_CONST).decode()


cdef int _suite_ok(int suite) noexcept nogil:
    return 1 <= suite < NSUITES and MASTER[suite] != NULL and MACC[suite] != NULL


cdef str _openssl_error():
    cdef char buf[256]
    cdef unsigned long e = ERR_get_error()
    if e == 0:
        return "no OpenSSL error queued"
    ERR_error_string_n(e, buf, sizeof(buf))
    ERR_clear_error()
    return buf.decode("ascii", "replace")


# ---------------------------------------------------------------------------
# ECB contexts and the block loops.

cdef struct Ecb:
    EVP_CIPHER_CTX* ctx
    int bs
    int klen
    int keyed
    uchar cur[24]    # the key the context holds, so a repeat key skips re-keying


cdef int ecb_open(Ecb* e, const EVP_CIPHER* c) noexcept nogil:
    e.keyed = 0
    e.ctx = EVP_CIPHER_CTX_new()
    if e.ctx == NULL or c == NULL:
        return 0
    e.bs = EVP_CIPHER_get_block_size(c)
    e.klen = EVP_CIPHER_get_key_length(c)
    if EVP_EncryptInit_ex2(e.ctx, c, NULL, NULL, NULL) != 1:
        return 0
    return EVP_CIPHER_CTX_set_padding(e.ctx, 0) == 1


cdef void ecb_close(Ecb* e) noexcept nogil:
    # The provider's freectx clears its key schedule (OPENSSL_clear_free).
    if e.ctx != NULL:
        EVP_CIPHER_CTX_free(e.ctx)
        e.ctx = NULL
    OPENSSL_cleanse(e.cur, sizeof(e.cur))
    e.keyed = 0


cdef inline int ecb_rekey(Ecb* e, const uchar* key) noexcept nogil:
    """Key the context unconditionally and remember nothing (master-key contexts)."""
    return EVP_EncryptInit_ex2(e.ctx, NULL, key, NULL, NULL) == 1


cdef inline int ecb_key(Ecb* e, const uchar* key) noexcept nogil:
    """Key a work context, skipping the (costly, in OpenSSL 3.0) re-key when unchanged."""
    if e.keyed and CRYPTO_memcmp(e.cur, key, e.klen) == 0:
        return 1
    e.keyed = 0
    if EVP_EncryptInit_ex2(e.ctx, NULL, key, NULL, NULL) != 1:
        return 0
    memcpy(e.cur, key, e.klen)
    e.keyed = 1
    return 1


cdef inline int ecb_blocks(Ecb* e, uchar* buf, int n) noexcept nogil:
    """Encrypt ``n`` bytes (whole blocks) of ``buf`` in place."""
    cdef int outl = 0
    return EVP_EncryptUpdate(e.ctx, buf, &outl, buf, n) == 1 and outl == n


cdef int cbc_mac_pad80(Ecb* e, const uchar* msg, size_t n, uchar* out) noexcept nogil:
    """ISO 9797-1 MAC algorithm 1, padding method 2, zero IV; full last block to ``out``."""
    cdef int bs = e.bs
    cdef uchar x[16]
    cdef size_t i = 0
    cdef int j
    memset(x, 0, 16)
    while i + bs <= n:
        for j in range(bs):
            x[j] ^= msg[i + j]
        if not ecb_blocks(e, x, bs):
            return 0
        i += bs
    for j in range(<int>(n - i)):
        x[j] ^= msg[i + j]
    x[n - i] ^= 0x80
    if not ecb_blocks(e, x, bs):
        return 0
    memcpy(out, x, bs)
    OPENSSL_cleanse(x, 16)
    return 1


cdef inline void dbl128(const uchar* src, uchar* dst) noexcept nogil:
    """Doubling in GF(2^128) (RFC 4493 subkey step), without a secret-dependent branch."""
    cdef uchar carry = src[0] >> 7
    cdef int i
    for i in range(15):
        dst[i] = <uchar>((src[i] << 1) | (src[i + 1] >> 7))
    dst[15] = <uchar>((src[15] << 1) ^ ((-carry) & 0x87))


cdef int cmac_subkeys(Ecb* e, uchar* k1, uchar* k2) noexcept nogil:
    """K1 and K2 of the AES key ``e`` holds (RFC 4493 2.3)."""
    cdef uchar l[16]
    memset(l, 0, 16)
    if not ecb_blocks(e, l, 16):
        return 0
    dbl128(l, k1)
    dbl128(k1, k2)
    OPENSSL_cleanse(l, 16)
    return 1


cdef int cmac(Ecb* e, const uchar* k1, const uchar* k2, const uchar* msg, size_t n,
              uchar* out) noexcept nogil:
    """AES-CMAC (RFC 4493) of ``msg`` under the key ``e`` holds; full tag to ``out``."""
    cdef uchar x[16]
    cdef size_t i = 0
    cdef int j, rem
    memset(x, 0, 16)
    # every block but the last
    while i + 16 < n:
        for j in range(16):
            x[j] ^= msg[i + j]
        if not ecb_blocks(e, x, 16):
            return 0
        i += 16
    rem = <int>(n - i)
    if rem == 16:
        for j in range(16):
            x[j] ^= msg[i + j] ^ k1[j]
    else:
        for j in range(rem):
            x[j] ^= msg[i + j]
        x[rem] ^= 0x80
        for j in range(16):
            x[j] ^= k2[j]
    if not ecb_blocks(e, x, 16):
        return 0
    memcpy(out, x, 16)
    OPENSSL_cleanse(x, 16)
    return 1


# ---------------------------------------------------------------------------
# Key slots: one per key version in use, holding contexts keyed with MTK/MLK.

cdef struct Slot:
    int suite
    int kv
    Ecb m[3]            # m[P_TAC] keyed with MTK, m[P_LOAD] with MLK
    uchar k1[3][16]     # AES: CMAC subkeys of the master keys
    uchar k2[3][16]


cdef int slot_open(Slot* s, int suite, int kv, const uchar* mtk, const uchar* mlk) noexcept nogil:
    """Contexts for one key version; returns 0 on an OpenSSL failure (caller closes)."""
    cdef int p
    s.suite = suite
    s.kv = kv
    s.m[0].ctx = NULL
    s.m[P_TAC].ctx = NULL
    s.m[P_LOAD].ctx = NULL
    for p in range(1, 3):
        if not ecb_open(&s.m[p], MASTER[suite]):
            return 0
        if not ecb_rekey(&s.m[p], mtk if p == P_TAC else mlk):
            return 0
        if suite == SUITE_AES and not cmac_subkeys(&s.m[p], s.k1[p], s.k2[p]):
            return 0
    return 1


cdef void slot_close(Slot* s) noexcept nogil:
    ecb_close(&s.m[P_TAC])
    ecb_close(&s.m[P_LOAD])
    OPENSSL_cleanse(s.k1, sizeof(s.k1))
    OPENSSL_cleanse(s.k2, sizeof(s.k2))


cdef int derive(Slot* s, int purpose, const uchar* card, uchar* key) noexcept nogil:
    """The 16-byte card key of ``purpose`` (PROTOCOL.md "Keys")."""
    cdef Ecb* m = &s.m[purpose]
    cdef uchar buf[17]
    cdef int i
    if s.suite == SUITE_AES:
        buf[0] = 0x01
        memcpy(buf + 1, card, 8)
        buf[9] = <uchar>purpose
        buf[10] = <uchar>s.kv
        memcpy(buf + 11, b"ONECAR", 6)
        return cmac(m, s.k1[purpose], s.k2[purpose], buf, 17, key)
    # pboc-3des: two 8-byte blocks in one ECB call; sm4: one 16-byte block
    for i in range(8):
        key[i] = card[i]
        key[8 + i] = card[i] ^ 0xFF
    return ecb_blocks(m, key, 16)


# ---------------------------------------------------------------------------
# Derived card keys with what their MACs need, and the LRU cache holding them.

cdef struct KeyMat:
    uchar key[16]       # the card key
    uchar aux[32]       # TAC keys: pboc K[0:8]^K[8:16]; aes CMAC K1 | K2


cdef struct Entry:
    uint64_t card       # the 8 BCD bytes as stored
    uint32_t slot
    uint32_t purpose
    int32_t prev        # LRU list, most recent at head
    int32_t next
    int32_t chain       # next entry in the same hash bucket
    KeyMat mat


cdef struct Cache:
    Entry* entries
    int32_t* buckets
    uint64_t mask
    uint64_t seed
    int32_t capacity
    int32_t count
    int32_t head
    int32_t tail
    uint64_t hits
    uint64_t misses


cdef inline uint64_t cache_hash(Cache* c, uint64_t card, uint32_t slot, uint32_t purpose) noexcept nogil:
    # A per-verifier random seed so crafted card numbers cannot aim at one bucket.
    cdef uint64_t h = (card ^ c.seed) + ((<uint64_t>slot << 8) | purpose) * 0x9E3779B97F4A7C15ULL
    h ^= h >> 33
    h *= 0xFF51AFD7ED558CCDULL
    h ^= h >> 33
    h *= 0xC4CEB9FE1A85EC53ULL
    h ^= h >> 33
    return h & c.mask


cdef int cache_init(Cache* c, Py_ssize_t capacity, uint64_t seed) noexcept nogil:
    cdef uint64_t nb = 16
    cdef uint64_t i
    memset(c, 0, sizeof(Cache))
    c.capacity = <int32_t>capacity
    c.head = -1
    c.tail = -1
    c.seed = seed
    if capacity == 0:
        return 1
    while nb < <uint64_t>capacity * 2:
        nb <<= 1
    c.mask = nb - 1
    c.entries = <Entry*>calloc(<size_t>capacity, sizeof(Entry))
    c.buckets = <int32_t*>malloc(nb * sizeof(int32_t))
    if c.entries == NULL or c.buckets == NULL:
        return 0
    for i in range(nb):
        c.buckets[i] = -1
    return 1


cdef void cache_wipe(Cache* c) noexcept nogil:
    cdef uint64_t i
    if c.entries != NULL:
        # entries[0:count) are the only ones ever written (see cache_insert)
        OPENSSL_cleanse(c.entries, <size_t>c.count * sizeof(Entry))
        for i in range(c.mask + 1):
            c.buckets[i] = -1
    c.count = 0
    c.head = -1
    c.tail = -1


cdef void cache_free(Cache* c) noexcept nogil:
    cache_wipe(c)
    free(c.entries)
    free(c.buckets)
    c.entries = NULL
    c.buckets = NULL


cdef inline void lru_unlink(Cache* c, int32_t i) noexcept nogil:
    cdef Entry* e = &c.entries[i]
    if e.prev >= 0:
        c.entries[e.prev].next = e.next
    else:
        c.head = e.next
    if e.next >= 0:
        c.entries[e.next].prev = e.prev
    else:
        c.tail = e.prev


cdef inline void lru_push_front(Cache* c, int32_t i) noexcept nogil:
    cdef Entry* e = &c.entries[i]
    e.prev = -1
    e.next = c.head
    if c.head >= 0:
        c.entries[c.head].prev = i
    c.head = i
    if c.tail < 0:
        c.tail = i


cdef KeyMat* cache_find(Cache* c, uint64_t card, uint32_t slot, uint32_t purpose) noexcept nogil:
    cdef int32_t i
    cdef Entry* e
    if c.capacity == 0:
        return NULL
    i = c.buckets[cache_hash(c, card, slot, purpose)]
    while i >= 0:
        e = &c.entries[i]
        if e.card == card and e.slot == slot and e.purpose == purpose:
            if c.head != i:
                lru_unlink(c, i)
                lru_push_front(c, i)
            c.hits += 1
            return &e.mat
        i = e.chain
    return NULL


cdef KeyMat* cache_insert(Cache* c, uint64_t card, uint32_t slot, uint32_t purpose) noexcept nogil:
    """A fresh entry for a key not in the cache, evicting (and wiping) the least recent."""
    cdef int32_t i, j
    cdef uint64_t b
    cdef Entry* e
    c.misses += 1
    if c.capacity == 0:
        return NULL
    if c.count < c.capacity:
        i = c.count
        c.count += 1
    else:
        i = c.tail
        e = &c.entries[i]
        lru_unlink(c, i)
        b = cache_hash(c, e.card, e.slot, e.purpose)
        j = c.buckets[b]
        if j == i:
            c.buckets[b] = e.chain
        else:
            while c.entries[j].chain != i:
                j = c.entries[j].chain
            c.entries[j].chain = e.chain
        OPENSSL_cleanse(&e.mat, sizeof(KeyMat))
    e = &c.entries[i]
    e.card = card
    e.slot = slot
    e.purpose = purpose
    b = cache_hash(c, card, slot, purpose)
    e.chain = c.buckets[b]
    c.buckets[b] = i
    lru_push_front(c, i)
    return &e.mat


cdef void cache_drop_head(Cache* c) noexcept nogil:
    """Undo the insert just made (its derivation failed)."""
    cdef int32_t i = c.head
    cdef int32_t j
    cdef uint64_t b
    cdef Entry* e
    if i < 0:
        return
    e = &c.entries[i]
    b = cache_hash(c, e.card, e.slot, e.purpose)
    j = c.buckets[b]
    if j == i:
        c.buckets[b] = e.chain
    else:
        while c.entries[j].chain != i:
            j = c.entries[j].chain
        c.entries[j].chain = e.chain
    lru_unlink(c, i)
    OPENSSL_cleanse(&e.mat, sizeof(KeyMat))
    # keep entries[0:count) dense: move the last entry into the hole
    c.count -= 1
    if i != c.count:
        _cache_move(c, c.count, i)


cdef void _cache_move(Cache* c, int32_t src, int32_t dst) noexcept nogil:
    cdef Entry* e = &c.entries[src]
    cdef uint64_t b = cache_hash(c, e.card, e.slot, e.purpose)
    cdef int32_t j = c.buckets[b]
    memcpy(&c.entries[dst], e, sizeof(Entry))
    if j == src:
        c.buckets[b] = dst
    else:
        while c.entries[j].chain != src:
            j = c.entries[j].chain
        c.entries[j].chain = dst
    if e.prev >= 0:
        c.entries[e.prev].next = dst
    else:
        c.head = dst
    if e.next >= 0:
        c.entries[e.next].prev = dst
    else:
        c.tail = dst
    OPENSSL_cleanse(e, sizeof(Entry))


# ---------------------------------------------------------------------------
# Per-record work, shared by the batch path and the per-call functions.

cdef struct Work:
    Ecb sess[NSUITES]   # SESLK: keyed with the card load key (MASTER cipher)
    Ecb mac[NSUITES]    # MACs: keyed with the card TAC key / SESLK (MACC cipher)


cdef int work_open(Work* w) noexcept nogil:
    cdef int s
    cdef int ok = 1
    for s in range(NSUITES):
        w.sess[s].ctx = NULL
        w.mac[s].ctx = NULL
    for s in range(1, NSUITES):
        if _suite_ok(s):
            ok &= ecb_open(&w.sess[s], MASTER[s])
            ok &= ecb_open(&w.mac[s], MACC[s])
    return ok


cdef void work_close(Work* w) noexcept nogil:
    cdef int s
    for s in range(NSUITES):
        ecb_close(&w.sess[s])
        ecb_close(&w.mac[s])


cdef int keymat_fill(Work* w, Slot* s, int purpose, const uchar* card, KeyMat* k) noexcept nogil:
    """Derive a card key and precompute what its MAC needs."""
    cdef int i
    if not derive(s, purpose, card, k.key):
        return 0
    if purpose == P_TAC:
        if s.suite == SUITE_PBOC:
            for i in range(8):
                k.aux[i] = k.key[i] ^ k.key[8 + i]
        elif s.suite == SUITE_AES:
            if not ecb_key(&w.mac[SUITE_AES], k.key):
                return 0
            if not cmac_subkeys(&w.mac[SUITE_AES], k.aux, k.aux + 16):
                return 0
    return 1


cdef int mac_with(Work* w, int suite, const uchar* key, int keylen, const uchar* aes_k1,
                  const uchar* aes_k2, const uchar* msg, size_t n, uchar* out) noexcept nogil:
    """MAC(K, msg) of PROTOCOL.md "MAC functions", full block to ``out``.

    pboc: ``key`` is the 8-byte single-DES key (already folded); aes: the
    CMAC subkeys of ``key`` are passed in (NULL: computed here).
    """
    cdef Ecb* e = &w.mac[suite]
    cdef uchar k3[24]
    cdef uchar s1[16]
    cdef uchar s2[16]
    cdef int ok
    if suite == SUITE_PBOC:
        memcpy(k3, key, 8)
        memcpy(k3 + 8, key, 8)
        memcpy(k3 + 16, key, 8)
        ok = ecb_key(e, k3) and cbc_mac_pad80(e, msg, n, out)
        OPENSSL_cleanse(k3, 24)
        return ok
    if not ecb_key(e, key):
        return 0
    if suite == SUITE_SM4:
        return cbc_mac_pad80(e, msg, n, out)
    if aes_k1 != NULL:
        return cmac(e, aes_k1, aes_k2, msg, n, out)
    ok = cmac_subkeys(e, s1, s2) and cmac(e, s1, s2, msg, n, out)
    OPENSSL_cleanse(s1, 16)
    OPENSSL_cleanse(s2, 16)
    return ok


cdef int session_key(Work* w, int suite, const uchar* load_key, const uchar* rnd, uint16_t ctr,
                     uchar* seslk) noexcept nogil:
    """SESLK (8 bytes pboc, 16 otherwise) from the card load key."""
    cdef Ecb* e = &w.sess[suite]
    memset(seslk, 0, 16)
    memcpy(seslk, rnd, 4)
    seslk[4] = <uchar>(ctr >> 8)
    seslk[5] = <uchar>ctr
    seslk[6] = 0x80
    seslk[7] = 0x00
    return ecb_key(e, load_key) and ecb_blocks(e, seslk, BLOCK[suite])


cdef inline void put32(uchar* p, uint32_t v) noexcept nogil:
    p[0] = <uchar>(v >> 24)
    p[1] = <uchar>(v >> 16)
    p[2] = <uchar>(v >> 8)
    p[3] = <uchar>v


# ---------------------------------------------------------------------------
# Packed records.

cdef struct PRec:
    int32_t slot        # before resolution: index into the batch's key list
    uint32_t amount
    uint32_t seq
    uchar card[8]
    uchar terminal[6]
    uchar dt[7]
    uchar txn_type
    uchar tac[8]
    uchar tac_len
    uchar result


cdef uint32_t _card_hash(const uchar* card) noexcept nogil:
    """A 32-bit mix of the 8-byte BCD card number (grouping only needs equal -> equal)."""
    cdef uint64_t c
    memcpy(&c, card, 8)
    c ^= c >> 33
    c *= 0xff51afd7ed558ccdULL
    c ^= c >> 33
    return <uint32_t>c


cdef int32_t* group_by_card(const uchar* cards, size_t stride, Py_ssize_t n) noexcept nogil:
    """A permutation of 0..n-1 that puts records of the same card next to each other.

    An LSD radix sort of 32-bit card hashes (3 passes of 11 bits): linear, a few
    nanoseconds a record, where qsort cost more than the re-keys it saved.
    Equal cards get equal hashes, so they end adjacent; a collision only
    interleaves two cards, which costs a lookup, never a wrong answer.
    NULL when out of memory (callers then go in input order).
    """
    cdef uint32_t* h = <uint32_t*>malloc(n * sizeof(uint32_t) * 2)
    cdef int32_t* a = <int32_t*>malloc(n * sizeof(int32_t) * 2)
    cdef uint32_t* h2
    cdef int32_t* b
    cdef uint32_t* ht
    cdef int32_t* t
    cdef uint32_t count[2048]
    cdef uint32_t total, c
    cdef Py_ssize_t i
    cdef int shift, d
    if h == NULL or a == NULL:
        free(h)
        free(a)
        return NULL
    h2 = h + n
    b = a + n
    for i in range(n):
        h[i] = _card_hash(cards + i * stride)
        a[i] = <int32_t>i
    for shift in range(0, 33, 11):
        memset(count, 0, sizeof(count))
        for i in range(n):
            count[(h[i] >> shift) & 2047] += 1
        total = 0
        for d in range(2048):
            c = count[d]
            count[d] = total
            total += c
        for i in range(n):
            d = (h[i] >> shift) & 2047
            h2[count[d]] = h[i]
            b[count[d]] = a[i]
            count[d] += 1
        ht = h
        h = h2
        h2 = ht
        t = a
        a = b
        b = t
    # three passes: the sorted data is in the second halves; move it to the front
    memcpy(b, a, n * sizeof(int32_t))
    free(h if h < h2 else h2)
    return b if b < a else a


cdef struct LRec:
    int32_t slot
    uint32_t old_balance
    uint32_t amount
    uint16_t ctr
    uchar card[8]
    uchar rnd[8]
    uchar rnd_ok
    uchar terminal[6]
    uchar dt[7]
    uchar txn_type
    uchar mac1[8]
    uchar mac1_len
    uchar result
    uchar mac2[8]


cdef int _bcd(object s, uchar* out, Py_ssize_t ndigits, str field) except -1:
    cdef const uchar* p
    cdef Py_ssize_t i
    cdef unsigned int hi, lo
    if (not PyUnicode_Check(s) or PyUnicode_GET_LENGTH(s) != ndigits
            or PyUnicode_KIND(s) != PyUnicode_1BYTE_KIND):
        raise FieldError(field, f"must be exactly {ndigits} decimal digits, got {described(s)}")
    p = PyUnicode_1BYTE_DATA(s)
    for i in range(ndigits // 2):
        hi = p[2 * i] - 48u
        lo = p[2 * i + 1] - 48u
        if hi > 9 or lo > 9:
            raise FieldError(field, f"must be exactly {ndigits} decimal digits, got {described(s)}")
        out[i] = <uchar>((hi << 4) | lo)
    return 0


cdef inline int _bcd2(uchar b) noexcept nogil:
    return (b >> 4) * 10 + (b & 0x0F)


cdef int _real_moment(const uchar* dt) noexcept nogil:
    """Whether 7 BCD bytes ``YYYYMMDDhhmmss`` (digits already checked) name a real
    moment, as the twin's ``parse_datetime`` requires: years 1-9999, Gregorian leap years."""
    cdef int year = _bcd2(dt[0]) * 100 + _bcd2(dt[1])
    cdef int month = _bcd2(dt[2])
    cdef int day = _bcd2(dt[3])
    cdef int last
    if year < 1 or month < 1 or month > 12 or day < 1:
        return 0
    if month == 2:
        last = 29 if (year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)) else 28
    elif month == 4 or month == 6 or month == 9 or month == 11:
        last = 30
    else:
        last = 31
    return day <= last and _bcd2(dt[4]) < 24 and _bcd2(dt[5]) < 60 and _bcd2(dt[6]) < 60


cdef int _date_field(object value, uchar* out) except -1:
    """``_bcd`` of a date and time that must be a real moment (the twin refuses 30 February)."""
    _bcd(value, out, 14, "date_time")
    if not _real_moment(out):
        parse_datetime(value)  # raises the twin's FieldError
        raise FieldError("date_time", f"is not a real date and time: {value!r}")
    return 0


cdef inline object _int(object value, str field):
    """An integer field as it is: C conversion would truncate a float or a Decimal
    (200.9 fen verified as 200), where the twin's encoders refuse it."""
    if not PyLong_Check(value):
        raise TypeError(f"{field}: expected int, got {type(value).__name__}")
    return value


cdef uchar _mac_field(object value, uchar* out, str field) except 0xFE:
    """Copy a received MAC; returns its length, or LEN_WRONG when no suite's fits."""
    cdef Py_ssize_t n
    if not PyBytes_Check(value):
        if isinstance(value, (bytearray, memoryview)):
            value = bytes(value)
        else:
            raise TypeError(f"{field}: expected bytes, got {type(value).__name__}")
    n = PyBytes_GET_SIZE(value)
    if n > 8:
        return LEN_WRONG
    memcpy(out, PyBytes_AS_STRING(value), n)
    return <uchar>n


cdef inline int32_t _key_index(dict ids, object issuer, object kv) except -1:
    cdef object key = (issuer, kv)
    cdef object idx = ids.get(key)
    if idx is None:
        idx = len(ids)
        ids[key] = idx
    return <int32_t>idx


cdef inline object _as_batch(object checks):
    if type(checks) is list or type(checks) is tuple:
        return checks
    return tuple(checks)


cdef inline object _item(object seq, Py_ssize_t i, Py_ssize_t n):
    """Item ``i`` of a list or tuple; a list is re-measured, as packing may run Python code."""
    if type(seq) is tuple:
        return <object>PyTuple_GET_ITEM(seq, i)
    if PyList_GET_SIZE(seq) != n:
        raise RuntimeError("the batch was changed while it was being read")
    return <object>PyList_GET_ITEM(seq, i)


cdef tuple _as_tuple(object rec, Py_ssize_t n, tuple fields):
    """The record's fields in order: a NamedTuple as is, anything else by attribute."""
    if isinstance(rec, tuple) and len(<tuple>rec) == n:
        return <tuple>rec
    return tuple([getattr(rec, f) for f in fields])


_PURCHASE_FIELDS = ("issuer", "kv", "card_no", "amount", "txn_type", "terminal_id",
                    "terminal_seq", "date_time", "tac")
_LOAD_FIELDS = ("issuer", "kv", "card_no", "random", "online_counter", "old_balance", "amount",
                "txn_type", "terminal_id", "date_time", "mac1")
_EMPTY = b""
_BAD_LOAD = (MAC_BAD, b"")
_UNKNOWN_LOAD = (KEY_UNKNOWN, b"")


# ---------------------------------------------------------------------------
# The batch verifier.

cdef class BatchVerifier:
    """Derived-key cache, key slots and work contexts for one ``FastVerifier``.

    ``verify_purchases``/``verify_loads`` take the key store each call; a
    change of its ``generation`` wipes every derived key and slot first.
    Calls are serialised by a lock, and run without the GIL.
    """

    cdef Cache cache
    cdef Work work
    cdef Slot* slots
    cdef Py_ssize_t nslots
    cdef Py_ssize_t slots_cap
    cdef dict slot_ids          # (issuer, kv) -> slot index
    cdef list slot_versions     # the KeyVersion each slot was keyed from
    cdef object generation
    cdef object lock
    cdef readonly Py_ssize_t cache_size

    def __cinit__(self, Py_ssize_t cache_size=100_000):
        self.slots = NULL
        self.nslots = 0
        self.slots_cap = 0
        self.cache.entries = NULL
        self.cache.buckets = NULL
        if cache_size < 0 or cache_size > 0x3FFFFFFF:
            raise ValueError(f"cache_size must be between 0 and {0x3FFFFFFF}, got {cache_size}")
        self.cache_size = cache_size
        self.slot_ids = {}
        self.slot_versions = []
        self.generation = None
        self.lock = threading.Lock()
        if not cache_init(&self.cache, cache_size, int.from_bytes(os.urandom(8), "little")):
            cache_free(&self.cache)
            raise MemoryError
        if not work_open(&self.work):
            work_close(&self.work)
            raise RuntimeError(f"OpenSSL: cannot set up cipher contexts: {_openssl_error()}")

    def __dealloc__(self):
        self._wipe_slots()
        PyMem_Free(self.slots)
        self.slots = NULL
        cache_free(&self.cache)
        work_close(&self.work)

    cdef void _wipe_slots(self) noexcept:
        cdef Py_ssize_t i
        for i in range(self.nslots):
            slot_close(&self.slots[i])
        self.nslots = 0
        if self.slot_ids is not None:
            self.slot_ids.clear()
            self.slot_versions.clear()

    cdef int _wipe(self) except -1:
        """Drop every derived key, slot and keyed work context."""
        self._wipe_slots()
        cache_wipe(&self.cache)
        # Work contexts hold the last card key's schedule: replace them.
        work_close(&self.work)
        if not work_open(&self.work):
            raise RuntimeError(f"OpenSSL: cannot set up cipher contexts: {_openssl_error()}")
        return 0

    def clear_cache(self):
        with self.lock:
            self._wipe()
            self.cache.hits = 0
            self.cache.misses = 0

    @property
    def cache_stats(self):
        """(entries, hits, misses) of the derived-key cache."""
        return (self.cache.count, self.cache.hits, self.cache.misses)

    cdef int32_t _new_slot(self, object version) except -1:
        cdef int suite = int(version.suite)
        cdef bytes mtk = version.mtk.reveal()
        cdef bytes mlk = version.mlk.reveal()
        cdef Slot* grown
        cdef int ok
        if not _suite_ok(suite):
            raise RuntimeError(
                f"suite {suite} is not available from this OpenSSL ({', '.join(_missing)})"
            )
        if len(mtk) != 16 or len(mlk) != 16:
            raise ValueError("master keys must be 16 bytes")
        if self.nslots == self.slots_cap:
            # Copied, and the old block wiped before it is freed: a slot holds
            # subkeys derived from the master keys, which realloc would leave
            # behind in freed memory.
            grown = <Slot*>PyMem_Malloc((self.slots_cap * 2 + 4) * sizeof(Slot))
            if grown == NULL:
                raise MemoryError
            if self.slots != NULL:
                memcpy(grown, self.slots, self.nslots * sizeof(Slot))
                OPENSSL_cleanse(self.slots, self.slots_cap * sizeof(Slot))
                PyMem_Free(self.slots)
            self.slots = grown
            self.slots_cap = self.slots_cap * 2 + 4
        ok = slot_open(&self.slots[self.nslots], suite, int(version.kv),
                       <const uchar*>PyBytes_AS_STRING(mtk), <const uchar*>PyBytes_AS_STRING(mlk))
        if not ok:
            slot_close(&self.slots[self.nslots])
            raise RuntimeError(f"OpenSSL: cannot key a master-key context: {_openssl_error()}")
        self.nslots += 1
        self.slot_versions.append(version)
        return <int32_t>(self.nslots - 1)

    cdef int _resolve(self, object keys, dict ids, int32_t* out) except -1:
        """Slot per distinct (issuer, kv) of the batch (-1: unknown); one key-store get each."""
        cdef object gen = keys.generation
        cdef list wanted = list(ids)
        cdef list found
        cdef object version, old, idx
        cdef Py_ssize_t i
        if self.generation is None or gen != self.generation:
            self._wipe()
            self.generation = gen
        found = [keys.get(issuer, kv) for issuer, kv in wanted]
        # A store that changed without bumping its generation: trust nothing cached.
        for i in range(len(wanted)):
            idx = self.slot_ids.get(wanted[i])
            if idx is None:
                continue
            version = found[i]
            old = self.slot_versions[idx]
            if version is old:
                continue
            if version is None or version != old:
                self._wipe()
                break
            self.slot_versions[idx] = version
        for i in range(len(wanted)):
            version = found[i]
            if version is None:
                out[ids[wanted[i]]] = -1
                continue
            idx = self.slot_ids.get(wanted[i])
            if idx is None:
                idx = self._new_slot(version)
                self.slot_ids[wanted[i]] = idx
            out[ids[wanted[i]]] = <int32_t>idx
        return 0

    # -- purchases ----------------------------------------------------------

    def verify_purchases(self, keys, checks):
        """One code per record, in input order: MAC_OK, MAC_BAD or KEY_UNKNOWN."""
        cdef object seq = _as_batch(checks)
        cdef Py_ssize_t n = len(seq)
        cdef Py_ssize_t i
        cdef PRec* recs
        cdef PRec* r
        cdef tuple t
        cdef dict ids = {}
        cdef int32_t* slot_of = NULL
        cdef object last_issuer = None
        cdef object last_kv = None
        cdef int32_t last_idx = -1
        cdef int ok
        if n == 0:
            return []
        with self.lock:
            recs = <PRec*>PyMem_Malloc(n * sizeof(PRec))
            if recs == NULL:
                raise MemoryError
            try:
                for i in range(n):
                    t = _as_tuple(_item(seq, i, n), 9, _PURCHASE_FIELDS)
                    r = &recs[i]
                    if t[0] is not last_issuer or t[1] is not last_kv:
                        last_idx = _key_index(ids, t[0], t[1])
                        last_issuer = t[0]
                        last_kv = t[1]
                    r.slot = last_idx
                    _bcd(t[2], r.card, 16, "card_no")
                    r.amount = _int(t[3], "amount")
                    r.txn_type = _int(t[4], "txn_type")
                    _bcd(t[5], r.terminal, 12, "terminal_id")
                    r.seq = _int(t[6], "terminal_seq")
                    _date_field(t[7], r.dt)
                    r.tac_len = _mac_field(t[8], r.tac, "tac")
                slot_of = <int32_t*>PyMem_Malloc(len(ids) * sizeof(int32_t))
                if slot_of == NULL:
                    raise MemoryError
                self._resolve(keys, ids, slot_of)
                with nogil:
                    for i in range(n):
                        recs[i].slot = slot_of[recs[i].slot]
                    ok = self._run_purchases(recs, n)
                if not ok:
                    msg = _openssl_error()
                    self._wipe()
                    raise RuntimeError(f"OpenSSL: {msg}")
                return [recs[i].result for i in range(n)]
            finally:
                PyMem_Free(slot_of)
                PyMem_Free(recs)

    cdef KeyMat* _card_key(self, Slot* s, uint32_t slot, int purpose, const uchar* card,
                           KeyMat* scratch) noexcept nogil:
        cdef uint64_t c
        cdef KeyMat* k
        memcpy(&c, card, 8)
        k = cache_find(&self.cache, c, slot, purpose)
        if k != NULL:
            return k
        k = cache_insert(&self.cache, c, slot, purpose)
        if k == NULL:
            k = scratch
        if not keymat_fill(&self.work, s, purpose, card, k):
            if k != scratch:
                cache_drop_head(&self.cache)
            return NULL
        return k

    cdef int _run_purchases(self, PRec* recs, Py_ssize_t n) noexcept nogil:
        """Verify in card order, so each card's key is found and scheduled once per batch.

        Re-keying a context costs more than a block in OpenSSL 3 (parameter
        handling plus the cipher's key schedule); a batch holds several
        records of its popular cards, and grouping them means one key lookup
        and one re-key per card. Results land in each record's own slot, so
        the caller still sees input order.
        """
        cdef Py_ssize_t i
        cdef PRec* r
        cdef Slot* s
        cdef KeyMat* k = NULL
        cdef KeyMat scratch
        cdef uchar msg[22]
        cdef uchar out[16]
        cdef int suite
        cdef int ok = 1
        cdef int32_t prev_slot = -1
        cdef uchar prev_card[8]
        cdef int32_t* order = group_by_card(recs[0].card, sizeof(PRec), n) if n > 1 else NULL
        for i in range(n):
            r = &recs[order[i]] if order != NULL else &recs[i]
            if r.slot < 0:
                r.result = R_UNKNOWN
                continue
            s = &self.slots[r.slot]
            suite = s.suite
            if r.tac_len != MACLEN[suite]:
                r.result = R_BAD
                continue
            if k == NULL or r.slot != prev_slot or memcmp(r.card, prev_card, 8) != 0:
                # The previous card's key stays valid until the next lookup: only
                # _card_key inserts, and only an insert can evict.
                k = self._card_key(s, <uint32_t>r.slot, P_TAC, r.card, &scratch)
                if k == NULL:
                    ok = 0
                    break
                prev_slot = r.slot
                memcpy(prev_card, r.card, 8)
            put32(msg, r.amount)
            msg[4] = r.txn_type
            memcpy(msg + 5, r.terminal, 6)
            put32(msg + 11, r.seq)
            memcpy(msg + 15, r.dt, 7)
            if suite == SUITE_PBOC:
                ok = mac_with(&self.work, suite, k.aux, 8, NULL, NULL, msg, 22, out)
            else:
                ok = mac_with(&self.work, suite, k.key, 16, k.aux, k.aux + 16, msg, 22, out)
            if not ok:
                break
            r.result = R_OK if CRYPTO_memcmp(out, r.tac, r.tac_len) == 0 else R_BAD
        free(order)
        OPENSSL_cleanse(&scratch, sizeof(KeyMat))
        OPENSSL_cleanse(out, 16)
        return ok

    # -- loads --------------------------------------------------------------

    def verify_loads(self, keys, checks):
        """(code, MAC2) per record in input order; MAC2 is b"" unless MAC1 verified."""
        cdef object seq = _as_batch(checks)
        cdef Py_ssize_t n = len(seq)
        cdef Py_ssize_t i
        cdef LRec* recs
        cdef LRec* r
        cdef tuple t
        cdef dict ids = {}
        cdef int32_t* slot_of = NULL
        cdef object last_issuer = None
        cdef object last_kv = None
        cdef int32_t last_idx = -1
        cdef list result
        cdef int ok
        if n == 0:
            return []
        with self.lock:
            recs = <LRec*>PyMem_Malloc(n * sizeof(LRec))
            if recs == NULL:
                raise MemoryError
            try:
                for i in range(n):
                    t = _as_tuple(_item(seq, i, n), 11, _LOAD_FIELDS)
                    r = &recs[i]
                    if t[0] is not last_issuer or t[1] is not last_kv:
                        last_idx = _key_index(ids, t[0], t[1])
                        last_issuer = t[0]
                        last_kv = t[1]
                    r.slot = last_idx
                    _bcd(t[2], r.card, 16, "card_no")
                    # a random of the wrong length cannot give a good MAC1 (as in the twin)
                    r.rnd_ok = _mac_field(t[3], r.rnd, "random") == 4
                    r.ctr = _int(t[4], "online_counter")
                    r.old_balance = _int(t[5], "old_balance")
                    r.amount = _int(t[6], "amount")
                    r.txn_type = _int(t[7], "txn_type")
                    _bcd(t[8], r.terminal, 12, "terminal_id")
                    _date_field(t[9], r.dt)
                    r.mac1_len = _mac_field(t[10], r.mac1, "mac1")
                slot_of = <int32_t*>PyMem_Malloc(len(ids) * sizeof(int32_t))
                if slot_of == NULL:
                    raise MemoryError
                self._resolve(keys, ids, slot_of)
                with nogil:
                    for i in range(n):
                        recs[i].slot = slot_of[recs[i].slot]
                    ok = self._run_loads(recs, n)
                if not ok:
                    msg = _openssl_error()
                    self._wipe()
                    raise RuntimeError(f"OpenSSL: {msg}")
                result = [None] * n
                for i in range(n):
                    r = &recs[i]
                    if r.result == R_OK:
                        result[i] = (MAC_OK, PyBytes_FromStringAndSize(
                            <char*>r.mac2, MACLEN[self.slots[r.slot].suite]))
                    elif r.result == R_BAD:
                        result[i] = _BAD_LOAD
                    else:
                        result[i] = _UNKNOWN_LOAD
                return result
            finally:
                PyMem_Free(slot_of)
                PyMem_Free(recs)

    cdef int _run_loads(self, LRec* recs, Py_ssize_t n) noexcept nogil:
        cdef Py_ssize_t i
        cdef LRec* r
        cdef Slot* s
        cdef KeyMat* k
        cdef KeyMat scratch
        cdef uchar seslk[16]
        cdef uchar msg[18]
        cdef uchar out[16]
        cdef int suite, klen
        cdef int ok = 1
        for i in range(n):
            r = &recs[i]
            if r.slot < 0:
                r.result = R_UNKNOWN
                continue
            s = &self.slots[r.slot]
            suite = s.suite
            if r.mac1_len != MACLEN[suite] or not r.rnd_ok:
                r.result = R_BAD
                continue
            k = self._card_key(s, <uint32_t>r.slot, P_LOAD, r.card, &scratch)
            if k == NULL:
                ok = 0
                break
            if not session_key(&self.work, suite, k.key, r.rnd, r.ctr, seslk):
                ok = 0
                break
            klen = 8 if suite == SUITE_PBOC else 16
            put32(msg, r.old_balance)
            put32(msg + 4, r.amount)
            msg[8] = r.txn_type
            memcpy(msg + 9, r.terminal, 6)
            if not mac_with(&self.work, suite, seslk, klen, NULL, NULL, msg, 15, out):
                ok = 0
                break
            if CRYPTO_memcmp(out, r.mac1, r.mac1_len) != 0:
                r.result = R_BAD
                continue
            put32(msg, r.amount)
            msg[4] = r.txn_type
            memcpy(msg + 5, r.terminal, 6)
            memcpy(msg + 11, r.dt, 7)
            if not mac_with(&self.work, suite, seslk, klen, NULL, NULL, msg, 18, out):
                ok = 0
                break
            memcpy(r.mac2, out, MACLEN[suite])
            r.result = R_OK
        OPENSSL_cleanse(&scratch, sizeof(KeyMat))
        OPENSSL_cleanse(seslk, 16)
        OPENSSL_cleanse(out, 16)
        return ok


# ---------------------------------------------------------------------------
# Simple per-call functions (terminal simulators, tests): same routines as the
# batch path, on throw-away contexts.

cdef int _check_suite(object suite) except -1:
    cdef int s = int(suite)
    if not 1 <= s < NSUITES:
        raise ValueError(f"unknown suite {suite!r}")
    if not _suite_ok(s):
        raise RuntimeError(f"suite {s} is not available from this OpenSSL ({', '.join(_missing)})")
    return s


cdef const uchar* _key_arg(bytes key, Py_ssize_t n, str name) except NULL:
    if PyBytes_GET_SIZE(key) != n:
        raise ValueError(f"{name} must be {n} bytes, got {PyBytes_GET_SIZE(key)}")
    return <const uchar*>PyBytes_AS_STRING(key)


def derive_card_key(suite, master, str card_no, int kv, int purpose):
    """Card key of ``purpose`` (PURPOSE_TAC / PURPOSE_LOAD) from a 16-byte master key."""
    cdef int s = _check_suite(suite)
    cdef bytes mb = bytes(master)
    cdef const uchar* m = _key_arg(mb, 16, "master key")
    cdef uchar card[8]
    cdef uchar key[16]
    cdef Slot slot
    cdef int ok
    if purpose != P_TAC and purpose != P_LOAD:
        raise ValueError(f"purpose must be {P_TAC} or {P_LOAD}, got {purpose}")
    if not 0 <= kv <= 255:
        raise ValueError(f"kv must be one byte, got {kv}")
    _bcd(card_no, card, 16, "card_no")
    ok = slot_open(&slot, s, kv, m, m) and derive(&slot, purpose, card, key)
    slot_close(&slot)
    try:
        if not ok:
            raise RuntimeError(f"OpenSSL: {_openssl_error()}")
        return PyBytes_FromStringAndSize(<char*>key, 16)
    finally:
        OPENSSL_cleanse(key, 16)


cdef bytes _mac(int s, object key, const uchar* msg, size_t n, bint full=False):
    """MAC(K, msg) truncated; pboc takes a 16-byte key (folded) or an 8-byte one."""
    cdef bytes kb = bytes(key)
    cdef Py_ssize_t keylen = PyBytes_GET_SIZE(kb)
    cdef const uchar* k = <const uchar*>PyBytes_AS_STRING(kb)
    cdef Work w
    cdef uchar k8[8]
    cdef uchar out[16]
    cdef int i, ok
    if s == SUITE_PBOC and keylen != 8 and keylen != 16:
        raise ValueError(f"pboc-3des MAC key must be 8 or 16 bytes, got {keylen}")
    if s != SUITE_PBOC and keylen != 16:
        raise ValueError(f"MAC key must be 16 bytes, got {keylen}")
    ok = work_open(&w)
    if ok:
        if s == SUITE_PBOC:
            for i in range(8):
                k8[i] = k[i] ^ k[8 + i] if keylen == 16 else k[i]
            ok = mac_with(&w, s, k8, 8, NULL, NULL, msg, n, out)
            OPENSSL_cleanse(k8, 8)
        else:
            ok = mac_with(&w, s, k, 16, NULL, NULL, msg, n, out)
    work_close(&w)
    if not ok:
        raise RuntimeError(f"OpenSSL: {_openssl_error()}")
    try:
        return PyBytes_FromStringAndSize(<char*>out, BLOCK[s] if full else MACLEN[s])
    finally:
        OPENSSL_cleanse(out, 16)


def mac(suite, key, data):
    """MAC(K, x) of PROTOCOL.md, truncated to the suite's length (4 or 8 bytes)."""
    cdef int s = _check_suite(suite)
    cdef bytes d = bytes(data)
    return _mac(s, key, <const uchar*>PyBytes_AS_STRING(d), <size_t>PyBytes_GET_SIZE(d))


def purchase_tac(suite, card_tac_key, amount, txn_type, terminal_id, terminal_seq,
                 date_time):
    """TAC = MAC(card TAC key, amount ‖ type ‖ terminal id ‖ terminal seq ‖ date time).

    The date must be a real moment, as the reference twin requires: these
    helpers signed 20261131… where the twin refused it (found by review).
    """
    cdef int s = _check_suite(suite)
    cdef bytes k = bytes(card_tac_key)
    cdef uchar msg[22]
    _key_arg(k, 16, "card TAC key")
    put32(msg, _int(amount, "amount"))
    msg[4] = <uint8_t>_int(txn_type, "txn_type")
    _bcd(terminal_id, msg + 5, 12, "terminal_id")
    put32(msg + 11, _int(terminal_seq, "terminal_seq"))
    parse_datetime(date_time)  # in the twin's order: after the fields before it
    _bcd(date_time, msg + 15, 14, "date_time")
    return _mac(s, k, msg, 22)


def load_session_key(suite, card_load_key, random, online_counter):
    """SESLK from the card load key, the card's random and its online counter."""
    cdef int s = _check_suite(suite)
    cdef bytes kb = bytes(card_load_key)
    cdef bytes rb = bytes(random)
    cdef const uchar* k = _key_arg(kb, 16, "card load key")
    cdef const uchar* rnd = _key_arg(rb, 4, "random")
    cdef uint16_t ctr = _int(online_counter, "online_counter")
    cdef uchar seslk[16]
    cdef Work w
    cdef int ok = work_open(&w) and session_key(&w, s, k, rnd, ctr, seslk)
    work_close(&w)
    try:
        if not ok:
            raise RuntimeError(f"OpenSSL: {_openssl_error()}")
        return PyBytes_FromStringAndSize(<char*>seslk, BLOCK[s])
    finally:
        OPENSSL_cleanse(seslk, 16)


def load_mac1(suite, seslk, old_balance, amount, txn_type, terminal_id):
    """MAC1 = MAC(SESLK, old balance ‖ amount ‖ type ‖ terminal id)."""
    cdef int s = _check_suite(suite)
    cdef uchar msg[15]
    put32(msg, _int(old_balance, "old_balance"))
    put32(msg + 4, _int(amount, "amount"))
    msg[8] = <uint8_t>_int(txn_type, "txn_type")
    _bcd(terminal_id, msg + 9, 12, "terminal_id")
    return _mac(s, seslk, msg, 15)


def load_mac2(suite, seslk, amount, txn_type, terminal_id, date_time):
    """MAC2 = MAC(SESLK, amount ‖ type ‖ terminal id ‖ date time); a real moment, as in the twin."""
    cdef int s = _check_suite(suite)
    cdef uchar msg[18]
    put32(msg, _int(amount, "amount"))
    msg[4] = <uint8_t>_int(txn_type, "txn_type")
    _bcd(terminal_id, msg + 5, 12, "terminal_id")
    parse_datetime(date_time)
    _bcd(date_time, msg + 11, 14, "date_time")
    return _mac(s, seslk, msg, 18)


def ecb_encrypt(suite, key, data):
    """The suite's block cipher in ECB mode under a 16-byte key (pboc-3des: two-key 3DES).

    For terminal simulators and the published primitive vectors; ``data`` must be
    whole blocks (8 bytes for pboc-3des, 16 otherwise).
    """
    cdef int s = _check_suite(suite)
    cdef bytes kb = bytes(key)
    cdef bytearray buf = bytearray(data)
    cdef Ecb e
    cdef int ok
    _key_arg(kb, 16, "key")
    if len(buf) % BLOCK[s]:
        raise ValueError(f"data must be whole {BLOCK[s]}-byte blocks, got {len(buf)} bytes")
    ok = ecb_open(&e, MASTER[s]) and ecb_rekey(&e, <const uchar*>PyBytes_AS_STRING(kb))
    if ok and len(buf):
        ok = ecb_blocks(&e, <uchar*><char*>buf, <int>len(buf))
    ecb_close(&e)
    if not ok:
        raise RuntimeError(f"OpenSSL: {_openssl_error()}")
    return bytes(buf)


def full_mac(suite, key, data):
    """``mac`` without the truncation: the whole last CBC-MAC block / the 16-byte AES-CMAC tag."""
    cdef int s = _check_suite(suite)
    cdef bytes d = bytes(data)
    return _mac(s, key, <const uchar*>PyBytes_AS_STRING(d), <size_t>PyBytes_GET_SIZE(d), 1)
