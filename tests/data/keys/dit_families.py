"""Regenerate the full-size key sets `flux2-dev`, `chroma1`, `z-image` `.{diffusers,original}.tsv`
(`name<TAB>[shape]`, used by src/resolve/dit_tests.rs).

The diffusers layout is the state dict of `Flux2Transformer2DModel()`, `ChromaTransformer2DModel()`,
`ZImageTransformer2DModel()` with their default configs (FLUX.2-dev, Chroma1, Z-Image 6B) built on
the meta device (names and shapes only, nothing downloaded); the original layout is OneTrainer's own
checkpoint conversion of it (`checkpoint_diffusers_to_original()`, Z-Image
`checkpoint_diffusers_to_comfy()`), checked for FLUX.2 and Z-Image by diffusers' single-file
converter, which must give back every key with its shape (Chroma's is checked at tiny size by
fixtures/generate_dit_families.py against ComfyUI's model).

Run from the repository root with the fixtures' venv and pinned trees (fixtures/generate_dit_families.py):

    ../venv/ditmore/bin/python tests/data/keys/dit_families.py
"""

import importlib
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.join(ROOT, "fixtures"))
import generate_dit_families as fam  # noqa: E402

import diffusers  # noqa: E402
from diffusers.loaders import single_file_utils  # noqa: E402


def main() -> None:
    fam.gdm.onetrainer()
    from modules.util.convert_util import convert
    from modules.util.enum.ModelType import ModelType

    out = os.path.dirname(os.path.abspath(__file__))
    for family, name in [("flux2", "flux2-dev"), ("chroma", "chroma1"), ("z-image", "z-image")]:
        f = fam.NEW_FAMILIES[family]
        with torch.device("meta"):
            model = getattr(diffusers, f["class"])()
        sd = dict(model.state_dict())
        mod = importlib.import_module(f"modules.model.{f['ot_model'][0]}")
        ot = getattr(mod, f["ot_model"][1])(getattr(ModelType, f["ot_model_type"]))
        ot.transformer = model
        orig = convert(dict(sd), getattr(ot, f["ot_body"])(), strict=family != "z-image")
        if "diffusers_converter" in f:
            back = getattr(single_file_utils, f["diffusers_converter"])(dict(orig))
            assert {k: list(v.shape) for k, v in back.items()} == {k: list(v.shape) for k, v in sd.items()}, family
        for layout, d in (("diffusers", sd), ("original", orig)):
            with open(os.path.join(out, f"{name}.{layout}.tsv"), "w") as fh:
                for k in sorted(d):
                    fh.write(f"{k}\t{list(d[k].shape)}\n")
        print(family, len(sd), len(orig))


if __name__ == "__main__":
    main()
