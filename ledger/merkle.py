"""RFC 6962 / RFC 9162 Merkle tree hashing, inclusion and consistency proofs (SHA-256).

Pure functions. A tree of ``size`` leaves is read only through a ``perfect(start, size)``
callback that returns the hash of a complete subtree (``size`` a power of two, ``start`` a
multiple of ``size``), which the store keeps precomputed. Every function below makes
O(log n) calls to it.

Definitions (RFC 6962 §2.1, restated in RFC 9162 §2.1.1): MTH({}) = SHA-256(), the hash of a
leaf is SHA-256(0x00 || d), and for n > 1, with k the largest power of two smaller than n,
MTH(D[n]) = SHA-256(0x01 || MTH(D[0:k]) || MTH(D[k:n])).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

from errors import IntegrityError

HASH_SIZE = 32
EMPTY_ROOT: bytes = hashlib.sha256(b"").digest()  # MTH({}), RFC 6962 §2.1

PerfectHash = Callable[[int, int], bytes]


class ProofError(IntegrityError, ValueError):
    """A proof failed to verify, or cannot exist for the sizes asked; the message says why."""


def leaf_hash(entry: bytes) -> bytes:
    """MTH({d}) = SHA-256(0x00 || d) (RFC 6962 §2.1)."""
    return hashlib.sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right) (RFC 6962 §2.1)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """k, the largest power of two smaller than n (n >= 2), as in RFC 6962 §2.1."""
    return 1 << ((n - 1).bit_length() - 1)


def root_of(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH over a list of leaf hashes, straight from the recursive definition (RFC 6962 §2.1)."""
    n = len(leaf_hashes)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return leaf_hashes[0]
    k = _split(n)
    return node_hash(root_of(leaf_hashes[:k]), root_of(leaf_hashes[k:]))


def perfect_subtrees(size: int) -> list[tuple[int, int]]:
    """(start, size) of the complete subtrees that make up a tree of ``size`` leaves, left to
    right: one per set bit of ``size``, largest first."""
    if size < 0:
        raise ValueError(f"negative tree size {size}")
    out = []
    start = 0
    for bit in reversed(range(size.bit_length())):
        if size >> bit & 1:
            out.append((start, 1 << bit))
            start += 1 << bit
    return out


def range_root(start: int, size: int, perfect: PerfectHash) -> bytes:
    """MTH(D[start:start+size]) (RFC 6962 §2.1) from complete subtrees only.

    Accepts the ranges that the RFC 6962 recursion visits: ``start`` a multiple of the smallest
    power of two >= ``size``. Unrolling the recursion, MTH of such a range is the right fold of
    node_hash over its binary decomposition (its first piece is D[0:k], k the largest power of
    two below size), so it costs one ``perfect`` call per set bit of ``size``.
    """
    if start < 0 or size < 0:
        raise ValueError(f"bad range start={start} size={size}")
    if size == 0:
        return EMPTY_ROOT
    span = 1 << (size - 1).bit_length()
    if start % span:
        raise ValueError(f"range [{start}, {start + size}) is not aligned to a subtree of the log")
    pieces = [perfect(start + s, n) for s, n in perfect_subtrees(size)]
    for piece in pieces:
        if len(piece) != HASH_SIZE:
            raise ValueError(f"perfect() returned {len(piece)} bytes, not {HASH_SIZE}")
    root = pieces[-1]
    for piece in reversed(pieces[:-1]):
        root = node_hash(piece, root)
    return root


def tree_root(size: int, perfect: PerfectHash) -> bytes:
    """MTH(D[0:size]); EMPTY_ROOT for size 0 (RFC 6962 §2.1)."""
    if size < 0:
        raise ValueError(f"negative tree size {size}")
    return range_root(0, size, perfect)


def inclusion_proof(index: int, size: int, perfect: PerfectHash) -> list[bytes]:
    """PATH(index, D[0:size]) (RFC 6962 §2.1.1, RFC 9162 §2.1.3.1), leaf's sibling first.

    PATH(m, D[n]) = PATH(m, D[0:k]) : MTH(D[k:n]) for m < k, and
    PATH(m - k, D[k:n]) : MTH(D[0:k]) for m >= k; descended iteratively from the root.
    """
    if not 0 <= index < size:
        raise ProofError(f"no inclusion proof for index {index} in a tree of size {size}")
    path = []
    start, m, n = 0, index, size
    while n > 1:
        k = _split(n)
        if m < k:
            path.append(range_root(start + k, n - k, perfect))
            n = k
        else:
            path.append(range_root(start, k, perfect))
            start, m, n = start + k, m - k, n - k
    path.reverse()
    return path


def consistency_proof(old_size: int, new_size: int, perfect: PerfectHash) -> list[bytes]:
    """PROOF(old_size, D[0:new_size]) (RFC 6962 §2.1.2, RFC 9162 §2.1.4.1), deepest node first.

    The RFCs define PROOF(m, D[n]) for 0 < m < n only. For m == n there is nothing to prove
    (SUBPROOF(m, D[m], true) = {}), and the empty tree is a prefix of every tree, so its proof
    is empty as well (what RFC 9162 verifiers accept for m = 0): both give [].
    """
    if old_size < 0 or new_size < 0:
        raise ProofError(f"negative tree size in {old_size} -> {new_size}")
    if old_size > new_size:
        raise ProofError(f"old size {old_size} is larger than new size {new_size}")
    if old_size == 0 or old_size == new_size:
        return []
    # SUBPROOF(m, D[n], b): for m <= k, SUBPROOF(m, D[0:k], b) : MTH(D[k:n]);
    # for m > k, SUBPROOF(m - k, D[k:n], false) : MTH(D[0:k]); SUBPROOF(m, D[m], true) = {}
    # and SUBPROOF(m, D[m], false) = {MTH(D[m])}.
    proof = []
    start, m, n, known = 0, old_size, new_size, True
    while m != n:
        k = _split(n)
        if m <= k:
            proof.append(range_root(start + k, n - k, perfect))
            n = k
        else:
            proof.append(range_root(start, k, perfect))
            start, m, n, known = start + k, m - k, n - k, False
    if not known:
        proof.append(range_root(start, m, perfect))
    proof.reverse()
    return proof


def _check_hash(what: str, value: bytes) -> None:
    if len(value) != HASH_SIZE:
        raise ProofError(f"{what} is {len(value)} bytes, not {HASH_SIZE}")


def _check_proof(proof: Sequence[bytes]) -> None:
    for i, p in enumerate(proof):
        _check_hash(f"proof[{i}]", p)


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes],
                     root: bytes) -> None:
    """Check that ``leaf`` (a leaf hash, leaf_hash(entry)) is at ``index`` of the tree of
    ``size`` leaves with root ``root``; the algorithm of RFC 9162 §2.1.3.2. Raises ProofError.

    Like the RFC algorithm, this binds the index but not the size on its own: a proof can also
    pass for another size whose audit path has the same shape (the size comes signed with root).
    """
    # 1. leaf_index >= tree_size fails.
    if index < 0 or index >= size:
        raise ProofError(f"leaf index {index} is not in a tree of size {size}")
    _check_hash("leaf hash", leaf)
    _check_hash("root", root)
    _check_proof(proof)
    # 2. fn = leaf_index, sn = tree_size - 1; 3. r = hash.
    fn, sn, r = index, size - 1, leaf
    # 4. For each p in the path:
    for p in proof:
        if sn == 0:  # a.
            raise ProofError(f"inclusion proof of {len(proof)} hashes is too long for "
                             f"index {index} in a tree of size {size}")
        if fn & 1 or fn == sn:  # b.
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1  # c.
        sn >>= 1
    # 5. sn must be 0 and r must equal the root.
    if sn != 0:
        raise ProofError(f"inclusion proof of {len(proof)} hashes is too short for "
                         f"index {index} in a tree of size {size}")
    if r != root:
        raise ProofError(f"inclusion proof for index {index} in a tree of size {size} "
                         "does not lead to the root")


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes,
                       proof: Sequence[bytes]) -> None:
    """Check that the tree (old_size, old_root) is a prefix of (new_size, new_root); the
    algorithm of RFC 9162 §2.1.4.2, plus its edge cases. Raises ProofError.

    old_size == new_size needs an empty proof and equal roots. old_size == 0 needs an empty
    proof and old_root == EMPTY_ROOT: the empty tree is a prefix of every tree.
    """
    if old_size < 0 or new_size < 0:
        raise ProofError(f"negative tree size in {old_size} -> {new_size}")
    if old_size > new_size:
        raise ProofError(f"old size {old_size} is larger than new size {new_size}")
    _check_hash("old root", old_root)
    _check_hash("new root", new_root)
    _check_proof(proof)
    if old_size == 0 or old_size == new_size:
        if proof:
            raise ProofError(f"consistency proof {old_size} -> {new_size} must be empty, "
                             f"got {len(proof)} hashes")
        if old_size == 0 and old_root != EMPTY_ROOT:
            raise ProofError("old root of size 0 is not the empty tree's root")
        if old_size == new_size and old_root != new_root:
            raise ProofError(f"two different roots for the same size {old_size}")
        return
    # 1. An empty path fails.
    if not proof:
        raise ProofError(f"consistency proof {old_size} -> {new_size} is empty")
    # 2. If first is an exact power of 2, prepend first_hash to the path.
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    # 3. fn = first - 1, sn = second - 1; 4. shift both right while LSB(fn) is set.
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    # 5. fr = sr = the first value of the path.
    fr = sr = path[0]
    # 6. For each subsequent value c:
    for c in path[1:]:
        if sn == 0:  # a.
            raise ProofError(f"consistency proof of {len(proof)} hashes is too long for "
                             f"{old_size} -> {new_size}")
        if fn & 1 or fn == sn:  # b.
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1  # c.
        sn >>= 1
    # 7. fr must equal first_hash, sr second_hash, and sn must be 0.
    if sn != 0:
        raise ProofError(f"consistency proof of {len(proof)} hashes is too short for "
                         f"{old_size} -> {new_size}")
    if fr != old_root:
        raise ProofError(f"consistency proof {old_size} -> {new_size} does not lead to the "
                         "old root")
    if sr != new_root:
        raise ProofError(f"consistency proof {old_size} -> {new_size} does not lead to the "
                         "new root")
