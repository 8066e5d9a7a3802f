#!/usr/bin/env python3
"""Write spec/vectors/invalid/: one small .oft file per clause of spec section 9.1 that a small
file can show, each breaking exactly that clause of an otherwise valid file, and
invalid/expected.json giving, per file, the rule number and error category a validator reports.

Also writes the valid files the rules are broken from (valid/): a plain 1.0 file, and 1.2
files with row slices (fused weight, ranges out of order), blocks of size 1 and a truncated
stage. Deterministic: no randomness, no clock.
Needs Python 3 and NumPy (it reuses generate.py's BLAKE3, digest and safetensors writer).

    python3 spec/vectors/generate_invalid.py [--out spec/vectors]
"""

import argparse
import copy
import json
import os
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generate import blake3_hex, digest_preimage, safetensors_bytes, tensor_bytes  # noqa: E402

BASE_HASH = blake3_hex(b"base tensor")


def base_manifest():
    """A valid 1.0 manifest: one output-side layer on a Linear (4, 3) with a row scale, one
    input-side layer on a conv (2, 2, 1, 2) whose two stages are PEFT butterfly factors."""
    return {
        "format": "oft",
        "version": "1.0",
        "requires": [],
        "provenance": {
            "source_format": "oft",
            "source_version": None,
            "tool": "spec/vectors/generate_invalid.py",
            "created": "2026-01-01T00:00:00Z",
            "source_digest": None,
            "user_metadata": {},
        },
        "layers": [
            {
                "target": {"name": "a.linear", "convention": "diffusers", "component": "unet",
                           "module": "linear", "shape": [4, 3], "rotated_dim": 4},
                "side": "output",
                "stages": [{"blocks": 2, "block_size": 2, "shared": False, "wiring": {"kind": "identity"},
                            "map": {"kind": "cayley"}, "q": "layers.0.stages.0.q"}],
                "row_scale": {"tensor": "layers.0.row_scale", "position": "after"},
                "constraint": {"kind": "lycoris", "alpha": 1.0, "radius": 4.0, "scope": "layer"},
                "base_binding": {"blake3": BASE_HASH, "dtype": "F16", "shape": [4, 3]},
            },
            {
                "target": {"name": "b.conv", "convention": "diffusers", "component": "unet",
                           "module": "conv", "shape": [2, 2, 1, 2], "rotated_dim": 4},
                "side": "input",
                "stages": [{"blocks": 2, "block_size": 2, "shared": False,
                            "wiring": {"kind": "butterfly", "producer": "peft", "index": i},
                            "map": {"kind": "neumann", "terms": 5, "variant": "peft-0.18"},
                            "q": f"layers.1.stages.{i}.q"} for i in range(2)],
                "row_scale": None,
                "constraint": None,
                "base_binding": None,
            },
        ],
    }


def base_tensors():
    return {
        "layers.0.stages.0.q": ("F32", [2, 1], tensor_bytes([[0.25], [-0.5]], "F32")),
        "layers.0.row_scale": ("F32", [4], tensor_bytes([1.0, 0.5, 2.0, 1.0], "F32")),
        "layers.1.stages.0.q": ("F32", [2, 1], tensor_bytes([[0.125], [0.375]], "F32")),
        "layers.1.stages.1.q": ("F64", [2, 1], tensor_bytes([[-0.25], [0.1]], "F64")),
    }


def oft_bytes(manifest, tensors, manifest_str=None, meta_edit=None, digest=None):
    """A .oft file; the digest is computed unless given. meta_edit(metadata) may change the
    metadata after the digest is computed."""
    if manifest_str is None:
        manifest_str = json.dumps(manifest, separators=(",", ":"), ensure_ascii=False)
    if digest is None:
        digest = blake3_hex(digest_preimage(manifest_str, tensors))
    version = manifest.get("version", "1.0") if isinstance(manifest, dict) else "1.0"
    meta = {"format": "oft", "oft.version": version, "oft.manifest": manifest_str, "oft.digest": digest}
    if meta_edit:
        meta_edit(meta)
    return safetensors_bytes(meta, tensors)


def raw_header(header, data=b""):
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((-len(h)) % 8)
    return struct.pack("<Q", len(h)) + h + data


def valid_header():
    """The header of the valid file as a dict (to break its container rules by hand)."""
    blob = oft_bytes(base_manifest(), base_tensors())
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def edited(edit):
    """The valid file with edit(manifest, tensors) applied (digest recomputed)."""
    m, t = base_manifest(), base_tensors()
    edit(m, t)
    return oft_bytes(m, t)


def with_features(edit, *features):
    """As edited, in a file that requires `features` (format 1.2, oft.version to match)."""
    m, t = base_manifest(), base_tensors()
    edit(m, t)
    if features:
        m["requires"] = sorted(features)
        m["version"] = "1.2"
    v = m["version"]
    return oft_bytes(m, t, meta_edit=lambda meta: meta.update({"oft.version": v}))


def unit_blocks(m, t):
    """Layer 0 as 4 blocks of 1 (q of shape [4, 0]), which needs unit-blocks."""
    m["layers"][0]["stages"][0].update(blocks=4, block_size=1)
    t["layers.0.stages.0.q"] = ("F32", [4, 0], b"")


def truncated(blocks=3, **stage):
    """Layer 0's stage truncated: `blocks` blocks of 2 (r·b = 6 > rotated_dim 4 unless changed)."""
    def f(m, t):
        s = m["layers"][0]["stages"][0]
        s.update(blocks=blocks, truncated=True, **stage)
        rows = 1 if blocks is None else blocks
        t["layers.0.stages.0.q"] = ("F32", [rows, 1],
                                    tensor_bytes([[0.125 * (k + 1)] for k in range(rows)], "F32"))
    return f


def cases():
    """(file name, rule, category, what it breaks, bytes)."""
    out = []

    def add(name, rule, category, what, blob):
        out.append((name, rule, category, what, blob))

    # -- rule 1: container
    valid = oft_bytes(base_manifest(), base_tensors())
    add("r01-short", 1, "container", "the file is shorter than 8 bytes", valid[:5])
    add("r01-header-past-end", 1, "container", "8 + N exceeds the file size",
        struct.pack("<Q", len(valid)) + valid[8:])
    bad = b"{not json"
    bad += b" " * ((-len(bad)) % 8)
    add("r01-not-json", 1, "container", "the header is not JSON", struct.pack("<Q", len(bad)) + bad)
    add("r01-not-object", 1, "container", "the header is not a JSON object", raw_header([1, 2]))

    # -- rule 2: tensor entries
    header, data = valid_header()
    h = copy.deepcopy(header)
    del h["layers.0.row_scale"]["dtype"]
    add("r02-no-dtype", 2, "container", "a tensor entry lacks dtype", raw_header(h, data))
    h = copy.deepcopy(header)
    h["layers.0.row_scale"]["dtype"] = "F12"
    add("r02-unknown-dtype", 2, "container", "a tensor entry has a dtype unknown to safetensors",
        raw_header(h, data))
    h = copy.deepcopy(header)
    h["layers.0.row_scale"]["shape"] = [3]
    add("r02-length", 2, "container", "a tensor's byte length differs from its shape times its dtype size",
        raw_header(h, data))
    add("r02-trailing", 2, "container", "the byte ranges do not end at the end of the file",
        raw_header(header, data + b"\0" * 8))

    # -- rule 4: __metadata__
    h = copy.deepcopy(header)
    del h["__metadata__"]
    add("r04-no-metadata", 4, "container", "__metadata__ is absent", raw_header(h, data))
    h = copy.deepcopy(header)
    h["__metadata__"]["extra"] = 1
    add("r04-non-string", 4, "container", "a __metadata__ value is not a string", raw_header(h, data))

    # -- rule 5: format
    def no_format(meta):
        del meta["format"]
    add("r05-no-format", 5, "not-oft", "format is absent", oft_bytes(base_manifest(), base_tensors(),
                                                                      meta_edit=no_format))

    # -- rule 6: oft.version
    def set_version(v):
        def f(meta):
            if v is None:
                del meta["oft.version"]
            else:
                meta["oft.version"] = v
        return f

    for name, v, what in [("r06-no-version", None, "oft.version is absent"),
                          ("r06-leading-zero", "01.0", "oft.version does not match §8.1 (a leading zero)"),
                          ("r06-major-2", "2.0", "oft.version has an unimplemented MAJOR")]:
        m = base_manifest()
        if v is not None:
            m["version"] = v
        add(name, 6, "version", what, oft_bytes(m, base_tensors(), meta_edit=set_version(v)))

    # -- rule 7: oft.manifest
    def no_manifest(meta):
        del meta["oft.manifest"]
    add("r07-no-manifest", 7, "manifest", "oft.manifest is absent",
        oft_bytes(base_manifest(), base_tensors(), meta_edit=no_manifest))
    add("r07-not-json", 7, "manifest", "oft.manifest is not a JSON text",
        oft_bytes(base_manifest(), base_tensors(), manifest_str='{"format": "oft",'))
    add("r07-not-object", 7, "manifest", "oft.manifest is not a JSON object",
        oft_bytes(base_manifest(), base_tensors(), manifest_str="[]"))
    s = json.dumps(base_manifest(), separators=(",", ":"))
    dup = s.replace('"side":"output",', '"side":"output","side":"output",', 1)
    assert dup != s
    add("r07-duplicate-member", 7, "manifest", "an object of the manifest has two members of one name",
        oft_bytes(base_manifest(), base_tensors(), manifest_str=dup))

    # -- rule 8: oft.digest
    def no_digest(meta):
        del meta["oft.digest"]

    def upper_digest(meta):
        meta["oft.digest"] = meta["oft.digest"].upper()
    add("r08-no-digest", 8, "digest", "oft.digest is absent",
        oft_bytes(base_manifest(), base_tensors(), meta_edit=no_digest))
    add("r08-uppercase", 8, "digest", "oft.digest is not lowercase hex",
        oft_bytes(base_manifest(), base_tensors(), meta_edit=upper_digest))
    add("r08-mismatch", 8, "digest", "oft.digest differs from §7",
        oft_bytes(base_manifest(), base_tensors(), digest="0" * 64))

    # -- rule 9: required members, types, integer ranges
    add("r09-no-tool", 9, "manifest", "a required member (provenance.tool) is absent",
        edited(lambda m, t: m["provenance"].pop("tool")))
    add("r09-wrong-type", 9, "manifest", "a member has the wrong JSON type (shared is a string)",
        edited(lambda m, t: m["layers"][0]["stages"][0].update(shared="no")))
    add("r09-blocks-0", 9, "manifest", "an integer member is out of its range (blocks = 0)",
        edited(lambda m, t: m["layers"][0]["stages"][0].update(blocks=0)))
    add("r09-terms-0", 9, "manifest", "an integer member is out of its range (terms = 0)",
        edited(lambda m, t: m["layers"][1]["stages"][0]["map"].update(terms=0)))
    add("r09-shape-0", 9, "manifest", "a shape entry is 0",
        edited(lambda m, t: m["layers"][1]["target"].update(shape=[2, 2, 0, 2])))
    add("r09-fraction", 9, "manifest", "an integer member is written with a fraction (blocks = 2.5)",
        edited(lambda m, t: m["layers"][0]["stages"][0].update(blocks=2.5)))
    add("r09-no-alpha", 9, "manifest", "a lycoris constraint lacks alpha",
        edited(lambda m, t: m["layers"][0]["constraint"].pop("alpha")))
    add("r09-negative-radius", 9, "manifest", "a constraint radius is negative",
        edited(lambda m, t: m["layers"][0]["constraint"].update(radius=-1.0)))

    def block_size_0(m, t):
        m["layers"][0]["stages"][0].update(block_size=0)
        t["layers.0.stages.0.q"] = ("F32", [2, 0], b"")
    add("r09-block-size-0", 9, "manifest", "an integer member is out of its range (block_size = 0)",
        edited(block_size_0))
    add("r09-block-size-1", 9, "manifest", "block_size = 1 while requires lacks unit-blocks",
        edited(unit_blocks))

    # -- rule 10
    add("r10-format", 10, "manifest", "the manifest's format is not oft",
        edited(lambda m, t: m.update(format="oft2")))
    m = base_manifest()
    m["version"] = "1.1"
    add("r10-version", 10, "manifest", "the manifest's version differs from oft.version",
        oft_bytes(m, base_tensors(), meta_edit=set_version("1.0")))

    # -- rule 11
    add("r11-unknown-feature", 11, "version", "requires names a feature the reader does not implement",
        edited(lambda m, t: m.update(requires=["teleportation"])))

    # -- rule 12: closed enums
    add("r12-side", 12, "manifest", "side has an unknown value",
        edited(lambda m, t: m["layers"][0].update(side="both")))
    add("r12-map-kind", 12, "manifest", "map.kind has an unknown value",
        edited(lambda m, t: m["layers"][0]["stages"][0].update(map={"kind": "exp"})))
    add("r12-position", 12, "manifest", "row_scale.position has an unknown value",
        edited(lambda m, t: m["layers"][0]["row_scale"].update(position="middle")))

    # -- rule 13
    def no_stages(m, t):
        m["layers"][1]["stages"] = []
        for i in range(2):
            del t[f"layers.1.stages.{i}.q"]
    add("r13-no-stages", 13, "manifest", "a layer has no stages", edited(no_stages))
    add("r13-empty-name", 13, "manifest", "a target.name is empty",
        edited(lambda m, t: m["layers"][0]["target"].update(name="")))
    add("r13-same-target", 13, "manifest",
        "two layers share (target.name, target.component) without stacked-layers",
        edited(lambda m, t: m["layers"][1]["target"].update(name="a.linear")))

    # -- rule 14
    add("r14-blocks-null", 14, "manifest", "blocks is null while shared is false",
        edited(lambda m, t: m["layers"][0]["stages"][0].update(blocks=None)))
    add("r14-rotated-dim-null", 14, "manifest", "rotated_dim is null while a stage has blocks",
        edited(lambda m, t: m["layers"][0]["target"].update(rotated_dim=None)))
    add("r14-truncated-without-feature", 14, "manifest",
        "a stage is truncated while requires lacks truncated-blocks", with_features(truncated()))

    def truncated_butterfly(m, t):
        m["layers"][1]["stages"][0]["truncated"] = True
    add("r14-truncated-butterfly", 14, "manifest", "a truncated stage has a butterfly wiring",
        with_features(truncated_butterfly, "truncated-blocks"))
    add("r14-truncated-blocks-null", 14, "manifest", "a truncated stage has blocks = null",
        with_features(truncated(None, shared=True), "truncated-blocks"))
    add("r14-truncated-narrow", 14, "manifest", "a truncated stage's r·b is less than rotated_dim",
        with_features(truncated(1), "truncated-blocks"))

    # -- rule 15
    add("r15-conv-2d", 15, "manifest", "module conv with a 2-D shape",
        edited(lambda m, t: m["layers"][0]["target"].update(module="conv")))
    add("r15-linear-4d", 15, "manifest", "module linear with a 4-D shape",
        edited(lambda m, t: m["layers"][1]["target"].update(module="linear")))
    add("r15-rotated-dim", 15, "manifest", "rotated_dim differs from the shape's rotated axis",
        edited(lambda m, t: m["layers"][1]["target"].update(shape=[2, 4, 1, 2])))
    add("r15-shape-1d", 15, "manifest", "target.shape has fewer than 2 entries",
        edited(lambda m, t: m["layers"][0]["target"].update(module="unknown", shape=[4])
               or m["layers"][0]["base_binding"].update(shape=[4])))
    add("r15-binding-shape", 15, "manifest", "base_binding.shape differs from target.shape",
        edited(lambda m, t: m["layers"][0]["base_binding"].update(shape=[12, 3])))

    def rows(r, requires=True):
        def f(m, t):
            m["layers"][0]["target"]["rows"] = r
            m["layers"][0]["target"]["shape"] = [8, 3]
            m["layers"][0]["base_binding"]["shape"] = [8, 3]
            if requires:
                m["requires"] = ["row-slices"]
                m["version"] = "1.2"
        return f

    def rows_file(r, requires=True):
        m, t = base_manifest(), base_tensors()
        rows(r, requires)(m, t)
        return oft_bytes(m, t, meta_edit=set_version(m["version"]))
    add("r15-rows-without-feature", 15, "manifest", "rows is not null but requires lacks row-slices",
        rows_file([[4, 4]], requires=False))
    add("r15-rows-overlap", 15, "manifest", "rows ranges overlap", rows_file([[4, 2], [5, 2]]))
    add("r15-rows-past-shape", 15, "manifest", "a rows range lies past shape[0]", rows_file([[6, 4]]))
    add("r15-rows-empty-range", 15, "manifest", "a rows range has len 0", rows_file([[0, 4], [4, 0]]))

    # -- rule 16
    add("r16-binding-uppercase", 16, "manifest", "base_binding.blake3 is not lowercase hex",
        edited(lambda m, t: m["layers"][0]["base_binding"].update(blake3=BASE_HASH.upper())))
    add("r16-created-no-z", 16, "manifest", "created is not RFC 3339 UTC with Z",
        edited(lambda m, t: m["provenance"].update(created="2026-01-01T00:00:00+00:00")))
    add("r16-source-digest-uppercase", 16, "manifest", "source_digest is not lowercase hex",
        edited(lambda m, t: m["provenance"].update(source_digest=BASE_HASH.upper())))
    add("r16-user-metadata", 16, "manifest", "user_metadata has a non-string value",
        edited(lambda m, t: m["provenance"].update(user_metadata={"epochs": 3})))

    # -- rule 17: partition
    add("r17-rb", 17, "partition", "r·b differs from rotated_dim",
        edited(lambda m, t: m["layers"][0]["target"].update(rotated_dim=6, shape=[6, 3])
               or m["layers"][0]["base_binding"].update(shape=[6, 3])))

    def shared_misfit(m, t):
        s = m["layers"][0]["stages"][0]
        s.update(blocks=None, shared=True, block_size=3)
        t["layers.0.stages.0.q"] = ("F32", [1, 3], tensor_bytes([[0.1, 0.2, 0.3]], "F32"))
    add("r17-shared-tile", 17, "partition", "rotated_dim is not a multiple of b for blocks = null",
        edited(shared_misfit))

    def stages_differ(m, t):
        s = m["layers"][1]["stages"][1]
        s.update(blocks=1, wiring={"kind": "identity"})
        t["layers.1.stages.1.q"] = ("F64", [1, 1], tensor_bytes([[0.1]], "F64"))
    add("r17-stages-differ", 17, "partition", "stages of a layer have different d", edited(stages_differ))

    # -- rule 18: wiring
    def odd_butterfly(m, t):
        m["layers"][0]["target"].update(shape=[6, 3], rotated_dim=6)
        m["layers"][0]["base_binding"]["shape"] = [6, 3]
        m["layers"][0]["stages"][0].update(blocks=2, block_size=3,
                                           wiring={"kind": "butterfly", "producer": "peft", "index": 0})
        t["layers.0.stages.0.q"] = ("F32", [2, 3], tensor_bytes([[0.1, 0.2, 0.3]] * 2, "F32"))
        t["layers.0.row_scale"] = ("F32", [6], tensor_bytes([1.0] * 6, "F32"))
    add("r18-odd-b", 18, "wiring", "a butterfly stage has odd b", edited(odd_butterfly))
    add("r18-index", 18, "wiring", "d is not a multiple of 2^index·b",
        edited(lambda m, t: m["layers"][1]["stages"][1]["wiring"].update(index=2)))

    # -- rule 19
    def misnamed_q(m, t):
        m["layers"][0]["stages"][0]["q"] = "q0"
        t["q0"] = t.pop("layers.0.stages.0.q")
    add("r19-q-name", 19, "tensor", "a q name differs from the name its position prescribes",
        edited(misnamed_q))

    def misnamed_scale(m, t):
        m["layers"][0]["row_scale"]["tensor"] = "scale0"
        t["scale0"] = t.pop("layers.0.row_scale")
    add("r19-row-scale-name", 19, "tensor", "a row_scale.tensor name differs from its prescribed name",
        edited(misnamed_scale))

    # -- rule 20
    add("r20-missing", 20, "tensor", "a referenced tensor is missing",
        edited(lambda m, t: t.pop("layers.0.row_scale")))
    add("r20-unreferenced", 20, "tensor", "a tensor is not referenced",
        edited(lambda m, t: t.update({"extra": ("F32", [1], tensor_bytes([1.0], "F32"))})))

    # -- rule 21
    add("r21-dtype", 21, "tensor", "a tensor's dtype is not F32 or F64",
        edited(lambda m, t: t.update({"layers.0.row_scale": ("F16", [4], tensor_bytes([1, 1, 1, 1], "F16"))})))

    # -- rule 22
    add("r22-q-shape", 22, "tensor", "a q tensor's shape is not [r, b(b-1)/2]",
        edited(lambda m, t: t.update({"layers.0.stages.0.q": ("F32", [1, 2], tensor_bytes([[0.1, 0.2]], "F32"))})))
    add("r22-row-scale-2d", 22, "tensor", "a row-scale tensor is not 1-D",
        edited(lambda m, t: t.update({"layers.0.row_scale": ("F32", [4, 1], tensor_bytes([[1]] * 4, "F32"))})))
    add("r22-row-scale-length", 22, "tensor", "a row-scale tensor's length differs from out",
        edited(lambda m, t: t.update({"layers.0.row_scale": ("F32", [3], tensor_bytes([1, 1, 1], "F32"))})))

    # -- rule 23
    add("r23-nan", 23, "non-finite", "a stored value is NaN",
        edited(lambda m, t: t.update({"layers.0.stages.0.q": ("F32", [2, 1], tensor_bytes([[np.nan], [0.5]], "F32"))})))
    return out


def valid_files():
    """(file name, what it shows, bytes): files every reader accepts."""
    m, t = base_manifest(), base_tensors()
    plain = oft_bytes(m, t)
    # Row slices: layer 0 covers rows 4..6 then 0..2 of an (8, 3) fused weight, in that order.
    m = base_manifest()
    m["version"] = "1.2"
    m["requires"] = ["row-slices"]
    m["layers"][0]["target"].update(shape=[8, 3], rows=[[4, 2], [0, 2]])
    m["layers"][0]["base_binding"]["shape"] = [8, 3]
    rows = oft_bytes(m, base_tensors())
    # An unknown module value is read as unknown (§3.4).
    m = base_manifest()
    m["layers"][0]["target"]["module"] = "attention"
    unknown = oft_bytes(m, base_tensors())
    # Blocks of size 1 (§8.6) and a stage of 3 blocks of 2 cut to 4 (§8.7).
    unit = with_features(unit_blocks, "unit-blocks")
    cut = with_features(truncated(), "truncated-blocks")
    return [
        ("plain", "the file every invalid file breaks one clause of (format 1.0)", plain),
        ("unit-blocks", "format 1.2: layer 0 has 4 blocks of size 1 (q of shape [4, 0])", unit),
        ("truncated-blocks", "format 1.2: layer 0's stage of 3 blocks of 2 is cut to its 4 rows", cut),
        ("row-slices", "format 1.2: layer 0 covers rows [4, 6) then [0, 2) of an (8, 3) weight", rows),
        ("unknown-module", "module `attention`, which readers treat as unknown", unknown),
    ]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    args = ap.parse_args()
    for sub in ("invalid", "valid"):
        os.makedirs(os.path.join(args.out, sub), exist_ok=True)
    expected = {}
    names = set()
    for name, rule, category, what, blob in cases():
        assert name not in names, name
        names.add(name)
        with open(os.path.join(args.out, "invalid", name + ".oft"), "wb") as f:
            f.write(blob)
        expected[name + ".oft"] = {"rule": rule, "category": category, "breaks": what}
    with open(os.path.join(args.out, "invalid", "expected.json"), "w", encoding="utf-8") as f:
        json.dump(expected, f, indent=1, ensure_ascii=False, sort_keys=True)
        f.write("\n")
    shown = {}
    for name, what, blob in valid_files():
        with open(os.path.join(args.out, "valid", name + ".oft"), "wb") as f:
            f.write(blob)
        shown[name + ".oft"] = what
    with open(os.path.join(args.out, "valid", "expected.json"), "w", encoding="utf-8") as f:
        json.dump(shown, f, indent=1, ensure_ascii=False, sort_keys=True)
        f.write("\n")
    print(f"wrote {len(expected)} invalid and {len(shown)} valid files under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
