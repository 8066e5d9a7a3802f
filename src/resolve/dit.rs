//! Diffusion transformers (FLUX.1, FLUX.2, Chroma, SD3/3.5, HunyuanVideo, Qwen-Image, Wan, Z-Image,
//! HiDream): the family and base layout of a checkpoint, and the correspondence between the two
//! layouts' module names.
//!
//! Each family is a table ([`FAMILIES`]): one [`Map`] per module of the original single-file
//! layout (BFL / SAI / Tencent names, what ComfyUI, Forge and most downloads use) saying which
//! diffusers modules its rows are made of. Learnt from ComfyUI's `flux_to_diffusers` /
//! `mmdit_to_diffusers` and OneTrainer's `diffusers_to_original` (facts only), and checked
//! against the fixtures' `layout_map`s and `../shared/keys/*.tsv` (`dit_tests.rs`).
//!
//! * [`Kind::Rename`]: the same rows under another name.
//! * [`Kind::Thirds`]: q, k, v stacked on rows, a third each (`img_attn.qkv`, `attn.qkv`).
//! * [`Kind::Linear1`]: q, k, v (as many rows as the layer has input features) and the MLP
//!   input (the rest) stacked on rows (Flux / HunyuanVideo `single_blocks.N.linear1`).
//! * [`Kind::Swap`]: the diffusers tensor with its two row halves swapped (the final adaLN's
//!   shift and scale); [`Kind::SwapIfTwo`]: swapped only when it has two chunks (SD3's last
//!   `context_block.adaLN_modulation.1`, whose block is `context_pre_only`), else a rename.
//!
//! Templates hold `{i}` for a block index. Qwen-Image and HiDream keep the diffusers names in both
//! layouts (no maps: only the prefixes differ, which the generic aliases cover).

// Row-range lists often hold one range: that is a list, not a range to expand.
#![allow(clippy::single_range_in_vec_init)]

use std::ops::Range;

/// How an original-layout tensor is made of diffusers tensors' rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Rename,
    Thirds,
    Linear1,
    Swap,
    SwapIfTwo,
}

/// One original-layout module and the diffusers modules its rows come from, in row order.
#[derive(Debug)]
pub struct Map {
    pub original: &'static str,
    pub kind: Kind,
    pub diffusers: &'static [&'static str],
}

/// A family of diffusion transformers and its name table.
#[derive(Debug)]
pub struct Family {
    /// `flux1`, `flux2`, `chroma`, `sd3`, `hunyuan-video`, `qwen-image`, `wan`, `z-image`,
    /// `hidream`.
    pub id: &'static str,
    /// The family's name in messages.
    pub name: &'static str,
    /// The name table, in groups so that families sharing blocks (FLUX.1 and Chroma) share
    /// one definition of them; read it through [`Family::maps`].
    pub groups: &'static [&'static [Map]],
    /// Modules (in either layout) only this family has: one in a checkpoint or adapter decides
    /// the family; the layout is then the one whose templates match more.
    pub markers: &'static [&'static str],
}

impl Family {
    /// Every module map of the family, in table order.
    pub fn maps(&self) -> impl Iterator<Item = &'static Map> + Clone {
        self.groups.iter().flat_map(|g| g.iter())
    }

    fn has_maps(&self) -> bool {
        self.groups.iter().any(|g| !g.is_empty())
    }
}

const fn m(original: &'static str, kind: Kind, diffusers: &'static [&'static str]) -> Map {
    Map {
        original,
        kind,
        diffusers,
    }
}

use Kind::*;

/// FLUX.1's attention modules, which Chroma shares.
const FLUX_ATTENTION: &[Map] = &[
    m(
        "double_blocks.{i}.img_attn.qkv",
        Thirds,
        &[
            "transformer_blocks.{i}.attn.to_q",
            "transformer_blocks.{i}.attn.to_k",
            "transformer_blocks.{i}.attn.to_v",
        ],
    ),
    m(
        "double_blocks.{i}.txt_attn.qkv",
        Thirds,
        &[
            "transformer_blocks.{i}.attn.add_q_proj",
            "transformer_blocks.{i}.attn.add_k_proj",
            "transformer_blocks.{i}.attn.add_v_proj",
        ],
    ),
    m(
        "double_blocks.{i}.img_attn.proj",
        Rename,
        &["transformer_blocks.{i}.attn.to_out.0"],
    ),
    m(
        "double_blocks.{i}.txt_attn.proj",
        Rename,
        &["transformer_blocks.{i}.attn.to_add_out"],
    ),
];

/// FLUX.1's MLPs and single-block Linears, which Chroma shares.
const FLUX_MLP_AND_SINGLE: &[Map] = &[
    m(
        "double_blocks.{i}.img_mlp.0",
        Rename,
        &["transformer_blocks.{i}.ff.net.0.proj"],
    ),
    m(
        "double_blocks.{i}.img_mlp.2",
        Rename,
        &["transformer_blocks.{i}.ff.net.2"],
    ),
    m(
        "double_blocks.{i}.txt_mlp.0",
        Rename,
        &["transformer_blocks.{i}.ff_context.net.0.proj"],
    ),
    m(
        "double_blocks.{i}.txt_mlp.2",
        Rename,
        &["transformer_blocks.{i}.ff_context.net.2"],
    ),
    m(
        "single_blocks.{i}.linear1",
        Linear1,
        &[
            "single_transformer_blocks.{i}.attn.to_q",
            "single_transformer_blocks.{i}.attn.to_k",
            "single_transformer_blocks.{i}.attn.to_v",
            "single_transformer_blocks.{i}.proj_mlp",
        ],
    ),
    m(
        "single_blocks.{i}.linear2",
        Rename,
        &["single_transformer_blocks.{i}.proj_out"],
    ),
];

/// FLUX.1's final projection and input embedders, which Chroma shares.
const FLUX_PROJECTIONS: &[Map] = &[
    m("final_layer.linear", Rename, &["proj_out"]),
    m("img_in", Rename, &["x_embedder"]),
    m("txt_in", Rename, &["context_embedder"]),
];

pub static FLUX1: Family = Family {
    id: "flux1",
    name: "FLUX.1",
    markers: &[],
    groups: &[
        FLUX_ATTENTION,
        &[
            m(
                "double_blocks.{i}.img_mod.lin",
                Rename,
                &["transformer_blocks.{i}.norm1.linear"],
            ),
            m(
                "double_blocks.{i}.txt_mod.lin",
                Rename,
                &["transformer_blocks.{i}.norm1_context.linear"],
            ),
        ],
        FLUX_MLP_AND_SINGLE,
        &[
            m(
                "single_blocks.{i}.modulation.lin",
                Rename,
                &["single_transformer_blocks.{i}.norm.linear"],
            ),
            m("final_layer.adaLN_modulation.1", Swap, &["norm_out.linear"]),
        ],
        FLUX_PROJECTIONS,
        &[
            m(
                "time_in.in_layer",
                Rename,
                &["time_text_embed.timestep_embedder.linear_1"],
            ),
            m(
                "time_in.out_layer",
                Rename,
                &["time_text_embed.timestep_embedder.linear_2"],
            ),
            m(
                "vector_in.in_layer",
                Rename,
                &["time_text_embed.text_embedder.linear_1"],
            ),
            m(
                "vector_in.out_layer",
                Rename,
                &["time_text_embed.text_embedder.linear_2"],
            ),
            m(
                "guidance_in.in_layer",
                Rename,
                &["time_text_embed.guidance_embedder.linear_1"],
            ),
            m(
                "guidance_in.out_layer",
                Rename,
                &["time_text_embed.guidance_embedder.linear_2"],
            ),
        ],
    ],
};

pub static SD3: Family = Family {
    id: "sd3",
    name: "SD3/SD3.5",
    markers: &["pos_embed.proj"],
    groups: &[&[
        m(
            "joint_blocks.{i}.x_block.attn.qkv",
            Thirds,
            &[
                "transformer_blocks.{i}.attn.to_q",
                "transformer_blocks.{i}.attn.to_k",
                "transformer_blocks.{i}.attn.to_v",
            ],
        ),
        m(
            "joint_blocks.{i}.context_block.attn.qkv",
            Thirds,
            &[
                "transformer_blocks.{i}.attn.add_q_proj",
                "transformer_blocks.{i}.attn.add_k_proj",
                "transformer_blocks.{i}.attn.add_v_proj",
            ],
        ),
        m(
            "joint_blocks.{i}.x_block.attn2.qkv",
            Thirds,
            &[
                "transformer_blocks.{i}.attn2.to_q",
                "transformer_blocks.{i}.attn2.to_k",
                "transformer_blocks.{i}.attn2.to_v",
            ],
        ),
        m(
            "joint_blocks.{i}.x_block.attn.proj",
            Rename,
            &["transformer_blocks.{i}.attn.to_out.0"],
        ),
        m(
            "joint_blocks.{i}.x_block.attn2.proj",
            Rename,
            &["transformer_blocks.{i}.attn2.to_out.0"],
        ),
        m(
            "joint_blocks.{i}.context_block.attn.proj",
            Rename,
            &["transformer_blocks.{i}.attn.to_add_out"],
        ),
        m(
            "joint_blocks.{i}.x_block.adaLN_modulation.1",
            Rename,
            &["transformer_blocks.{i}.norm1.linear"],
        ),
        m(
            "joint_blocks.{i}.context_block.adaLN_modulation.1",
            SwapIfTwo,
            &["transformer_blocks.{i}.norm1_context.linear"],
        ),
        m(
            "joint_blocks.{i}.x_block.mlp.fc1",
            Rename,
            &["transformer_blocks.{i}.ff.net.0.proj"],
        ),
        m(
            "joint_blocks.{i}.x_block.mlp.fc2",
            Rename,
            &["transformer_blocks.{i}.ff.net.2"],
        ),
        m(
            "joint_blocks.{i}.context_block.mlp.fc1",
            Rename,
            &["transformer_blocks.{i}.ff_context.net.0.proj"],
        ),
        m(
            "joint_blocks.{i}.context_block.mlp.fc2",
            Rename,
            &["transformer_blocks.{i}.ff_context.net.2"],
        ),
        m("final_layer.adaLN_modulation.1", Swap, &["norm_out.linear"]),
        m("final_layer.linear", Rename, &["proj_out"]),
        m("x_embedder.proj", Rename, &["pos_embed.proj"]),
        m("context_embedder", Rename, &["context_embedder"]),
        m(
            "t_embedder.mlp.0",
            Rename,
            &["time_text_embed.timestep_embedder.linear_1"],
        ),
        m(
            "t_embedder.mlp.2",
            Rename,
            &["time_text_embed.timestep_embedder.linear_2"],
        ),
        m(
            "y_embedder.mlp.0",
            Rename,
            &["time_text_embed.text_embedder.linear_1"],
        ),
        m(
            "y_embedder.mlp.2",
            Rename,
            &["time_text_embed.text_embedder.linear_2"],
        ),
    ]],
};

pub static HUNYUAN_VIDEO: Family = Family {
    id: "hunyuan-video",
    name: "HunyuanVideo",
    markers: &["context_embedder.token_refiner.refiner_blocks.{i}.attn.to_q"],
    groups: &[&[
        m(
            "txt_in.individual_token_refiner.blocks.{i}.self_attn_qkv",
            Thirds,
            &[
                "context_embedder.token_refiner.refiner_blocks.{i}.attn.to_q",
                "context_embedder.token_refiner.refiner_blocks.{i}.attn.to_k",
                "context_embedder.token_refiner.refiner_blocks.{i}.attn.to_v",
            ],
        ),
        m(
            "txt_in.individual_token_refiner.blocks.{i}.self_attn_proj",
            Rename,
            &["context_embedder.token_refiner.refiner_blocks.{i}.attn.to_out.0"],
        ),
        m(
            "txt_in.individual_token_refiner.blocks.{i}.mlp.fc1",
            Rename,
            &["context_embedder.token_refiner.refiner_blocks.{i}.ff.net.0.proj"],
        ),
        m(
            "txt_in.individual_token_refiner.blocks.{i}.mlp.fc2",
            Rename,
            &["context_embedder.token_refiner.refiner_blocks.{i}.ff.net.2"],
        ),
        m(
            "txt_in.individual_token_refiner.blocks.{i}.adaLN_modulation.1",
            Rename,
            &["context_embedder.token_refiner.refiner_blocks.{i}.norm_out.linear"],
        ),
        m(
            "double_blocks.{i}.img_attn_qkv",
            Thirds,
            &[
                "transformer_blocks.{i}.attn.to_q",
                "transformer_blocks.{i}.attn.to_k",
                "transformer_blocks.{i}.attn.to_v",
            ],
        ),
        m(
            "double_blocks.{i}.txt_attn_qkv",
            Thirds,
            &[
                "transformer_blocks.{i}.attn.add_q_proj",
                "transformer_blocks.{i}.attn.add_k_proj",
                "transformer_blocks.{i}.attn.add_v_proj",
            ],
        ),
        m(
            "double_blocks.{i}.img_attn_proj",
            Rename,
            &["transformer_blocks.{i}.attn.to_out.0"],
        ),
        m(
            "double_blocks.{i}.txt_attn_proj",
            Rename,
            &["transformer_blocks.{i}.attn.to_add_out"],
        ),
        m(
            "double_blocks.{i}.img_mlp.fc1",
            Rename,
            &["transformer_blocks.{i}.ff.net.0.proj"],
        ),
        m(
            "double_blocks.{i}.img_mlp.fc2",
            Rename,
            &["transformer_blocks.{i}.ff.net.2"],
        ),
        m(
            "double_blocks.{i}.txt_mlp.fc1",
            Rename,
            &["transformer_blocks.{i}.ff_context.net.0.proj"],
        ),
        m(
            "double_blocks.{i}.txt_mlp.fc2",
            Rename,
            &["transformer_blocks.{i}.ff_context.net.2"],
        ),
        m(
            "double_blocks.{i}.img_mod.linear",
            Rename,
            &["transformer_blocks.{i}.norm1.linear"],
        ),
        m(
            "double_blocks.{i}.txt_mod.linear",
            Rename,
            &["transformer_blocks.{i}.norm1_context.linear"],
        ),
        m(
            "single_blocks.{i}.linear1",
            Linear1,
            &[
                "single_transformer_blocks.{i}.attn.to_q",
                "single_transformer_blocks.{i}.attn.to_k",
                "single_transformer_blocks.{i}.attn.to_v",
                "single_transformer_blocks.{i}.proj_mlp",
            ],
        ),
        m(
            "single_blocks.{i}.linear2",
            Rename,
            &["single_transformer_blocks.{i}.proj_out"],
        ),
        m(
            "single_blocks.{i}.modulation.linear",
            Rename,
            &["single_transformer_blocks.{i}.norm.linear"],
        ),
        m("final_layer.adaLN_modulation.1", Swap, &["norm_out.linear"]),
        m("final_layer.linear", Rename, &["proj_out"]),
        m("img_in.proj", Rename, &["x_embedder.proj"]),
        m(
            "txt_in.input_embedder",
            Rename,
            &["context_embedder.proj_in"],
        ),
        m(
            "txt_in.c_embedder.linear_1",
            Rename,
            &["context_embedder.time_text_embed.text_embedder.linear_1"],
        ),
        m(
            "txt_in.c_embedder.linear_2",
            Rename,
            &["context_embedder.time_text_embed.text_embedder.linear_2"],
        ),
        m(
            "txt_in.t_embedder.mlp.0",
            Rename,
            &["context_embedder.time_text_embed.timestep_embedder.linear_1"],
        ),
        m(
            "txt_in.t_embedder.mlp.2",
            Rename,
            &["context_embedder.time_text_embed.timestep_embedder.linear_2"],
        ),
        m(
            "time_in.mlp.0",
            Rename,
            &["time_text_embed.timestep_embedder.linear_1"],
        ),
        m(
            "time_in.mlp.2",
            Rename,
            &["time_text_embed.timestep_embedder.linear_2"],
        ),
        m(
            "vector_in.in_layer",
            Rename,
            &["time_text_embed.text_embedder.linear_1"],
        ),
        m(
            "vector_in.out_layer",
            Rename,
            &["time_text_embed.text_embedder.linear_2"],
        ),
        m(
            "guidance_in.mlp.0",
            Rename,
            &["time_text_embed.guidance_embedder.linear_1"],
        ),
        m(
            "guidance_in.mlp.2",
            Rename,
            &["time_text_embed.guidance_embedder.linear_2"],
        ),
    ]],
};

/// Qwen-Image: the same module names in the diffusers and ComfyUI layouts.
pub static QWEN_IMAGE: Family = Family {
    id: "qwen-image",
    name: "Qwen-Image",
    markers: &[
        "transformer_blocks.{i}.img_mod.1",
        "transformer_blocks.{i}.txt_mod.1",
        "transformer_blocks.{i}.img_mlp.net.0.proj",
    ],
    groups: &[],
};

/// Wan 2.x (names only: no fused tensors; no fixture yet). From diffusers'
/// `convert_wan_transformer_to_diffusers` rename table (facts only).
pub static WAN: Family = Family {
    id: "wan",
    name: "Wan 2.x",
    markers: &["blocks.{i}.attn1.to_q", "blocks.{i}.ffn.net.0.proj"],
    groups: &[&[
        m("blocks.{i}.self_attn.q", Rename, &["blocks.{i}.attn1.to_q"]),
        m("blocks.{i}.self_attn.k", Rename, &["blocks.{i}.attn1.to_k"]),
        m("blocks.{i}.self_attn.v", Rename, &["blocks.{i}.attn1.to_v"]),
        m(
            "blocks.{i}.self_attn.o",
            Rename,
            &["blocks.{i}.attn1.to_out.0"],
        ),
        m(
            "blocks.{i}.cross_attn.q",
            Rename,
            &["blocks.{i}.attn2.to_q"],
        ),
        m(
            "blocks.{i}.cross_attn.k",
            Rename,
            &["blocks.{i}.attn2.to_k"],
        ),
        m(
            "blocks.{i}.cross_attn.v",
            Rename,
            &["blocks.{i}.attn2.to_v"],
        ),
        m(
            "blocks.{i}.cross_attn.o",
            Rename,
            &["blocks.{i}.attn2.to_out.0"],
        ),
        m(
            "blocks.{i}.cross_attn.k_img",
            Rename,
            &["blocks.{i}.attn2.add_k_proj"],
        ),
        m(
            "blocks.{i}.cross_attn.v_img",
            Rename,
            &["blocks.{i}.attn2.add_v_proj"],
        ),
        m("blocks.{i}.ffn.0", Rename, &["blocks.{i}.ffn.net.0.proj"]),
        m("blocks.{i}.ffn.2", Rename, &["blocks.{i}.ffn.net.2"]),
        m(
            "time_embedding.0",
            Rename,
            &["condition_embedder.time_embedder.linear_1"],
        ),
        m(
            "time_embedding.2",
            Rename,
            &["condition_embedder.time_embedder.linear_2"],
        ),
        m(
            "text_embedding.0",
            Rename,
            &["condition_embedder.text_embedder.linear_1"],
        ),
        m(
            "text_embedding.2",
            Rename,
            &["condition_embedder.text_embedder.linear_2"],
        ),
        m(
            "time_projection.1",
            Rename,
            &["condition_embedder.time_proj"],
        ),
        m("head.head", Rename, &["proj_out"]),
        m(
            "img_emb.proj.1",
            Rename,
            &["condition_embedder.image_embedder.ff.net.0.proj"],
        ),
        m(
            "img_emb.proj.3",
            Rename,
            &["condition_embedder.image_embedder.ff.net.2"],
        ),
        m("patch_embedding", Rename, &["patch_embedding"]),
    ]],
};

/// FLUX.2 (`Flux2Transformer2DModel`): FLUX.1's double and single blocks, but the modulation is
/// shared (one `double_stream_modulation_img/txt` and `single_stream_modulation` Linear for all
/// blocks, none per block), the MLPs are SwiGLU (`ff.linear_in` / `linear_out`, gate and up stacked
/// alike in both layouts), and the single block's fused `linear1` / `linear2` are one module each in
/// diffusers too (`attn.to_qkv_mlp_proj`, `attn.to_out`). From diffusers'
/// `convert_flux2_transformer_checkpoint_to_diffusers` and OneTrainer's `Flux2Model`
/// `diffusers_to_original` (facts only), checked on the fixtures' `layout_map`s.
pub static FLUX2: Family = Family {
    id: "flux2",
    name: "FLUX.2",
    markers: &[
        "double_stream_modulation_img.linear",
        "double_stream_modulation_img.lin",
        "single_stream_modulation.linear",
        "single_stream_modulation.lin",
        "single_transformer_blocks.{i}.attn.to_qkv_mlp_proj",
        "transformer_blocks.{i}.ff.linear_in",
    ],
    groups: &[&[
        m(
            "double_blocks.{i}.img_attn.qkv",
            Thirds,
            &[
                "transformer_blocks.{i}.attn.to_q",
                "transformer_blocks.{i}.attn.to_k",
                "transformer_blocks.{i}.attn.to_v",
            ],
        ),
        m(
            "double_blocks.{i}.txt_attn.qkv",
            Thirds,
            &[
                "transformer_blocks.{i}.attn.add_q_proj",
                "transformer_blocks.{i}.attn.add_k_proj",
                "transformer_blocks.{i}.attn.add_v_proj",
            ],
        ),
        m(
            "double_blocks.{i}.img_attn.proj",
            Rename,
            &["transformer_blocks.{i}.attn.to_out.0"],
        ),
        m(
            "double_blocks.{i}.txt_attn.proj",
            Rename,
            &["transformer_blocks.{i}.attn.to_add_out"],
        ),
        m(
            "double_blocks.{i}.img_mlp.0",
            Rename,
            &["transformer_blocks.{i}.ff.linear_in"],
        ),
        m(
            "double_blocks.{i}.img_mlp.2",
            Rename,
            &["transformer_blocks.{i}.ff.linear_out"],
        ),
        m(
            "double_blocks.{i}.txt_mlp.0",
            Rename,
            &["transformer_blocks.{i}.ff_context.linear_in"],
        ),
        m(
            "double_blocks.{i}.txt_mlp.2",
            Rename,
            &["transformer_blocks.{i}.ff_context.linear_out"],
        ),
        m(
            "single_blocks.{i}.linear1",
            Rename,
            &["single_transformer_blocks.{i}.attn.to_qkv_mlp_proj"],
        ),
        m(
            "single_blocks.{i}.linear2",
            Rename,
            &["single_transformer_blocks.{i}.attn.to_out"],
        ),
        m(
            "double_stream_modulation_img.lin",
            Rename,
            &["double_stream_modulation_img.linear"],
        ),
        m(
            "double_stream_modulation_txt.lin",
            Rename,
            &["double_stream_modulation_txt.linear"],
        ),
        m(
            "single_stream_modulation.lin",
            Rename,
            &["single_stream_modulation.linear"],
        ),
        m("final_layer.adaLN_modulation.1", Swap, &["norm_out.linear"]),
        m("final_layer.linear", Rename, &["proj_out"]),
        m("img_in", Rename, &["x_embedder"]),
        m("txt_in", Rename, &["context_embedder"]),
        m(
            "time_in.in_layer",
            Rename,
            &["time_guidance_embed.timestep_embedder.linear_1"],
        ),
        m(
            "time_in.out_layer",
            Rename,
            &["time_guidance_embed.timestep_embedder.linear_2"],
        ),
        m(
            "guidance_in.in_layer",
            Rename,
            &["time_guidance_embed.guidance_embedder.linear_1"],
        ),
        m(
            "guidance_in.out_layer",
            Rename,
            &["time_guidance_embed.guidance_embedder.linear_2"],
        ),
    ]],
};

/// Chroma (`ChromaTransformer2DModel`): FLUX.1's blocks without any modulation Linear (no
/// `img_mod` / `txt_mod` / `modulation.lin`, no `norm_out.linear`: the modulations come from the
/// `distilled_guidance_layer` approximator), no `time_in` / `vector_in` / `guidance_in`. From
/// diffusers' `convert_chroma_transformer_checkpoint_to_diffusers` and OneTrainer's `ChromaModel`
/// `diffusers_to_original` (facts only), checked on the fixtures' `layout_map`s.
pub static CHROMA: Family = Family {
    id: "chroma",
    name: "Chroma",
    markers: &[
        "distilled_guidance_layer.layers.{i}.linear_1",
        "distilled_guidance_layer.layers.{i}.in_layer",
        "distilled_guidance_layer.in_proj",
    ],
    groups: &[
        FLUX_ATTENTION,
        FLUX_MLP_AND_SINGLE,
        FLUX_PROJECTIONS,
        &[
            m(
                "distilled_guidance_layer.layers.{i}.in_layer",
                Rename,
                &["distilled_guidance_layer.layers.{i}.linear_1"],
            ),
            m(
                "distilled_guidance_layer.layers.{i}.out_layer",
                Rename,
                &["distilled_guidance_layer.layers.{i}.linear_2"],
            ),
        ],
    ],
};

/// Z-Image (`ZImageTransformer2DModel`): fused `attention.qkv` in the main layers and both
/// refiners (bias-free), `attention.out`, and the patch embedder / final layer outside the
/// diffusers `all_*.2-1` module dicts; every other module keeps its name (`feed_forward.w1/2/3`,
/// `adaLN_modulation.0`, `t_embedder`, `cap_embedder`). The final adaLN is not swapped. From
/// diffusers' `convert_z_image_transformer_checkpoint_to_diffusers` and OneTrainer's `ZImageModel`
/// `checkpoint_diffusers_to_comfy` (facts only), checked on the fixtures' `layout_map`s.
pub static Z_IMAGE: Family = Family {
    id: "z-image",
    name: "Z-Image",
    markers: &["all_x_embedder.2-1", "all_final_layer.2-1.linear"],
    groups: &[&[
        m(
            "layers.{i}.attention.qkv",
            Thirds,
            &[
                "layers.{i}.attention.to_q",
                "layers.{i}.attention.to_k",
                "layers.{i}.attention.to_v",
            ],
        ),
        m(
            "layers.{i}.attention.out",
            Rename,
            &["layers.{i}.attention.to_out.0"],
        ),
        m(
            "noise_refiner.{i}.attention.qkv",
            Thirds,
            &[
                "noise_refiner.{i}.attention.to_q",
                "noise_refiner.{i}.attention.to_k",
                "noise_refiner.{i}.attention.to_v",
            ],
        ),
        m(
            "noise_refiner.{i}.attention.out",
            Rename,
            &["noise_refiner.{i}.attention.to_out.0"],
        ),
        m(
            "context_refiner.{i}.attention.qkv",
            Thirds,
            &[
                "context_refiner.{i}.attention.to_q",
                "context_refiner.{i}.attention.to_k",
                "context_refiner.{i}.attention.to_v",
            ],
        ),
        m(
            "context_refiner.{i}.attention.out",
            Rename,
            &["context_refiner.{i}.attention.to_out.0"],
        ),
        m("x_embedder", Rename, &["all_x_embedder.2-1"]),
        m(
            "final_layer.linear",
            Rename,
            &["all_final_layer.2-1.linear"],
        ),
        m(
            "final_layer.adaLN_modulation.1",
            Rename,
            &["all_final_layer.2-1.adaLN_modulation.1"],
        ),
    ]],
};

/// HiDream-I1 (`HiDreamImageTransformer2DModel`): the same module names in the diffusers and
/// original / ComfyUI layouts (diffusers' `convert_hidream_transformer_to_diffusers` only strips
/// `model.diffusion_model.`; ComfyUI's `comfy.ldm.hidream` model has these names): no maps.
pub static HIDREAM: Family = Family {
    id: "hidream",
    name: "HiDream-I1",
    markers: &[
        "double_stream_blocks.{i}.block.attn1.to_q",
        "double_stream_blocks.{i}.block.attn1.to_q_t",
        "single_stream_blocks.{i}.block.attn1.to_q",
        "double_stream_blocks.{i}.block.ff_i.shared_experts.w1",
        "single_stream_blocks.{i}.block.ff_i.shared_experts.w1",
    ],
    groups: &[],
};

/// Every family, in detection order (a tie goes to the earlier one).
pub static FAMILIES: [&Family; 9] = [
    &FLUX1,
    &FLUX2,
    &CHROMA,
    &HUNYUAN_VIDEO,
    &SD3,
    &QWEN_IMAGE,
    &WAN,
    &Z_IMAGE,
    &HIDREAM,
];

/// Roots a transformer's keys may sit under, longest first.
pub const ROOTS: [&str; 5] = [
    "model.diffusion_model.",
    "diffusion_model.",
    "model.model.",
    "transformer.",
    "",
];

/// The base layout a checkpoint's transformer keys use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseLayout {
    /// diffusers names (`transformer/…`): split q, k, v.
    Diffusers,
    /// The original single-file names (fused qkv, swapped final adaLN).
    Original,
}

impl BaseLayout {
    pub fn as_str(self) -> &'static str {
        match self {
            BaseLayout::Diffusers => "diffusers",
            BaseLayout::Original => "original",
        }
    }
}

/// What a checkpoint's keys say: the family, the layout and the root its keys sit under.
#[derive(Debug, Clone, Copy)]
pub struct Detected {
    pub family: &'static Family,
    pub layout: BaseLayout,
    pub root: &'static str,
}

/// Whether `module` is `template` with `{i}` a block index; returns the index ("" without `{i}`).
pub fn matches<'a>(template: &str, module: &'a str) -> Option<&'a str> {
    match template.split_once("{i}") {
        None => (template == module).then_some(""),
        Some((pre, post)) => {
            let rest = module.strip_prefix(pre)?;
            let digits = rest.strip_suffix(post)?;
            (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())).then_some(digits)
        }
    }
}

pub fn fill(template: &str, index: &str) -> String {
    template.replace("{i}", index)
}

/// Detect the family, layout and root from weight module names (keys without `.weight`): a
/// family's marker (a diffusers module only it has) decides; else the family and layout whose
/// templates match the most modules, with at least one block-level match.
pub fn detect<'a>(modules: impl Iterator<Item = &'a str>) -> Option<Detected> {
    let tops: Vec<&str> = FAMILIES
        .iter()
        .flat_map(|f| {
            f.maps()
                .flat_map(|m| std::iter::once(m.original).chain(m.diffusers.iter().copied()))
                .chain(f.markers.iter().copied())
        })
        .map(|t| t.split('.').next().unwrap_or(t))
        .collect();
    let modules: Vec<&str> = modules
        .filter(|m| {
            ROOTS.iter().any(|r| {
                m.strip_prefix(r)
                    .is_some_and(|rest| tops.contains(&rest.split('.').next().unwrap_or(rest)))
            })
        })
        .collect();
    let score = |family: &'static Family, root: &str, layout: BaseLayout| {
        let mut score = 0;
        let mut block = false;
        for &module in &modules {
            let Some(rest) = module.strip_prefix(root) else {
                continue;
            };
            let hit = templates(family, layout)
                .filter_map(|t| matches(t, rest).map(|i| !i.is_empty()))
                .max();
            if let Some(b) = hit {
                score += 1;
                block |= b;
            }
        }
        (score, block)
    };
    // A module only one family has decides the family (the families share most names); its
    // table's better-matching layout is the layout (a tie: diffusers, as for names both share).
    for family in FAMILIES {
        for root in ROOTS {
            let marked = modules.iter().any(|m| {
                m.strip_prefix(root)
                    .is_some_and(|rest| family.markers.iter().any(|t| matches(t, rest).is_some()))
            });
            if marked {
                let original = score(family, root, BaseLayout::Original).0;
                let diffusers = score(family, root, BaseLayout::Diffusers).0;
                let layout = if original > diffusers {
                    BaseLayout::Original
                } else {
                    BaseLayout::Diffusers
                };
                return Some(Detected {
                    family,
                    layout,
                    root,
                });
            }
        }
    }
    let mut best: Option<(usize, Detected)> = None;
    for family in FAMILIES {
        for root in ROOTS {
            for layout in [BaseLayout::Original, BaseLayout::Diffusers] {
                let (score, block) = score(family, root, layout);
                if !block {
                    continue;
                }
                if best.as_ref().is_none_or(|(s, _)| score > *s) {
                    best = Some((
                        score,
                        Detected {
                            family,
                            layout,
                            root,
                        },
                    ));
                }
            }
        }
    }
    best.map(|(_, d)| d)
}

/// What an adapter's module names say: the families (several when the names are common to
/// them, as diffusers attention names are) and which layout's names it uses.
#[derive(Debug, Clone)]
pub struct Expected {
    pub families: Vec<&'static Family>,
    pub layout: BaseLayout,
}

/// Name prefixes adapters put before a transformer module (dotted or flattened).
const ADAPTER_PREFIXES: [&str; 9] = [
    "transformer.",
    "model.diffusion_model.",
    "diffusion_model.",
    "lycoris_",
    "oft_unet_",
    "lora_unet_",
    "lora_transformer_",
    "unet.",
    "lora_",
];

/// The family and layout an adapter's module names belong to (flattened names compared
/// flattened); `None` when no block-level name of any family matches.
pub fn expected<'a>(names: impl Iterator<Item = &'a str>) -> Option<Expected> {
    let flat = |s: &str| s.replace('.', "_");
    let modules: Vec<String> = names
        .map(|n| {
            let n = n.strip_prefix("base_model.model.").unwrap_or(n);
            let n = ADAPTER_PREFIXES
                .iter()
                .find_map(|p| n.strip_prefix(p))
                .unwrap_or(n);
            flat(n)
        })
        .collect();
    let score = |family: &'static Family, layout: BaseLayout| {
        let ts: Vec<String> = templates(family, layout).map(flat).collect();
        let mut n = 0;
        let mut block = false;
        for m in &modules {
            if let Some(b) = ts
                .iter()
                .filter_map(|t| matches(t, m).map(|i| !i.is_empty()))
                .max()
            {
                n += 1;
                block |= b;
            }
        }
        if block { n } else { 0 }
    };
    for family in FAMILIES {
        let marks: Vec<String> = family.markers.iter().map(|t| flat(t)).collect();
        if modules
            .iter()
            .any(|m| marks.iter().any(|t| matches(t, m).is_some()))
        {
            let layout =
                if score(family, BaseLayout::Original) > score(family, BaseLayout::Diffusers) {
                    BaseLayout::Original
                } else {
                    BaseLayout::Diffusers
                };
            return Some(Expected {
                families: vec![family],
                layout,
            });
        }
    }
    let mut scored: Vec<(usize, &'static Family, BaseLayout)> = Vec::new();
    for family in FAMILIES {
        for layout in [BaseLayout::Original, BaseLayout::Diffusers] {
            scored.push((score(family, layout), family, layout));
        }
    }
    let best = scored.iter().map(|s| s.0).max().filter(|&n| n > 0)?;
    let top: Vec<&(usize, &'static Family, BaseLayout)> =
        scored.iter().filter(|s| s.0 == best).collect();
    let layout = top.first()?.2;
    Some(Expected {
        families: top.iter().filter(|s| s.2 == layout).map(|s| s.1).collect(),
        layout,
    })
}

/// The module templates of a family in one layout (markers count for both layouts when a family
/// keeps the diffusers names; other families' markers are among their maps' templates).
fn templates(family: &'static Family, layout: BaseLayout) -> impl Iterator<Item = &'static str> {
    let maps = family.maps().flat_map(move |m| match layout {
        BaseLayout::Original => std::slice::from_ref(&m.original).iter().copied(),
        BaseLayout::Diffusers => m.diffusers.iter().copied(),
    });
    let markers = family
        .markers
        .iter()
        .copied()
        .filter(move |_| !family.has_maps());
    maps.chain(markers)
}

/// One part of an original-layout tensor: which diffusers module (index into the map's list),
/// the rows of the original it is, and the rows of that diffusers tensor they hold.
pub type Part = (usize, Range<usize>, Range<usize>);

/// The rows of an original-layout tensor of `rows` × `cols` that each part of `map` covers, in
/// the original's row order: `(index into map.diffusers, rows of the original, rows of that
/// diffusers tensor)`. `None` when the shape does not divide as the map says.
pub fn original_parts(map: &Map, rows: usize, cols: usize) -> Option<Vec<Part>> {
    match map.kind {
        Rename => Some(vec![(0, 0..rows, 0..rows)]),
        Thirds => {
            rows.is_multiple_of(3).then_some(())?;
            let n = rows / 3;
            Some((0..3).map(|j| (j, j * n..(j + 1) * n, 0..n)).collect())
        }
        Linear1 => {
            let rest = rows.checked_sub(3 * cols)?;
            let mut v: Vec<_> = (0..3)
                .map(|j| (j, j * cols..(j + 1) * cols, 0..cols))
                .collect();
            v.push((3, 3 * cols..rows, 0..rest));
            Some(v)
        }
        Swap => swapped(rows),
        SwapIfTwo => {
            if rows == 2 * cols {
                swapped(rows)
            } else {
                Some(vec![(0, 0..rows, 0..rows)])
            }
        }
    }
}

fn swapped(rows: usize) -> Option<Vec<Part>> {
    rows.is_multiple_of(2).then_some(())?;
    let h = rows / 2;
    Some(vec![(0, 0..h, h..rows), (0, h..rows, 0..h)])
}

/// The parts of a fused original module on a diffusers base, in the original's row order:
/// `(index into map.diffusers, rows of that diffusers tensor)`, from the diffusers tensors'
/// `(rows, cols)` (`None` where one is missing or the shapes do not fit the map).
pub fn diffusers_parts(
    map: &Map,
    shapes: &[Option<(usize, usize)>],
) -> Option<Vec<(usize, Range<usize>)>> {
    let all: Option<Vec<(usize, usize)>> = shapes.iter().copied().collect();
    let all = all?;
    match map.kind {
        Rename => Some(vec![(0, 0..all.first()?.0)]),
        Thirds | Linear1 => {
            let cols = all.first()?.1;
            if all.iter().any(|s| s.1 != cols) {
                return None;
            }
            Some(all.iter().enumerate().map(|(j, s)| (j, 0..s.0)).collect())
        }
        Swap => {
            let rows = all.first()?.0;
            swapped(rows).map(|v| v.into_iter().map(|(j, _, d)| (j, d)).collect())
        }
        SwapIfTwo => {
            let (rows, cols) = *all.first()?;
            if rows == 2 * cols {
                swapped(rows).map(|v| v.into_iter().map(|(j, _, d)| (j, d)).collect())
            } else {
                Some(vec![(0, 0..rows)])
            }
        }
    }
}

/// Where a module name sits in the family tables: the map, which of its modules (`part`: the
/// index into [`Map::diffusers`] for a diffusers name, `None` for the original name) and the
/// block index the templates' `{i}` stands for.
#[derive(Debug, Clone)]
pub struct Place {
    pub map: &'static Map,
    pub part: Option<usize>,
    pub index: String,
}

impl Place {
    /// The layout the name was in.
    pub fn layout(&self) -> BaseLayout {
        match self.part {
            Some(_) => BaseLayout::Diffusers,
            None => BaseLayout::Original,
        }
    }
}

/// A module as another layout names it: the module (bare, no root or adapter prefix) and, for a
/// split module that is some rows of a fused one, which part of the fused module it is
/// (`part` indexes [`Map::diffusers`], whose row order [`original_parts`] gives).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counterpart {
    pub module: String,
    pub part: Option<usize>,
}

/// The bare module of an adapter or base name: without PEFT's wrapper, an adapter prefix or a
/// root, flattened (`_` for `.`) when `flat`.
fn bare(name: &str) -> (String, bool) {
    let n = name.strip_prefix("base_model.model.").unwrap_or(name);
    let n = ADAPTER_PREFIXES
        .iter()
        .chain(ROOTS.iter().filter(|r| !r.is_empty()))
        .find_map(|p| n.strip_prefix(p))
        .unwrap_or(n);
    let flat = !n.contains('.');
    (n.to_string(), flat)
}

/// Where `name` (a module of an adapter or a base, dotted or flattened, under any prefix) sits
/// in the tables of `families` (every family when empty): the first family whose templates
/// match it, original names before diffusers ones. `None` for a name no map holds (a family
/// without fused layers, such as Qwen-Image, keeps its names in both layouts).
pub fn place(name: &str, families: &[&'static Family]) -> Option<Place> {
    place_as(name, families, BaseLayout::Original)
        .or_else(|| place_as(name, families, BaseLayout::Diffusers))
}

/// [`place`] among the names of one layout only (some modules have the same name in one
/// family's original layout and another's diffusers one: SD3's `context_embedder`).
pub fn place_as(name: &str, families: &[&'static Family], layout: BaseLayout) -> Option<Place> {
    let (module, flat) = bare(name);
    let families: Vec<&'static Family> = if families.is_empty() {
        FAMILIES.to_vec()
    } else {
        families.to_vec()
    };
    let hit = |template: &str| -> Option<String> {
        if flat {
            matches(&template.replace('.', "_"), &module).map(str::to_string)
        } else {
            matches(template, &module).map(str::to_string)
        }
    };
    if layout == BaseLayout::Original {
        for family in &families {
            for map in family.maps() {
                if let Some(index) = hit(map.original) {
                    return Some(Place {
                        map,
                        part: None,
                        index,
                    });
                }
            }
        }
        return None;
    }
    for family in &families {
        for map in family.maps() {
            for (j, t) in map.diffusers.iter().enumerate() {
                if let Some(index) = hit(t) {
                    return Some(Place {
                        map,
                        part: Some(j),
                        index,
                    });
                }
            }
        }
    }
    None
}

/// The resolver query the writers ask: which modules a module at `place` is in base layout
/// `to`, in the fused module's row order. The original name of a fused module is several
/// diffusers modules (each `part` some rows of it, [`original_parts`]); a diffusers module is
/// the one original module it is (some of) the rows of; a renamed module is one module.
pub fn counterparts(place: &Place, to: BaseLayout) -> Vec<Counterpart> {
    let map = place.map;
    match (place.part, to) {
        (None, BaseLayout::Original) => vec![Counterpart {
            module: fill(map.original, &place.index),
            part: None,
        }],
        (Some(j), BaseLayout::Diffusers) => vec![Counterpart {
            module: fill(
                map.diffusers[j.min(map.diffusers.len().saturating_sub(1))],
                &place.index,
            ),
            part: None,
        }],
        (None, BaseLayout::Diffusers) => {
            let fused = map.diffusers.len() > 1;
            map.diffusers
                .iter()
                .enumerate()
                .map(|(j, t)| Counterpart {
                    module: fill(t, &place.index),
                    part: fused.then_some(j),
                })
                .collect()
        }
        (Some(j), BaseLayout::Original) => vec![Counterpart {
            module: fill(map.original, &place.index),
            part: (map.diffusers.len() > 1).then_some(j),
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_match_block_indices() {
        assert_eq!(
            matches(
                "double_blocks.{i}.img_attn.qkv",
                "double_blocks.12.img_attn.qkv"
            ),
            Some("12")
        );
        assert_eq!(
            matches(
                "double_blocks.{i}.img_attn.qkv",
                "double_blocks..img_attn.qkv"
            ),
            None
        );
        assert_eq!(
            matches(
                "double_blocks.{i}.img_attn.qkv",
                "double_blocks.x.img_attn.qkv"
            ),
            None
        );
        assert_eq!(
            matches("final_layer.linear", "final_layer.linear"),
            Some("")
        );
    }

    #[test]
    fn parts_of_fused_tensors() {
        let linear1 = FLUX1.maps().nth(10).unwrap();
        assert_eq!(linear1.kind, Linear1);
        let p = original_parts(linear1, 112, 16).unwrap();
        assert_eq!(p[3], (3, 48..112, 0..64));
        assert!(original_parts(linear1, 40, 16).is_none());
        let swap = original_parts(&m("a", Swap, &["b"]), 32, 16).unwrap();
        assert_eq!(swap, vec![(0, 0..16, 16..32), (0, 16..32, 0..16)]);
        let two = m("a", SwapIfTwo, &["b"]);
        assert_eq!(
            original_parts(&two, 96, 16).unwrap(),
            vec![(0, 0..96, 0..96)]
        );
        assert_eq!(
            diffusers_parts(&two, &[Some((32, 16))]).unwrap(),
            vec![(0, 16..32), (0, 0..16)]
        );
    }

    #[test]
    fn counterparts_in_either_layout() {
        let names = |n: &str, to| {
            let p = place(n, &[]).unwrap();
            counterparts(&p, to)
                .into_iter()
                .map(|c| (c.module, c.part))
                .collect::<Vec<_>>()
        };
        let fused = names(
            "diffusion_model.single_blocks.3.linear1",
            BaseLayout::Diffusers,
        );
        assert_eq!(fused.len(), 4);
        assert_eq!(
            fused[3],
            ("single_transformer_blocks.3.proj_mlp".to_string(), Some(3))
        );
        assert_eq!(
            names(
                "lycoris_transformer_blocks_0_attn_to_k",
                BaseLayout::Original
            ),
            vec![("double_blocks.0.img_attn.qkv".to_string(), Some(1))]
        );
        assert_eq!(
            names(
                "model.model.final_layer.adaLN_modulation.1",
                BaseLayout::Diffusers
            ),
            vec![("norm_out.linear".to_string(), None)]
        );
        let p = place("transformer.transformer_blocks.2.attn.to_v", &[]).unwrap();
        assert_eq!(
            (p.layout(), p.part, p.index.as_str()),
            (BaseLayout::Diffusers, Some(2), "2")
        );
        assert!(place("lm_head", &[]).is_none());
    }

    #[test]
    fn detection_by_score() {
        let flux = [
            "model.diffusion_model.double_blocks.0.img_attn.qkv",
            "model.diffusion_model.final_layer.linear",
        ];
        let d = detect(flux.iter().copied()).unwrap();
        assert_eq!(
            (d.family.id, d.layout, d.root),
            ("flux1", BaseLayout::Original, "model.diffusion_model.")
        );
        let hy = [
            "transformer_blocks.0.attn.to_q",
            "context_embedder.token_refiner.refiner_blocks.0.attn.to_q",
        ];
        let d = detect(hy.iter().copied()).unwrap();
        assert_eq!(
            (d.family.id, d.layout),
            ("hunyuan-video", BaseLayout::Diffusers)
        );
        assert!(detect(["proj_out", "lm_head"].iter().copied()).is_none());
        let wan = ["blocks.0.self_attn.q", "blocks.0.ffn.0", "head.head"];
        let d = detect(wan.iter().copied()).unwrap();
        assert_eq!((d.family.id, d.layout), ("wan", BaseLayout::Original));
        let e = expected(["oft_unet_double_blocks_0_img_attn_qkv"].into_iter()).unwrap();
        assert_eq!(e.families[0].id, "flux1");
        assert_eq!(e.layout, BaseLayout::Original);
        let e = expected(["lycoris_transformer_blocks_0_attn_to_q"].into_iter()).unwrap();
        assert_eq!(e.layout, BaseLayout::Diffusers);
        assert!(e.families.len() > 1, "common to several families");
    }
}
