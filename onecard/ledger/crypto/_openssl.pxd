# cython: language_level=3
"""The slice of OpenSSL 3 libcrypto that ``_fast`` uses (EVP ciphers, cleanse, errors).

Everything here is callable without the GIL: libcrypto is thread-safe for
distinct contexts, and each verifier owns its contexts under its own lock.
"""

cdef extern from "openssl/opensslv.h" nogil:
    unsigned long OPENSSL_VERSION_NUMBER

cdef extern from "openssl/crypto.h" nogil:
    ctypedef struct OSSL_LIB_CTX:
        pass
    void OPENSSL_cleanse(void *ptr, size_t len)
    int CRYPTO_memcmp(const void *a, const void *b, size_t len)
    const char *OpenSSL_version(int t)
    int OPENSSL_VERSION_CONST "OPENSSL_VERSION"

cdef extern from "openssl/err.h" nogil:
    unsigned long ERR_get_error()
    void ERR_clear_error()
    void ERR_error_string_n(unsigned long e, char *buf, size_t len)

cdef extern from "openssl/evp.h" nogil:
    ctypedef struct EVP_CIPHER:
        pass
    ctypedef struct EVP_CIPHER_CTX:
        pass

    EVP_CIPHER *EVP_CIPHER_fetch(OSSL_LIB_CTX *ctx, const char *algorithm,
                                 const char *properties)
    void EVP_CIPHER_free(EVP_CIPHER *cipher)
    int EVP_CIPHER_get_block_size(const EVP_CIPHER *cipher)
    int EVP_CIPHER_get_key_length(const EVP_CIPHER *cipher)

    EVP_CIPHER_CTX *EVP_CIPHER_CTX_new()
    void EVP_CIPHER_CTX_free(EVP_CIPHER_CTX *ctx)
    int EVP_CIPHER_CTX_set_padding(EVP_CIPHER_CTX *ctx, int pad)

    # key=NULL/iv=NULL keep what the context has; cipher=NULL re-keys in place.
    int EVP_EncryptInit_ex2(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *cipher,
                            const unsigned char *key, const unsigned char *iv,
                            const void *params)
    int EVP_EncryptUpdate(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl,
                          const unsigned char *inp, int inl)
