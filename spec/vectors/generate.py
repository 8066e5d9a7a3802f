#!/usr/bin/env python3
"""Generate the .oft v1.0 merge test vectors (spec/oft-format.md, Annex B).

Usage:  python spec/vectors/generate.py [--out DIR] [--no-crosscheck]

The canonical math (skew packing, maps, wirings, per-side merge, row scale) is
re-implemented here from the specification text alone, in NumPy float64.
Where a reference library defines the same quantity, the script asserts
agreement with it (all libraries are optional unless cross-checking is on):

  * neumann/peft-0.18  vs peft 0.21.2  OFTRotationModule._cayley_batch
  * neumann/peft-0.16  vs the coefficient table of formats.md §3.3
  * cayley             vs peft's exact branch (negated vector, Cay-)
  * peft butterfly     vs peft BOFTLayer.block_butterfly_perm / perm2mat /
                          cayley_batch, M = M_{m-1}..M_0, W' = diag(s) W M^T
  * lycoris butterfly  vs lycoris.functional.boft.diff_weight (+ W)
  * importer mappings  vs real peft OFT Linear / Conv2d / Embedding merges and
                          lycoris.functional.diag_oft.diff_weight

Output is deterministic (fixed seeds); numbers are written with Python repr
(json's float formatting), which round-trips float64 exactly.
"""

import argparse
import json
import os
import struct
import sys

import numpy as np

# --------------------------------------------------------------------------
# Canonical implementation (independent of any adapter library)
# --------------------------------------------------------------------------


def tri_len(b):
    return b * (b - 1) // 2


def skew_from_packed(v, b):
    """Strict upper triangle, row-major: (0,1),(0,2),...,(0,b-1),(1,2),..."""
    v = np.asarray(v, dtype=np.float64)
    assert v.shape == (tri_len(b),)
    q = np.zeros((b, b))
    k = 0
    for i in range(b):
        for j in range(i + 1, b):
            q[i, j] = v[k]
            q[j, i] = -v[k]
            k += 1
    return q


def packed_from_skew(q):
    b = q.shape[0]
    return np.array([q[i, j] for i in range(b) for j in range(i + 1, b)], dtype=np.float64)


def map_cayley(q):
    """Cay+(Q) = (I+Q)(I-Q)^-1 (the two factors commute)."""
    eye = np.eye(q.shape[0])
    return np.linalg.solve(eye - q, eye + q)


def neumann_coefficients(n, variant):
    """Coefficients c[0..deg] of R = sum_k c[k] Q^k."""
    if n < 1:
        raise ValueError("terms must be >= 1")
    if variant == "peft-0.16":
        return [1.0] + [2.0] * (n - 1)
    if variant == "peft-0.18":
        if n == 1:
            return [1.0]
        if n == 2:
            return [1.0, 2.0]
        if n == 3:
            return [1.0, 2.0, 2.0, 1.0]
        return [1.0] + [2.0] * (n - 2) + [1.0]
    raise ValueError(variant)


def map_neumann(q, n, variant):
    c = neumann_coefficients(n, variant)
    r = np.zeros_like(q)
    p = np.eye(q.shape[0])
    for k, ck in enumerate(c):
        if k > 0:
            p = p @ q
        r = r + ck * p
    return r


def rotation(q, map_):
    if map_["kind"] == "cayley":
        return map_cayley(q)
    if map_["kind"] == "neumann":
        return map_neumann(q, map_["terms"], map_["variant"])
    raise ValueError(map_)


def sigma_identity(d):
    return list(range(d))


def sigma_peft(d, b, i):
    """PEFT BOFT stage i: chunks of c = 2^i*b, each split into 2^(i+1) runs of
    h = b/2; position run p holds original run p/2 (p even) or 2^i+(p-1)/2 (p odd)."""
    assert b % 2 == 0 and i >= 0
    h = b // 2
    c = (2 ** i) * b
    assert d % c == 0
    s = []
    for base in range(0, d, c):
        for p in range(2 ** (i + 1)):
            j = p // 2 if p % 2 == 0 else 2 ** i + (p - 1) // 2
            s.extend(base + j * h + e for e in range(h))
    return s


def sigma_lycoris(d, b, i):
    """LyCORIS BOFT stage i: k = 2^i*b/2; sigma[c*2k + 2t + g] = c*2k + g*k + t."""
    assert b % 2 == 0 and i >= 0
    k = (2 ** i) * (b // 2)
    assert d % (2 * k) == 0
    s = [0] * d
    for c in range(d // (2 * k)):
        for t in range(k):
            for g in range(2):
                s[c * 2 * k + 2 * t + g] = c * 2 * k + g * k + t
    return s


def sigma_for(wiring, d, b):
    if wiring["kind"] == "identity":
        return sigma_identity(d)
    if wiring["kind"] == "butterfly":
        if wiring["producer"] == "peft":
            return sigma_peft(d, b, wiring["index"])
        if wiring["producer"] == "lycoris":
            return sigma_lycoris(d, b, wiring["index"])
    raise ValueError(wiring)


def apply_stage(w, side, blocks_r, sigma, b):
    """blocks_r: list of r rotation matrices (already expanded for shared)."""
    w = np.array(w, dtype=np.float64)
    out = w.copy()
    for k, rk in enumerate(blocks_r):
        idx = [sigma[k * b + t] for t in range(b)]
        if side == "output":
            # W'[sigma[kb+t], :] = sum_u R_k[u][t] W[sigma[kb+u], :]
            out[idx, :] = rk.T @ w[idx, :]
        else:
            # W'[:, sigma[kb+t]] = sum_u W[:, sigma[kb+u]] R_k[t][u]
            out[:, idx] = w[:, idx] @ rk.T
    return out


def merge(w, side, stages, row_scale=None):
    """stages: list of dicts with blocks, block_size, shared, wiring, map, q (rows).
    Returns (W', per-stage (sigma, stored R list))."""
    w = np.array(w, dtype=np.float64)
    if row_scale is not None and row_scale["position"] == "before":
        w = w * np.asarray(row_scale["values"])[:, None]
    info = []
    for st in stages:
        b = st["block_size"]
        # blocks = null (shared only): as many as tile the rotated axis (§3.5)
        r = st["blocks"] if st["blocks"] is not None else (w.shape[0] if side == "output" else w.shape[1]) // b
        d = r * b
        axis = w.shape[0] if side == "output" else w.shape[1]
        sigma = sigma_for(st["wiring"], d, b)
        assert sorted(sigma) == list(range(d))
        stored = [rotation(skew_from_packed(row, b), st["map"]) for row in st["q"]]
        assert len(stored) == (1 if st["shared"] else r)
        blocks = [stored[0] if st["shared"] else stored[k] for k in range(r)]
        if st.get("truncated"):
            # truncated-blocks (section 8.7): the top-left axis x axis corner of E.
            assert st["wiring"]["kind"] == "identity" and d > axis
            e = effective_matrix(sigma, blocks, b)[:axis, :axis]
            w = e.T @ w if side == "output" else w @ e.T
        else:
            assert d == axis
            w = apply_stage(w, side, blocks, sigma, b)
        info.append((sigma, stored))
    if row_scale is not None and row_scale["position"] == "after":
        w = w * np.asarray(row_scale["values"])[:, None]
    return w, info


def effective_matrix(sigma, blocks, b):
    d = len(sigma)
    e = np.zeros((d, d))
    for k, rk in enumerate(blocks):
        for t in range(b):
            for u in range(b):
                e[sigma[k * b + t], sigma[k * b + u]] = rk[t, u]
    return e


# --------------------------------------------------------------------------
# BLAKE3 (pure Python, from the BLAKE3 specification; used for the container
# example's integrity digest and base binding, so no extra package is needed)
# --------------------------------------------------------------------------

_IV = (0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A, 0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19)
_PERM = (2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8)
_M32 = 0xFFFFFFFF
def _rotr(x, n):
    return ((x >> n) | (x << (32 - n))) & _M32
def _g(s, a, b, c, d, x, y):
    s[a] = (s[a] + s[b] + x) & _M32; s[d] = _rotr(s[d] ^ s[a], 16)
    s[c] = (s[c] + s[d]) & _M32; s[b] = _rotr(s[b] ^ s[c], 12)
    s[a] = (s[a] + s[b] + y) & _M32; s[d] = _rotr(s[d] ^ s[a], 8)
    s[c] = (s[c] + s[d]) & _M32; s[b] = _rotr(s[b] ^ s[c], 7)
def _compress(cv, words, counter, blen, flags):
    s = list(cv) + list(_IV[:4]) + [counter & _M32, (counter >> 32) & _M32, blen, flags]
    m = list(words)
    for r in range(7):
        _g(s, 0, 4, 8, 12, m[0], m[1]); _g(s, 1, 5, 9, 13, m[2], m[3])
        _g(s, 2, 6, 10, 14, m[4], m[5]); _g(s, 3, 7, 11, 15, m[6], m[7])
        _g(s, 0, 5, 10, 15, m[8], m[9]); _g(s, 1, 6, 11, 12, m[10], m[11])
        _g(s, 2, 7, 8, 13, m[12], m[13]); _g(s, 3, 4, 9, 14, m[14], m[15])
        if r < 6:
            m = [m[p] for p in _PERM]
    return [s[i] ^ s[i + 8] for i in range(8)] + [s[i + 8] ^ cv[i] for i in range(8)]
def _words(block):
    return struct.unpack("<16I", block.ljust(64, b"\0"))
def blake3_hex(data):
    CHUNK_START, CHUNK_END, PARENT, ROOT = 1, 2, 4, 8
    chunks = [data[i:i + 1024] for i in range(0, len(data), 1024)] or [b""]
    def chunk_output(idx, chunk):
        cv = list(_IV)
        blocks = [chunk[i:i + 64] for i in range(0, len(chunk), 64)] or [b""]
        for j, blk in enumerate(blocks):
            flags = (CHUNK_START if j == 0 else 0) | (CHUNK_END if j == len(blocks) - 1 else 0)
            if j == len(blocks) - 1:
                return (cv, _words(blk), idx, len(blk), flags)
            cv = _compress(cv, _words(blk), idx, 64, flags)[:8]
    def cv_of(out):
        return _compress(*out)[:8]
    def parent_output(l, r):
        return (list(_IV), tuple(l) + tuple(r), 0, 64, PARENT)
    stack = []
    out = None
    for idx, chunk in enumerate(chunks):
        out = chunk_output(idx, chunk)
        if idx == len(chunks) - 1:
            break
        cv = cv_of(out)
        total = idx + 1
        while total & 1 == 0:
            cv = cv_of(parent_output(stack.pop(), cv))
            total >>= 1
        stack.append(cv)
    while stack:
        out = parent_output(stack.pop(), cv_of(out))
    cv, words, counter, blen, flags = out
    res = _compress(cv, words, 0, blen, flags | ROOT)
    return struct.pack("<8I", *res[:8]).hex()


# --------------------------------------------------------------------------
# Vector definitions
# --------------------------------------------------------------------------

CAY = {"kind": "cayley"}
IDW = {"kind": "identity"}


def nm(n, variant):
    return {"kind": "neumann", "terms": n, "variant": variant}


def bw(producer, i):
    return {"kind": "butterfly", "producer": producer, "index": i}


def rand_q(rng, rows, b, scale=0.25):
    return rng.normal(0.0, scale, size=(rows, tri_len(b)))


def stage(rng, r, b, wiring=IDW, map_=CAY, shared=False, scale=0.25):
    return {"blocks": r, "block_size": b, "shared": shared, "wiring": wiring, "map": map_,
            "q": rand_q(rng, 1 if shared else r, b, scale)}


def vector_specs():
    """Yield (name, description, side, stages, row_scale, w)."""
    specs = []

    def add(name, desc, side, stages, w, row_scale=None):
        specs.append((name, desc, side, stages, row_scale, w))

    rng = np.random.default_rng(1001)
    add("cayley_input_identity_b4",
        "Linear-shaped W (3, 8); input side; 2 blocks of 4; cayley; identity wiring.",
        "input", [stage(rng, 2, 4)], rng.normal(size=(3, 8)))

    rng = np.random.default_rng(1002)
    add("cayley_output_identity_b3",
        "Linear-shaped W (9, 5); output side; 3 blocks of 3 (odd block size); cayley; identity wiring.",
        "output", [stage(rng, 3, 3)], rng.normal(size=(9, 5)))

    rng = np.random.default_rng(1003)
    add("cayley_input_b8",
        "W (4, 16); input side; 2 blocks of 8; cayley.",
        "input", [stage(rng, 2, 8, scale=0.15)], rng.normal(size=(4, 16)))

    for n, seed in ((1, 1101), (2, 1102), (3, 1103), (5, 1105)):
        rng = np.random.default_rng(seed)
        add(f"neumann_peft016_n{n}",
            f"W (3, 8); input side; 2 blocks of 4; neumann terms={n} variant peft-0.16 "
            f"(R = I + 2*sum_{{k=1}}^{{n-1}} Q^k).",
            "input", [stage(rng, 2, 4, map_=nm(n, "peft-0.16"), scale=0.3)], rng.normal(size=(3, 8)))

    for n, seed in ((1, 1201), (2, 1202), (3, 1203), (4, 1204), (5, 1205), (7, 1207)):
        rng = np.random.default_rng(seed)
        side = "input" if n % 2 == 1 else "output"
        shape = (3, 8) if side == "input" else (8, 3)
        add(f"neumann_peft018_n{n}",
            f"W {shape}; {side} side; 2 blocks of 4; neumann terms={n} variant peft-0.18"
            + (" (n=3 gives I+2Q+2Q^2+Q^3, identical to n=4)." if n in (3, 4) else "."),
            side, [stage(rng, 2, 4, map_=nm(n, "peft-0.18"), scale=0.3)], rng.normal(size=shape))

    rng = np.random.default_rng(1301)
    add("shared_blocks_input_b2",
        "W (3, 8); input side; 4 blocks of 2 sharing one stored row (shared=true, q has 1 row); cayley.",
        "input", [stage(rng, 4, 2, shared=True, scale=0.5)], rng.normal(size=(3, 8)))

    rng = np.random.default_rng(1302)
    add("shared_blocks_output_b4_neumann",
        "W (12, 3); output side; 3 blocks of 4 sharing one stored row; neumann peft-0.18 terms=5.",
        "output", [stage(rng, 3, 4, map_=nm(5, "peft-0.18"), shared=True)], rng.normal(size=(12, 3)))

    rng = np.random.default_rng(1401)
    st = [stage(rng, 2, 4)]
    w = rng.normal(size=(8, 3))
    s = rng.uniform(0.5, 1.5, size=8)
    add("row_scale_before_output",
        "W (8, 3); output side; 2 blocks of 4; cayley; row scale applied BEFORE the rotation "
        "(differs from the 'after' vector, which has the same W, Q and s).",
        "output", st, w, {"position": "before", "values": s})
    add("row_scale_after_output",
        "W (8, 3); output side; 2 blocks of 4; cayley; row scale applied AFTER the rotation "
        "(LyCORIS rescale semantics). Same W, Q and s as row_scale_before_output.",
        "output", st, w, {"position": "after", "values": s})

    rng = np.random.default_rng(1402)
    add("row_scale_after_input",
        "W (5, 8); input side; 2 blocks of 4; cayley; row scale 'after' (PEFT boft_s / oft_s "
        "semantics; for the input side 'before' gives the same result).",
        "input", [stage(rng, 2, 4)], rng.normal(size=(5, 8)),
        {"position": "after", "values": rng.uniform(0.5, 1.5, size=5)})

    rng = np.random.default_rng(1501)
    add("butterfly_peft_m3_b4",
        "PEFT BOFT wiring: W (3, 16); input side; 3 stages of 4 blocks of 4 with wirings "
        "butterfly/peft index 0,1,2; cayley; row scale after. Q_c = -(A - A^T)/2 of a random "
        "PEFT boft_R A; cross-checked against PEFT's P_i BD P_i^T construction.",
        "input", [stage(rng, 4, 4, bw("peft", i)) for i in range(3)], rng.normal(size=(3, 16)),
        {"position": "after", "values": rng.uniform(0.5, 1.5, size=3)})

    rng = np.random.default_rng(1502)
    add("butterfly_peft_m3_b2",
        "PEFT BOFT wiring: W (2, 8); input side; 3 stages of 4 blocks of 2, butterfly/peft index 0,1,2; cayley.",
        "input", [stage(rng, 4, 2, bw("peft", i), scale=0.5) for i in range(3)], rng.normal(size=(2, 8)))

    rng = np.random.default_rng(1601)
    add("butterfly_lycoris_m3_b4",
        "LyCORIS BOFT wiring: W (16, 3); output side; 3 stages of 4 blocks of 4 with wirings "
        "butterfly/lycoris index 0,1,2; cayley; row scale after (rescale). Q_c = -(B - B^T) of a random "
        "LyCORIS oft_blocks B; cross-checked against lycoris.functional.boft.diff_weight.",
        "output", [stage(rng, 4, 4, bw("lycoris", i)) for i in range(3)], rng.normal(size=(16, 3)),
        {"position": "after", "values": rng.uniform(0.5, 1.5, size=16)})

    rng = np.random.default_rng(1602)
    add("butterfly_lycoris_m2_b2",
        "LyCORIS BOFT wiring: W (4, 5); output side; 2 stages of 2 blocks of 2, butterfly/lycoris index 0,1; cayley.",
        "output", [stage(rng, 2, 2, bw("lycoris", i), scale=0.5) for i in range(2)], rng.normal(size=(4, 5)))

    rng = np.random.default_rng(1701)
    add("multi_stage_mixed_input",
        "W (3, 12); input side; stage 0: 3 blocks of 4, cayley; stage 1: 2 blocks of 6, neumann peft-0.18 "
        "terms=5; stage 2: 4 blocks of 3, shared, neumann peft-0.16 terms=3. Stages apply in list order.",
        "input",
        [stage(rng, 3, 4), stage(rng, 2, 6, map_=nm(5, "peft-0.18"), scale=0.15),
         stage(rng, 4, 3, map_=nm(3, "peft-0.16"), shared=True)],
        rng.normal(size=(3, 12)))

    rng = np.random.default_rng(1702)
    add("multi_stage_mixed_output",
        "W (8, 2); output side; stage 0: 4 blocks of 2, cayley; stage 1: 1 block of 8, cayley; "
        "row scale before. Stage order matters (the product is not commutative).",
        "output", [stage(rng, 4, 2, scale=0.4), stage(rng, 1, 8, scale=0.1)], rng.normal(size=(8, 2)),
        {"position": "before", "values": rng.uniform(0.5, 1.5, size=8)})

    rng = np.random.default_rng(1801)
    add("conv_input_neumann",
        "Conv2d weight (out=3, in=2, kh=2, kw=2) viewed as (3, 8) with column c*4+i*2+j; input side; "
        "2 blocks of 4; neumann peft-0.18 terms=5 (PEFT Conv2d OFT semantics).",
        "input", [stage(rng, 2, 4, map_=nm(5, "peft-0.18"))], rng.normal(size=(3, 2, 2, 2)).reshape(3, 8))

    rng = np.random.default_rng(1802)
    add("conv_output_cayley_rescale",
        "Conv2d weight (out=4, in=2, kh=1, kw=3) viewed as (4, 6); output side; 2 blocks of 2; cayley; "
        "row scale after (LyCORIS diag-oft on a conv).",
        "output", [stage(rng, 2, 2, scale=0.4)], rng.normal(size=(4, 2, 1, 3)).reshape(4, 6),
        {"position": "after", "values": rng.uniform(0.5, 1.5, size=4)})

    rng = np.random.default_rng(1901)
    add("embedding_input_neumann",
        "Embedding weight (num_embeddings=6, dim=8) as stored; input side (axis 1); 2 blocks of 4; "
        "neumann peft-0.18 terms=5 (from PEFT oft_embedding_R with Q_c = -Q_p).",
        "input", [stage(rng, 2, 4, map_=nm(5, "peft-0.18"))], rng.normal(size=(6, 8)))

    rng = np.random.default_rng(2101)
    add("conv3x3_input_w4d",
        "Conv2d weight (out=2, in=2, kh=3, kw=3) given in its stored 4-D shape (w_shape); the 2-D view is "
        "(2, 18) with column c*9+i*3+j; input side; 3 blocks of 6; cayley.",
        "input", [stage(rng, 3, 6, scale=0.2)], rng.normal(size=(2, 2, 3, 3)))

    rng = np.random.default_rng(2102)
    st = stage(rng, 4, 2, shared=True, scale=0.5)
    st["blocks"] = None
    add("shared_blocks_null_input",
        "W (3, 8); input side; one shared stored block of 2 with blocks = null (r = d / b = 4 taken from "
        "the weight, as for a PEFT block_share file without its dimension); cayley.",
        "input", [st], rng.normal(size=(3, 8)))

    rng = np.random.default_rng(2103)
    add("bf16_rounding_output",
        "W (8, 4) of BF16 values (w_bits: their bit patterns); output side; 2 blocks of 4; cayley. "
        "expected_bits: the merged weight rounded once from f64 to BF16, round-to-nearest-even (§1.4).",
        "output", [stage(rng, 2, 4, scale=0.3)], bf16_round(rng.normal(size=(8, 4))))

    rng = np.random.default_rng(2104)
    add("row_slices_fused_output",
        "A fused weight (8, 3); the layer covers rows [4, 6) then [0, 2) (rows: [[4, 2], [0, 2]]), i.e. "
        "its weight is the 4 x 3 matrix of fused rows 4, 5, 0, 1 in that order; output side; 2 blocks of "
        "2; cayley; row scale after (4 entries). expected is the whole fused weight: the listed rows "
        "merged and written back where they came from, rows 2, 3, 6, 7 unchanged (§3.4.1).",
        "output", [stage(rng, 2, 2, scale=0.4)], rng.normal(size=(8, 3)),
        {"position": "after", "values": rng.uniform(0.5, 1.5, size=4)})

    # unit-blocks (format 1.2, §8.6): stages of block size 1 are the identity; q is [r, 0].
    rng = np.random.default_rng(2001)
    add("unit_blocks_output_rescale",
        "W (4, 3); output side; 4 blocks of 1 (unit-blocks: identity, q of shape [4, 0]); cayley; "
        "row scale after, which is the whole effect (LyCORIS diag-oft with b = 1).",
        "output", [stage(rng, 4, 1)], rng.normal(size=(4, 3)),
        {"position": "after", "values": rng.uniform(0.5, 1.5, size=4)})

    rng = np.random.default_rng(2002)
    add("unit_blocks_input_mixed",
        "W (3, 4); input side; stage 0: 4 blocks of 1, neumann peft-0.18 terms=5 (identity); "
        "stage 1: 2 blocks of 2, cayley. The merged weight is stage 1's alone.",
        "input", [stage(rng, 4, 1, map_=nm(5, "peft-0.18")), stage(rng, 2, 2, scale=0.4)],
        rng.normal(size=(3, 4)))

    # truncated-blocks (format 1.2, section 8.7): PEFT 0.7-0.13 with out % r != 0.
    rng = np.random.default_rng(2101)
    st = stage(rng, 3, 3, scale=0.4)
    st["truncated"] = True
    add("truncated_output_p13",
        "W (8, 5); output side; 3 blocks of 3 (9 wide) cut to 8 x 8: blocks 0-1 whole, the top-left "
        "2 x 2 corner of block 2 (PEFT 0.13 r=3 on out 8); cayley; not orthogonal.",
        "output", [st], rng.normal(size=(8, 5)))

    rng = np.random.default_rng(2102)
    st = stage(rng, 5, 4, scale=0.4)
    st["truncated"] = True
    add("truncated_input_dropped_block",
        "W (3, 14); input side; 5 blocks of 4 (20 wide) cut to 14 x 14: blocks 0-2 whole, the "
        "top-left 2 x 2 corner of block 3, block 4 past the cut has no effect; cayley.",
        "input", [st], rng.normal(size=(3, 14)))

    rng = np.random.default_rng(2103)
    st = stage(rng, 3, 2, scale=0.4, shared=True)
    st["truncated"] = True
    add("truncated_shared_output",
        "W (5, 2); output side; one shared block of 2 repeated 3 times (6 wide) cut to 5 x 5; cayley.",
        "output", [st], rng.normal(size=(5, 2)))

    return specs


# Vectors with more than the plain schema: the rows a layer covers, and the base dtype.
ROWS = {"row_slices_fused_output": [[4, 2], [0, 2]]}
BASE_DTYPE = {"bf16_rounding_output": "BF16"}


def bf16_round(x):
    """Round each f64 once to the nearest BF16 value (ties to even), as f64."""
    import math

    out = np.empty_like(np.asarray(x, dtype=np.float64))
    for idx, v in np.ndenumerate(np.asarray(x, dtype=np.float64)):
        if v == 0.0 or not math.isfinite(v):
            out[idx] = v
            continue
        m, e = math.frexp(v)  # v = m * 2^e, 0.5 <= |m| < 1
        out[idx] = math.ldexp(round(m * 256.0), e - 8)  # round() is ties-to-even, exact here
    return out


def bf16_bits(x):
    """BF16 bit patterns of values that are BF16 values."""
    return [[struct.unpack("<I", struct.pack("<f", float(v)))[0] >> 16 for v in row]
            for row in np.asarray(x, dtype=np.float64)]


def to_list(a):
    return np.asarray(a, dtype=np.float64).tolist()


def build_vectors():
    vectors = []
    for name, desc, side, stages, row_scale, w in vector_specs():
        w_stored = np.asarray(w, dtype=np.float64)
        w = w_stored.reshape(w_stored.shape[0], -1)
        rows = ROWS.get(name)
        if rows is None:
            expected, info = merge(w, side, stages, row_scale)
        else:
            order = [r for start, n in rows for r in range(start, start + n)]
            part, info = merge(w[order], side, stages, row_scale)
            expected = w.copy()
            expected[order] = part
        jst = []
        for st, (sigma, stored) in zip(stages, info):
            js = {
                "blocks": st["blocks"], "block_size": st["block_size"], "shared": st["shared"],
                "wiring": st["wiring"], "map": st["map"],
                "q": to_list(st["q"]), "sigma": [int(x) for x in sigma],
                "r_blocks": [to_list(r) for r in stored],
            }
            if st.get("truncated"):
                js["truncated"] = True
            jst.append(js)
        rs = None
        if row_scale is not None:
            rs = {"position": row_scale["position"], "values": to_list(row_scale["values"])}
        v = {
            "name": name, "description": desc, "side": side, "stages": jst, "row_scale": rs,
            "w": to_list(w_stored), "expected": to_list(expected),
        }
        if w_stored.ndim != 2:
            v["w_shape"] = list(w_stored.shape)
        if rows is not None:
            v["rows"] = rows
        if BASE_DTYPE.get(name) == "BF16":
            v["base_dtype"] = "BF16"
            v["w_bits"] = bf16_bits(w)
            v["expected_bits"] = bf16_bits(bf16_round(expected))
        vectors.append(v)
    return vectors


# --------------------------------------------------------------------------
# Container example: a complete .oft file, its digest preimage and digest,
# a base binding, and merged weights rounded to the base dtype (F16)
# --------------------------------------------------------------------------

_DT = {"F16": ("<f2", 2), "F32": ("<f4", 4), "F64": ("<f8", 8)}


def tensor_bytes(a, dtype):
    return np.ascontiguousarray(np.asarray(a).astype(_DT[dtype][0])).tobytes()


def u64(n):
    return struct.pack("<Q", n)


def digest_preimage(manifest, tensors):
    """tensors: dict name -> (dtype, shape, raw bytes). Spec section 7."""
    m = manifest.encode("utf-8")
    out = bytearray(b"oft-digest-v1\n")
    out += u64(len(m)) + m
    for name in sorted(tensors, key=lambda s: s.encode("utf-8")):
        dtype, shape, raw = tensors[name]
        nb, db = name.encode("utf-8"), dtype.encode("ascii")
        out += u64(len(nb)) + nb + u64(len(db)) + db + u64(len(shape))
        for dim in shape:
            out += u64(dim)
        out += u64(len(raw)) + raw
    return bytes(out)


def safetensors_bytes(metadata, tensors):
    """Minimal safetensors writer: data laid out in ascending name order, header padded with spaces."""
    header = {"__metadata__": metadata}
    data = bytearray()
    for name in sorted(tensors, key=lambda s: s.encode("utf-8")):
        dtype, shape, raw = tensors[name]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    h += b" " * ((-len(h)) % 8)
    return u64(len(h)) + h + bytes(data)


def build_container_example():
    rng = np.random.default_rng(2001)
    # layer 0: PEFT-style input-side Neumann OFT on a Linear (4, 8), F32 Q, bound to an F16 base tensor
    base0 = rng.normal(0, 0.5, size=(4, 8)).astype(np.float16)
    q0 = rng.normal(0, 0.2, size=(2, 6)).astype(np.float32)
    # layer 1: LyCORIS-style output-side BOFT (2 stages, b = 2) on a 1x1 conv (4, 2, 1, 1), F64 Q, rescale after
    base1 = rng.normal(0, 0.5, size=(4, 2, 1, 1)).astype(np.float16)
    q1 = [rng.normal(0, 0.3, size=(2, 1)), rng.normal(0, 0.3, size=(2, 1))]
    s1 = rng.uniform(0.8, 1.2, size=4).astype(np.float32)
    alpha = 0.5
    radius = alpha * 4
    qnorm = float(np.sqrt(2.0 * sum(float(np.sum(q ** 2)) for q in q1)))
    assert qnorm <= radius
    base0_raw = tensor_bytes(base0, "F16")
    manifest = {
        "format": "oft",
        "version": "1.0",
        "requires": [],
        "provenance": {
            "source_format": "oft",
            "source_version": None,
            "tool": "spec/vectors/generate.py",
            "created": "2026-01-01T00:00:00Z",
            "source_digest": None,
            "user_metadata": {"note": "oft-format.md Annex B container example"},
        },
        "layers": [
            {
                "target": {"name": "down_blocks.0.attentions.0.proj_in", "convention": "diffusers",
                           "component": "unet", "module": "linear", "shape": [4, 8], "rotated_dim": 8},
                "side": "input",
                "stages": [{"blocks": 2, "block_size": 4, "shared": False, "wiring": {"kind": "identity"},
                            "map": {"kind": "neumann", "terms": 5, "variant": "peft-0.18"},
                            "q": "layers.0.stages.0.q"}],
                "row_scale": None,
                "constraint": None,
                "base_binding": {"blake3": blake3_hex(base0_raw), "dtype": "F16", "shape": [4, 8]},
            },
            {
                "target": {"name": "mid_block.attentions.0.proj_out", "convention": "diffusers",
                           "component": "unet", "module": "conv", "shape": [4, 2, 1, 1], "rotated_dim": 4},
                "side": "output",
                "stages": [{"blocks": 2, "block_size": 2, "shared": False,
                            "wiring": {"kind": "butterfly", "producer": "lycoris", "index": i},
                            "map": {"kind": "cayley"}, "q": f"layers.1.stages.{i}.q"} for i in range(2)],
                "row_scale": {"tensor": "layers.1.row_scale", "position": "after"},
                "constraint": {"kind": "lycoris", "alpha": alpha, "radius": radius, "scope": "layer"},
                "base_binding": None,
            },
        ],
    }
    manifest_str = json.dumps(manifest, separators=(",", ":"), ensure_ascii=False)
    tensors = {
        "layers.0.stages.0.q": ("F32", [2, 6], tensor_bytes(q0, "F32")),
        "layers.1.stages.0.q": ("F64", [2, 1], tensor_bytes(q1[0], "F64")),
        "layers.1.stages.1.q": ("F64", [2, 1], tensor_bytes(q1[1], "F64")),
        "layers.1.row_scale": ("F32", [4], tensor_bytes(s1, "F32")),
    }
    pre = digest_preimage(manifest_str, tensors)
    digest = blake3_hex(pre)
    metadata = {"format": "oft", "oft.version": "1.0", "oft.manifest": manifest_str, "oft.digest": digest}
    blob = safetensors_bytes(metadata, tensors)

    st0 = [dict(manifest["layers"][0]["stages"][0], q=q0.astype(np.float64))]
    m0, _ = merge(base0.astype(np.float64), "input", st0)
    st1 = [dict(manifest["layers"][1]["stages"][i], q=q1[i]) for i in range(2)]
    m1, _ = merge(base1.astype(np.float64).reshape(4, 2), "output", st1,
                  {"position": "after", "values": s1.astype(np.float64)})
    merged = []
    for idx, (m, shape) in enumerate(((m0, [4, 8]), (m1, [4, 2, 1, 1]))):
        bits = m.astype(np.float16).view(np.uint16)
        merged.append({"layer": idx, "base_dtype": "F16", "shape": shape,
                       "expected_f64": to_list(m), "expected_bits": bits.astype(int).tolist()})
    example = {
        "name": "container_example",
        "description": "A complete two-layer .oft file (container_example.oft, written by generate.py's own "
                       "minimal safetensors writer). Layer 0: input side, neumann peft-0.18 terms=5, F32 Q, "
                       "base binding to an F16 tensor. Layer 1: output side, two LyCORIS butterfly stages "
                       "(b=2), F64 Q, F32 row scale after, lycoris constraint record. Gives the metadata, the "
                       "exact digest preimage (hex) and digest, the base tensors (raw little-endian bytes, hex) "
                       "and the merged weights in f64 and rounded once to F16 (IEEE binary16 bit patterns, "
                       "2-D view (out, in_flat), row-major).",
        "file": "container_example.oft",
        "file_blake3": blake3_hex(blob),
        "metadata": metadata,
        "tensors": [{"name": n, "dtype": tensors[n][0], "shape": tensors[n][1], "data_hex": tensors[n][2].hex()}
                    for n in sorted(tensors)],
        "digest_preimage_hex": pre.hex(),
        "digest": digest,
        "base": [
            {"target": manifest["layers"][0]["target"]["name"], "dtype": "F16", "shape": [4, 8],
             "data_hex": base0_raw.hex(), "blake3": blake3_hex(base0_raw)},
            {"target": manifest["layers"][1]["target"]["name"], "dtype": "F16", "shape": [4, 2, 1, 1],
             "data_hex": tensor_bytes(base1, "F16").hex(), "blake3": blake3_hex(tensor_bytes(base1, "F16"))},
        ],
        "merged": merged,
    }
    return example, blob


# --------------------------------------------------------------------------
# Self-checks of the canonical implementation (no library needed)
# --------------------------------------------------------------------------


def self_checks():
    rng = np.random.default_rng(7)
    for b in (2, 3, 4, 8):
        q = skew_from_packed(rng.normal(0, 0.2, tri_len(b)), b)
        assert np.allclose(packed_from_skew(q), packed_from_skew(q))
        r = map_cayley(q)
        assert np.allclose(r.T @ r, np.eye(b), atol=1e-13)
        assert np.allclose(r, (np.eye(b) + q) @ np.linalg.inv(np.eye(b) - q), atol=1e-13)
        assert np.allclose(r.T, map_cayley(-q), atol=1e-13)              # Cay+(Q)^T = Cay+(-Q)
        for variant in ("peft-0.16", "peft-0.18"):
            for n in range(1, 9):
                assert np.allclose(map_neumann(q, n, variant).T, map_neumann(-q, n, variant), atol=1e-14)
    # formats.md §3.3 table, peft-0.16 column, written out term by term
    q = skew_from_packed(rng.normal(0, 0.2, 6), 4)
    i4 = np.eye(4)
    q2, q3, q4 = q @ q, q @ q @ q, q @ q @ q @ q
    table16 = {1: i4, 2: i4 + 2 * q, 3: i4 + 2 * q + 2 * q2, 4: i4 + 2 * q + 2 * q2 + 2 * q3,
               5: i4 + 2 * q + 2 * q2 + 2 * q3 + 2 * q4}
    table18 = {1: i4, 2: i4 + 2 * q, 3: i4 + 2 * q + 2 * q2 + q3, 4: i4 + 2 * q + 2 * q2 + q3,
               5: i4 + 2 * q + 2 * q2 + 2 * q3 + q4}
    for n in table16:
        assert np.allclose(map_neumann(q, n, "peft-0.16"), table16[n], atol=1e-15)
        assert np.allclose(map_neumann(q, n, "peft-0.18"), table18[n], atol=1e-15)
    # per-side index formulas == matrix forms W <- E^T W (output), W <- W E^T (input)
    for producer in ("peft", "lycoris"):
        for i in range(3):
            d, b = 16, 4
            sig = sigma_for(bw(producer, i), d, b)
            blocks = [map_cayley(skew_from_packed(rng.normal(0, 0.3, 6), 4)) for _ in range(4)]
            e = effective_matrix(sig, blocks, b)
            wo = rng.normal(size=(d, 3))
            wi = rng.normal(size=(3, d))
            assert np.allclose(apply_stage(wo, "output", blocks, sig, b), e.T @ wo, atol=1e-14)
            assert np.allclose(apply_stage(wi, "input", blocks, sig, b), wi @ e.T, atol=1e-14)
    # known gather lists (formats.md §11, d=32, b=4)
    assert sigma_peft(32, 4, 0) == list(range(32))
    assert sigma_peft(32, 4, 1)[:8] == [0, 1, 4, 5, 2, 3, 6, 7]
    assert sigma_peft(32, 4, 2)[:16] == [0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15]
    assert sigma_lycoris(32, 4, 0)[:4] == [0, 2, 1, 3]
    assert sigma_lycoris(32, 4, 1)[:8] == [0, 4, 1, 5, 2, 6, 3, 7]
    assert sigma_lycoris(32, 4, 2)[:4] == [0, 8, 1, 9]
    # spec 5.3: sigma_lycoris(i)[kb + 2e + g] = sigma_peft(i)[kb + g*h + e]  (same block sets,
    # local order interleaved), so lycoris blocks Q equal peft blocks G Q G^T
    for (d, b) in ((32, 4), (48, 6), (16, 2), (64, 8)):
        h = b // 2
        for i in range(4):
            if d % ((2 ** i) * b):
                continue
            sp, sl = sigma_peft(d, b, i), sigma_lycoris(d, b, i)
            for kb in range(0, d, b):
                for e in range(h):
                    for g in range(2):
                        assert sl[kb + 2 * e + g] == sp[kb + g * h + e]
            gamma = [g * h + e for e in range(h) for g in range(2)]     # lycoris local t -> peft local
            ql = [skew_from_packed(rng.normal(0, 0.3, tri_len(b)), b) for _ in range(d // b)]
            qp = [q[np.ix_(np.argsort(gamma), np.argsort(gamma))] for q in ql]
            wi = rng.normal(size=(2, d))
            a = apply_stage(wi, "input", [map_cayley(q) for q in ql], sl, b)
            c = apply_stage(wi, "input", [map_cayley(q) for q in qp], sp, b)
            assert np.allclose(a, c, atol=1e-13)
    # numpy's float64 -> float16 conversion rounds once, ties to even (used for container_example)
    assert np.array([1 + 2 ** -11 + 2 ** -40]).astype(np.float16).view(np.uint16)[0] == 0x3C01
    assert np.array([1 + 2 ** -11]).astype(np.float16).view(np.uint16)[0] == 0x3C00
    assert np.array([1 + 3 * 2 ** -11]).astype(np.float16).view(np.uint16)[0] == 0x3C02


# --------------------------------------------------------------------------
# Cross-checks against reference libraries
# --------------------------------------------------------------------------


def check(label, got, want, tol):
    err = float(np.max(np.abs(np.asarray(got, dtype=np.float64) - np.asarray(want, dtype=np.float64))))
    status = "ok" if err <= tol else "FAIL"
    print(f"  [{status}] {label}: max|diff| = {err:.3e} (tol {tol:g})")
    if err > tol:
        raise AssertionError(label)


def crosscheck_peft_neumann(torch):
    from peft.tuners.oft.layer import OFTRotationModule

    rng = np.random.default_rng(21)
    for b in (2, 3, 4, 8):
        rows = 3
        v = rng.normal(0, 0.3, size=(rows, tri_len(b)))
        mod = OFTRotationModule(rows, tri_len(b), b, rows * b).double()
        vt = torch.tensor(v, dtype=torch.float64)
        for n in range(1, 9):
            got = mod._cayley_batch(vt, b, True, n).numpy()
            want = np.stack([map_neumann(skew_from_packed(x, b), n, "peft-0.18") for x in v])
            check(f"peft-0.18 neumann n={n} b={b} vs peft _cayley_batch", got, want, 1e-14)
        # exact branch is Cay-(Q_p) = Cay+(-Q_p)
        got = mod._cayley_batch(vt, b, False).numpy()
        want = np.stack([map_cayley(-skew_from_packed(x, b)) for x in v])
        check(f"peft exact branch b={b} == cayley(-Q_p)", got, want, 1e-13)


def peft_boft_reference(torch, A, s, w):
    """PEFT BOFT merged weight built from PEFT's own helper functions."""
    from peft.tuners.boft.layer import BOFTLayer

    m, nblk, b, _ = A.shape
    d = nblk * b
    At = torch.tensor(A, dtype=torch.float64)
    R = BOFTLayer.cayley_batch(None, At.reshape(m * nblk, b, b)).reshape(m, nblk, b, b)
    M = None
    for i in range(m):
        perm = BOFTLayer.block_butterfly_perm(None, d, int(nblk / (2 ** i)), int(b / 2), m - 1)
        P = BOFTLayer.perm2mat(None, perm).to(torch.float64)
        BD = torch.block_diag(*torch.unbind(R[i]))
        Mi = P @ BD @ P.T
        M = Mi if M is None else Mi @ M
    wt = torch.tensor(w, dtype=torch.float64)
    st = torch.tensor(s, dtype=torch.float64).reshape(-1, 1)
    return (torch.mm(M, wt.T).T * st).numpy()


def crosscheck_peft_boft(torch, vectors):
    rng = np.random.default_rng(31)
    for (m, nblk, b, out) in ((2, 4, 4, 3), (3, 4, 4, 3), (3, 8, 2, 2), (3, 4, 6, 2), (4, 8, 2, 3)):
        d = nblk * b
        A = rng.normal(0, 0.2, size=(m, nblk, b, b))
        s = rng.uniform(0.5, 1.5, size=out)
        w = rng.normal(size=(out, d))
        ref = peft_boft_reference(torch, A, s, w)
        stages = [{"blocks": nblk, "block_size": b, "shared": False, "wiring": bw("peft", i), "map": CAY,
                   "q": np.stack([packed_from_skew(-0.5 * (A[i, k] - A[i, k].T)) for k in range(nblk)])}
                  for i in range(m)]
        got, _ = merge(w, "input", stages, {"position": "after", "values": s})
        check(f"PEFT BOFT m={m} N={nblk} b={b}: canonical(input, Q_c=-(A-A^T)/2, peft wiring) vs PEFT",
              got, ref, 1e-12)
    # the vectors themselves: reconstruct A = Q_c... any A with -(A-A^T)/2 = Q_c, e.g. A = -Q_c
    for v in vectors:
        if v["name"] in ("butterfly_peft_m3_b4", "butterfly_peft_m3_b2"):
            b = v["stages"][0]["block_size"]
            A = np.stack([np.stack([-skew_from_packed(row, b) for row in st["q"]]) for st in v["stages"]])
            s = np.ones(len(v["w"])) if v["row_scale"] is None else np.array(v["row_scale"]["values"])
            check(f"vector {v['name']} vs PEFT BOFT", v["expected"], peft_boft_reference(torch, A, s, v["w"]),
                  1e-12)


def crosscheck_lycoris_boft(torch, vectors):
    import lycoris.functional.boft as lboft
    import lycoris.functional.diag_oft as ldiag

    def lyc_diff(w, B, rescale, constraint, f64):
        if not f64:
            return lboft.diff_weight(torch.tensor(w, dtype=torch.float32), torch.tensor(B, dtype=torch.float32),
                                     None if rescale is None else torch.tensor(rescale, dtype=torch.float32),
                                     constraint=constraint, backend="torch").double().numpy()
        # float64 run of LyCORIS's own stage loop: only its Cayley helper (which
        # forces float32) is replaced by a float64 Cay+(B - B^T) with the same clamp.
        orig = lboft.get_r

        def get_r64(blocks, eye, c):
            q = (blocks - blocks.transpose(-1, -2)).numpy()
            nrm = np.linalg.norm(q) + 1e-8
            if c is not None and c > 0 and nrm > c:
                q = q * c / nrm
            shp = q.shape
            flat = q.reshape(-1, shp[-1], shp[-1])
            return torch.tensor(np.stack([map_cayley(x) for x in flat]).reshape(shp))

        lboft.get_r = get_r64
        try:
            return lboft._diff_weight(torch.tensor(w, dtype=torch.float64), torch.tensor(B, dtype=torch.float64),
                                      None if rescale is None else torch.tensor(rescale, dtype=torch.float64),
                                      constraint, 1).numpy()
        finally:
            lboft.get_r = orig

    def canonical(w, B, rescale, constraint):
        m, nblk, b, _ = B.shape
        q = B - np.swapaxes(B, -1, -2)
        nrm = np.linalg.norm(q) + 1e-8
        if constraint and constraint > 0 and nrm > constraint:
            q = q * constraint / nrm
        stages = [{"blocks": nblk, "block_size": b, "shared": False, "wiring": bw("lycoris", i), "map": CAY,
                   "q": np.stack([packed_from_skew(-q[i, k]) for k in range(nblk)])} for i in range(m)]
        rs = None if rescale is None else {"position": "after", "values": np.asarray(rescale).reshape(-1)}
        return merge(w, "output", stages, rs)[0]

    rng = np.random.default_rng(41)
    for (m, nblk, b, cols, resc, alpha) in ((1, 4, 4, 3, False, 0.0), (2, 4, 4, 3, True, 0.0),
                                            (3, 4, 4, 2, True, 0.0), (3, 8, 2, 3, False, 0.0),
                                            (3, 4, 6, 2, True, 0.0), (3, 4, 4, 2, False, 1e-2)):
        out = nblk * b
        B = rng.normal(0, 0.15, size=(m, nblk, b, b))
        w = rng.normal(size=(out, cols))
        rescale = rng.uniform(0.5, 1.5, size=(out, 1)) if resc else None
        c = alpha * out
        want = canonical(w, B, rescale, c)
        got64 = lyc_diff(w, B, rescale, c, True) + w
        check(f"LyCORIS BOFT m={m} N={nblk} b={b} rescale={resc} c={c:g}: canonical(output, Q_c=-(B-B^T)) "
              f"vs lycoris stage loop (f64)", got64, want, 1e-12)
        got32 = lyc_diff(w, B, rescale, c, False) + w
        check(f"  same vs lycoris.functional.boft.diff_weight (f32 as shipped)", got32, want, 2e-5)
        # the opposite sign is clearly wrong
        wrong = canonical(w, -B, rescale, c)
        assert np.max(np.abs(wrong - got64)) > 1e-3 or m == 0
    # conv-shaped weight (out, in, kh, kw) rotates output channels
    B = rng.normal(0, 0.15, size=(2, 2, 2, 2))
    w4 = rng.normal(size=(4, 2, 1, 3))
    got = lboft.diff_weight(torch.tensor(w4, dtype=torch.float32), torch.tensor(B, dtype=torch.float32), None,
                            constraint=0, backend="torch").double().numpy() + w4
    check("LyCORIS BOFT conv (4,2,1,3) viewed (4,6)", got.reshape(4, 6), canonical(w4.reshape(4, 6), B, None, 0),
          2e-5)
    for v in vectors:
        if v["name"] in ("butterfly_lycoris_m3_b4", "butterfly_lycoris_m2_b2"):
            b = v["stages"][0]["block_size"]
            # B = -Q_c/2 gives B - B^T = -Q_c
            B = np.stack([np.stack([-0.5 * skew_from_packed(row, b) for row in st["q"]]) for st in v["stages"]])
            rs = None if v["row_scale"] is None else np.array(v["row_scale"]["values"]).reshape(-1, 1)
            got = lyc_diff(v["w"], B, rs, 0.0, True) + np.array(v["w"])
            check(f"vector {v['name']} vs lycoris stage loop (f64)", v["expected"], got, 1e-12)

    # diag-oft (LD): output side, Q_c = +(B - B^T) (clamped), rescale after
    for (nblk, b, cols, resc, alpha) in ((2, 4, 3, True, 0.0), (3, 3, 2, False, 0.0), (4, 2, 5, True, 1e-2)):
        out = nblk * b
        B = rng.normal(0, 0.2, size=(nblk, b, b))
        w = rng.normal(size=(out, cols))
        rescale = rng.uniform(0.5, 1.5, size=(out, 1)) if resc else None
        c = alpha * out
        got = ldiag.diff_weight(torch.tensor(w, dtype=torch.float32), torch.tensor(B, dtype=torch.float32),
                                None if rescale is None else torch.tensor(rescale, dtype=torch.float32),
                                constraint=c, backend="torch").double().numpy() + w
        q = B - np.swapaxes(B, -1, -2)
        nrm = np.linalg.norm(q) + 1e-8
        if c > 0 and nrm > c:
            q = q * c / nrm
        st = [{"blocks": nblk, "block_size": b, "shared": False, "wiring": IDW, "map": CAY,
               "q": np.stack([packed_from_skew(q[k]) for k in range(nblk)])}]
        rs = None if rescale is None else {"position": "after", "values": rescale.reshape(-1)}
        check(f"LyCORIS diag-oft N={nblk} b={b} rescale={resc} c={c:g}: canonical(output, Q_c=+(B-B^T))",
              got, merge(w, "output", st, rs)[0], 2e-5)


def crosscheck_peft_oft_layers(torch):
    """Real PEFT OFT layers (Linear, Conv2d, Embedding; exact and Neumann) merged in float64."""
    from peft import OFTConfig, get_peft_model

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 3)
            self.conv = torch.nn.Conv2d(2, 3, 2)
            self.emb = torch.nn.Embedding(6, 8)

    rng = np.random.default_rng(51)
    for neumann in (True, False):
        for share in (False, True):
            torch.manual_seed(0)
            net = Net().double()
            base = {k: v.detach().clone().numpy() for k, v in net.state_dict().items()}
            cfg = OFTConfig(target_modules=["lin", "conv", "emb"], r=0, oft_block_size=4,
                            use_cayley_neumann=neumann, num_cayley_neumann_terms=5, block_share=share)
            model = get_peft_model(net, cfg).double()
            vecs = {}
            for name, p in model.named_parameters():
                if "oft_R" in name or "oft_embedding_R" in name:
                    v = rng.normal(0, 0.2, size=tuple(p.shape))
                    with torch.no_grad():
                        p.copy_(torch.tensor(v))
                    vecs[name.split(".")[2]] = v
            merged = {k: v.detach().numpy() for k, v in model.merge_and_unload().state_dict().items()}
            mp = nm(5, "peft-0.18") if neumann else CAY
            for key, wname, shape2 in (("lin", "lin.weight", (3, 8)), ("conv", "conv.weight", (3, 8)),
                                       ("emb", "emb.weight", (6, 8))):
                v = vecs[key]
                emb = key == "emb"
                # Linear/Conv: Neumann Q_c = Q_p, exact Q_c = -Q_p.  Embedding: the opposite.
                sign = (1.0 if neumann else -1.0) * (-1.0 if emb else 1.0)
                st = [{"blocks": 2, "block_size": 4, "shared": share, "wiring": IDW, "map": mp, "q": sign * v}]
                want = merge(base[wname].reshape(shape2), "input", st)[0]
                check(f"PEFT OFT {key} neumann={neumann} block_share={share} (stored rows {v.shape[0]}): "
                      f"Q_c = {'+' if sign > 0 else '-'}Q_p", merged[wname].reshape(shape2), want, 1e-12)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument("--no-crosscheck", action="store_true", help="skip the torch/peft/lycoris comparisons")
    args = ap.parse_args()

    self_checks()
    print("self-checks ok")
    vectors = build_vectors()

    if not args.no_crosscheck:
        import torch
        import peft
        import lycoris  # noqa: F401

        print(f"cross-checks: torch {torch.__version__}, peft {peft.__version__}")
        crosscheck_peft_neumann(torch)
        crosscheck_peft_boft(torch, vectors)
        crosscheck_lycoris_boft(torch, vectors)
        crosscheck_peft_oft_layers(torch)

    for v in vectors:
        path = os.path.join(args.out, v["name"] + ".json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(v, f, indent=1, allow_nan=False)
            f.write("\n")
        # round-trip check
        with open(path, encoding="utf-8") as f:
            back = json.load(f)
        assert back == v
    example, blob = build_container_example()
    with open(os.path.join(args.out, "container_example.oft"), "wb") as f:
        f.write(blob)
    with open(os.path.join(args.out, "container_example.json"), "w", encoding="utf-8") as f:
        json.dump(example, f, indent=1, allow_nan=False, ensure_ascii=False)
        f.write("\n")
    if not args.no_crosscheck:
        from safetensors import safe_open

        with safe_open(os.path.join(args.out, "container_example.oft"), framework="numpy") as f:
            assert f.metadata() == example["metadata"]
            for t in example["tensors"]:
                arr = f.get_tensor(t["name"])
                assert list(arr.shape) == t["shape"] and arr.tobytes() == bytes.fromhex(t["data_hex"])
        print("  [ok] container_example.oft opens with the safetensors library; metadata and tensors agree")
    print(f"wrote {len(vectors)} vectors and the container example to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
