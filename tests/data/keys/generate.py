"""Regenerate the key-list fixtures of tests/resolve.rs (run with a Python that has diffusers,
transformers and torch; nothing is downloaded: models are built from their configs on the meta
device, so only names and shapes exist).

Files written next to this script:

* `<model>_diffusers_unet.txt`  diffusers UNet2DConditionModel state-dict keys and shapes (sd15,
                                sdxl; SD2's U-Net has SD1.5's names);
* `<model>_single.txt`          the keys of a single-file checkpoint (ldm/sgm names: U-Net under
                                `model.diffusion_model.`, text encoders under `cond_stage_model.` or
                                `conditioner.embedders.N.`), with shapes;
* `<model>_unet_pairs.txt`      `diffusers key <TAB> ldm key` for every U-Net tensor;
* `<model>_te_pairs.txt`        `component <TAB> HF key <TAB> checkpoint key <TAB> start <TAB> len`
                                (start/len empty unless the HF tensor is a row slice of a fused one).

The ldm names are produced here by a small rule set and then checked against diffusers' own
ldm -> diffusers converters (`convert_ldm_unet_checkpoint`, `convert_ldm_clip_checkpoint`,
`convert_open_clip_checkpoint`), which act as the oracle: every checkpoint tensor is tagged with
a unique value, and each pair is read back from where diffusers put that value.
"""

import os
import re

import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_open_clip_checkpoint,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

HERE = os.path.dirname(os.path.abspath(__file__))

SD15 = dict(
    sample_size=64,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SD2 = dict(SD15, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
SDXL = dict(
    sample_size=128,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
              projection_dim=768, hidden_act="quick_gelu")
OPENCLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
                  projection_dim=1024, hidden_act="gelu")
OPENCLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
                     projection_dim=1280, hidden_act="gelu")

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
BASIC = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
         "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
         "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def meta_state(model_cls, **cfg):
    with torch.device("meta"):
        m = model_cls(**cfg) if not isinstance(cfg.get("config"), CLIPTextConfig) else model_cls(cfg["config"])
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def unet_to_ldm(cfg, dkey):
    """Rule-based diffusers -> ldm name (checked against diffusers' converter below)."""
    lpb = cfg["layers_per_block"]
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", dkey)
    if m:
        x, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = 1 + (lpb + 1) * x + i
        if kind == "resnets":
            return f"input_blocks.{n}.0.{resnet_rest(rest)}"
        return f"input_blocks.{n}.1.{rest}"
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", dkey)
    if m:
        x = int(m[1])
        return f"input_blocks.{1 + (lpb + 1) * x + lpb}.0.op.{m[2]}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", dkey)
    if m:
        j = 2 * int(m[2]) + (0 if m[1] == "resnets" else 1)
        rest = resnet_rest(m[3]) if m[1] == "resnets" else m[3]
        return f"middle_block.{j}.{rest}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", dkey)
    if m:
        x, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = (lpb + 1) * x + i
        if kind == "resnets":
            return f"output_blocks.{n}.0.{resnet_rest(rest)}"
        return f"output_blocks.{n}.1.{rest}"
    m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", dkey)
    if m:
        x = int(m[1])
        has_attn = cfg["up_block_types"][x].startswith("CrossAttn")
        return f"output_blocks.{(lpb + 1) * x + lpb}.{2 if has_attn else 1}.conv.{m[2]}"
    for d, l in BASIC.items():
        if dkey.startswith(d + "."):
            return l + dkey[len(d):]
    raise ValueError(dkey)


def resnet_rest(rest):
    head, tail = rest.rsplit(".", 1)
    return f"{RESNET[head]}.{tail}"


def unet_pairs(cfg):
    dstate = meta_state(UNet2DConditionModel, **cfg)
    pairs = {d: unet_to_ldm(cfg, d) for d in dstate}
    # Oracle: diffusers' own ldm -> diffusers conversion must put each tagged tensor exactly where
    # the rules say, and use every ldm tensor.
    ldm = {"model.diffusion_model." + l: torch.tensor([float(i)]) for i, l in enumerate(pairs.values())}
    tag = {i: "model.diffusion_model." + l for i, l in enumerate(pairs.values())}
    out = convert_ldm_unet_checkpoint(ldm, dict(cfg))
    assert set(out) == set(dstate), set(out) ^ set(dstate)
    used = set()
    for d, t in out.items():
        src = tag[int(t[0].item())]
        assert src == "model.diffusion_model." + pairs[d], (d, src, pairs[d])
        used.add(src)
    assert used == set(ldm), set(ldm) - used
    return dstate, pairs


def clip_hf(cfg, with_projection):
    config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **cfg)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    with torch.device("meta"):
        m = cls(config)
    st = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    # transformers 5 drops the `text_model.` level of CLIPTextModel; SD checkpoints keep it.
    return {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): s for k, s in st.items()}


def hf_clip_single(prefix, hf, component):
    """HF CLIP inside a single file (`cond_stage_model.transformer.`, `conditioner.embedders.0.transformer.`)."""
    keys = {prefix + k: s for k, s in hf.items() if not k.startswith("text_projection")}
    keys[prefix + "text_model.embeddings.position_ids"] = (1, 77)
    tagged = {k: torch.tensor([float(i)]) for i, k in enumerate(keys)}
    names = list(keys)
    out = convert_ldm_clip_checkpoint(tagged)
    rows = []
    for hk, t in out.items():
        src = names[int(t[0].item())]
        if hk.endswith("position_ids"):
            continue
        assert src == prefix + hk, (src, hk)
        rows.append((component, hk, src, "", ""))
    return keys, rows


def openclip_single(prefix, hf, layers, component, extra_layer=False):
    """OpenCLIP text tower in a single file (`cond_stage_model.model.`, `conditioner.embedders.1.model.`)."""
    d = hf["text_model.final_layer_norm.weight"][0]
    ff = hf["text_model.encoder.layers.0.mlp.fc1.weight"][0]
    keys = {prefix + "positional_embedding": (77, d), prefix + "token_embedding.weight": (49408, d),
            prefix + "ln_final.weight": (d,), prefix + "ln_final.bias": (d,),
            prefix + "text_projection": (d, d), prefix + "logit_scale": ()}
    for i in range(layers + (1 if extra_layer else 0)):
        r = f"{prefix}transformer.resblocks.{i}."
        keys.update({r + "attn.in_proj_weight": (3 * d, d), r + "attn.in_proj_bias": (3 * d,),
                     r + "attn.out_proj.weight": (d, d), r + "attn.out_proj.bias": (d,),
                     r + "ln_1.weight": (d,), r + "ln_1.bias": (d,), r + "ln_2.weight": (d,), r + "ln_2.bias": (d,),
                     r + "mlp.c_fc.weight": (ff, d), r + "mlp.c_fc.bias": (ff,),
                     r + "mlp.c_proj.weight": (d, ff), r + "mlp.c_proj.bias": (d,)})
    # Oracle: tag every row of every tensor (first axis) with a global index.
    names, tagged, base = list(keys), {}, 0
    starts = {}
    for k in names:
        s = keys[k]
        n = s[0] if s else 1
        starts[k] = base
        t = torch.arange(base, base + n, dtype=torch.float64)
        tagged[k] = t.reshape(n, 1) if len(s) >= 2 else t.reshape(s) if s else t.reshape(())
        base += n
    text_model = type("M", (), {"config": type("C", (), {"hidden_size": d})()})()
    if prefix.startswith("cond_stage_model"):
        # diffusers drops SD2's last (unused) layer by its full key name; keep all here.
        import diffusers.loaders.single_file_utils as sfu
        saved, sfu.SD_2_TEXT_ENCODER_KEYS_TO_IGNORE = sfu.SD_2_TEXT_ENCODER_KEYS_TO_IGNORE, []
    try:
        out = convert_open_clip_checkpoint(text_model, tagged, prefix=prefix)
    finally:
        if prefix.startswith("cond_stage_model"):
            sfu.SD_2_TEXT_ENCODER_KEYS_TO_IGNORE = saved
    by_start = {v: k for k, v in starts.items()}
    rows = []
    for hk, t in sorted(out.items()):
        if hk == "text_projection.weight":
            continue  # transposed, not a row slice
        flat = t.reshape(-1) if t.dim() <= 1 else t[:, 0]
        first = int(flat.reshape(-1)[0].item())
        src = max(k for k in starts.values() if k <= first)
        src_key = by_start[src]
        full = keys[src_key][0] if keys[src_key] else 1
        length = flat.numel() if t.dim() >= 1 else 1
        if first == src and length == full:
            rows.append((component, hk, src_key, "", ""))
        else:
            rows.append((component, hk, src_key, str(first - src), str(length)))
    expected = {k for k in hf if not k.startswith("text_projection")}
    if extra_layer:
        expected |= {k.replace(f"layers.{layers - 1}.", f"layers.{layers}.") for k in hf
                     if f"layers.{layers - 1}." in k}
    assert {r[1] for r in rows} == expected, {r[1] for r in rows} ^ expected
    return keys, rows


def write(name, lines):
    with open(os.path.join(HERE, name), "w") as f:
        for line in lines:
            f.write(line + "\n")


def shape_str(s):
    return ",".join(str(x) for x in s)


def main():
    for model, cfg in (("sd15", SD15), ("sd2", SD2), ("sdxl", SDXL)):
        dstate, pairs = unet_pairs(cfg)
        if model != "sd2":  # SD2's U-Net names are SD1.5's (only some shapes differ)
            write(f"{model}_diffusers_unet.txt", [f"{k}\t{shape_str(s)}" for k, s in sorted(dstate.items())])
            write(f"{model}_unet_pairs.txt", [f"{d}\t{l}" for d, l in sorted(pairs.items())])
        single = {"model.diffusion_model." + pairs[d]: s for d, s in dstate.items()}
        if model == "sd15":
            keys, te = hf_clip_single("cond_stage_model.transformer.", clip_hf(CLIP_L, False), "text_encoder")
            single.update(keys)
        elif model == "sd2":
            keys, te = openclip_single("cond_stage_model.model.", clip_hf(OPENCLIP_H, False), 23,
                                       "text_encoder", extra_layer=True)
            single.update(keys)
        else:
            k1, te1 = hf_clip_single("conditioner.embedders.0.transformer.", clip_hf(CLIP_L, False), "text_encoder")
            k2, te2 = openclip_single("conditioner.embedders.1.model.", clip_hf(OPENCLIP_BIGG, True), 32,
                                      "text_encoder_2")
            single.update(k1)
            single.update(k2)
            te = te1 + te2
        # A few VAE tensors, as in real single files (never adapter targets).
        for k, s in (("first_stage_model.encoder.conv_in.weight", (128, 3, 3, 3)),
                     ("first_stage_model.encoder.down.0.block.0.conv1.weight", (128, 128, 3, 3)),
                     ("first_stage_model.decoder.up.0.block.0.conv1.weight", (128, 256, 3, 3)),
                     ("first_stage_model.decoder.mid.attn_1.q.weight", (512, 512, 1, 1)),
                     ("first_stage_model.quant_conv.weight", (8, 8, 1, 1))):
            single[k] = s
        write(f"{model}_single.txt", [f"{k}\t{shape_str(s)}" for k, s in sorted(single.items())])
        write(f"{model}_te_pairs.txt", ["\t".join(r) for r in sorted(te)])
        print(model, len(dstate), len(single), len(te))


if __name__ == "__main__":
    main()
