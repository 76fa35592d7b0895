"""Card security protocol (shared/PROTOCOL.md): key derivation, TAC, MAC1/MAC2.

Two implementations share one contract: ``reference`` is plain Python, kept
as the readable twin the tests hold the fast path to; ``_fast`` is the Cython
extension over OpenSSL that the server runs.
"""
