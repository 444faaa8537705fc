"""Cryptography for what leaves a silo.

Import the submodules directly (``from silotune.crypto.signing import sign_update``):
this package imports nothing itself, so importing one scheme never loads another's
heavy dependencies.

- :mod:`silotune.crypto.signing`: Ed25519 signatures binding an upload to its
  federation, round and silo.
"""
