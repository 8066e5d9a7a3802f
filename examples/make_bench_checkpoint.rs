//! Generate benchmark data for `oftool merge` (see bench/README.md).
//!
//! ```sh
//! cargo run --release --example make_bench_checkpoint -- tests/data/keys/sd15_diffusers_unet.txt OUT_DIR
//! ```
//!
//! Reads a key list (`name<TAB>d0,d1,...` per line, as in `tests/data/keys/*_diffusers_unet.txt`)
//! and writes:
//!
//! * `OUT_DIR/base.safetensors`: a diffusers-named fp16 UNet with those names and shapes, filled
//!   with deterministic pseudo-random values (≈ N(0, 0.02), per-tensor seed from the name, so
//!   the content does not depend on the key order). Written streaming: the header is built from
//!   `safetensors::tensor::Metadata` (offsets computed here and checked by `Metadata::new`),
//!   then each tensor is generated and written in 4 MiB pieces, so memory stays small for a
//!   5 GB SDXL base.
//! * `OUT_DIR/adapter/`: a PEFT 0.21.2 OFT adapter (`adapter_config.json` +
//!   `adapter_model.safetensors`) with block size 32 (r = 0), Cayley–Neumann with 5 terms, on
//!   every weight whose module ends with one of [`TARGETS`] (Linear and 1×1 Conv2d):
//!   `base_model.model.<module>.oft_R.weight`, F32 `[in/32, 32·31/2]`, small random values.
//!
//! With `--adapter-layers N` only the adapter is written, holding the first N targets (in key
//! order), to `OUT_DIR/adapter-N/` (the few-layer variant bench/run.sh uses to measure oftool's
//! streaming cost without the rotations).
//!
//! Options (scripts/gpu-check.sh uses them):
//!
//! * `--dtype bf16`: the base in BF16 instead of F16;
//! * `--oft NAME --block B [--stages S]`: instead of the PEFT adapter, `OUT_DIR/NAME.oft`
//!   written by oftool's own writer: one Cayley layer per targeted weight (the UNet targets
//!   above and a Llama's `q/k/v/o_proj`, `gate/up/down_proj`) on the input side, with the
//!   largest block size ≤ B that divides the input features (S > 1: a BOFT of S butterfly
//!   stages in PEFT's wiring, even block size, 2^(S−1)·b dividing the input features);
//! * `--no-base`: write only the adapter (another adapter for an existing base);
//! * `--shards N` (with `--oft`): the base as a hub-style sharded folder `OUT_DIR/base/`
//!   (`model-0000i-of-0000N.safetensors` + `model.safetensors.index.json`);
//! * `--onetrainer NAME --block B`: only a OneTrainer `OFT_2` COMFY-layout adapter
//!   `OUT_DIR/NAME.safetensors` on every FLUX.1 attention and MLP Linear.
//!
//! KEYS may also be a `../shared/keys/*.tsv` file (`name<TAB>[d0, d1]`); `--oft` then also
//! targets FLUX.1's attention and MLP Linears ([`FLUX_TARGETS`]), named with the base's keys.
//!
//! Existing files are overwritten. Prints a one-line JSON summary on stdout.

use safetensors::tensor::{Dtype, Metadata, TensorInfo};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// PEFT `target_modules` of the benchmark adapter (attention, feed-forward and projections).
const TARGETS: [&str; 8] = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
    "proj_in",
    "proj_out",
];
/// A Llama's projections (`--oft` targets them too).
const LLM_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];
/// FLUX.1's attention and MLP Linears in its original layout (`--oft` and `--onetrainer` target
/// them too): the fused `qkv` and `linear1` get one input-side rotation each.
const FLUX_TARGETS: [&str; 10] = [
    "img_attn.qkv",
    "img_attn.proj",
    "txt_attn.qkv",
    "txt_attn.proj",
    "img_mlp.0",
    "img_mlp.2",
    "txt_mlp.0",
    "txt_mlp.2",
    "linear1",
    "linear2",
];
/// OFT block size.
const BLOCK: usize = 32;
/// Elements generated per write.
const PIECE: usize = 2 << 20;

/// xorshift64*: fast, deterministic, good enough for benchmark filler.
struct Rng(u64);

impl Rng {
    fn new(seed: &str) -> Self {
        let h = blake3::hash(seed.as_bytes());
        let s = u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"));
        Rng(s | 1)
    }
    #[inline]
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Two approximately N(0, sd) values from one draw: each is the sum of two 16-bit uniforms
    /// (triangular distribution, variance 2/12 of the unit range), scaled to standard deviation `sd`.
    #[inline]
    fn pair(&mut self, sd: f32) -> (f32, f32) {
        let x = self.next();
        let u = |s: u32| ((x >> s) & 0xFFFF) as f32 * (1.0 / 65536.0);
        // sum of two U(0,1) − 1 has sd sqrt(1/6)
        let k = sd * 6f32.sqrt();
        ((u(0) + u(16) - 1.0) * k, (u(32) + u(48) - 1.0) * k)
    }
}

fn parse_keys(path: &Path) -> Result<Vec<(String, Vec<usize>)>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, dims) = line.split_once('\t').ok_or_else(|| {
            format!(
                "{}:{}: expected `name<TAB>d0,d1,...`",
                path.display(),
                n + 1
            )
        })?;
        // `d0,d1` (tests/data/keys) or `[d0, d1]` (../shared/keys/*.tsv).
        let dims = dims.trim().trim_start_matches('[').trim_end_matches(']');
        let shape = dims
            .split(',')
            .map(|d| d.trim().parse::<usize>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{}:{}: bad shape `{dims}`: {e}", path.display(), n + 1))?;
        keys.push((name.to_string(), shape));
    }
    keys.sort();
    keys.dedup_by(|a, b| a.0 == b.0);
    Ok(keys)
}

/// Header bytes (length prefix + JSON padded with spaces to a multiple of 8).
fn header_bytes(
    meta: Option<HashMap<String, String>>,
    tensors: Vec<(String, TensorInfo)>,
) -> Result<Vec<u8>, String> {
    let md = Metadata::new(meta, tensors).map_err(|e| format!("bad metadata: {e}"))?;
    let mut json = serde_json::to_vec(&md).map_err(|e| e.to_string())?;
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    Ok(out)
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

fn write_base(keys: &[(String, Vec<usize>)], path: &Path, dtype: Dtype) -> Result<u64, String> {
    let mut offset = 0usize;
    let mut infos = Vec::with_capacity(keys.len());
    for (name, shape) in keys {
        let n = numel(shape) * 2;
        infos.push((
            name.clone(),
            TensorInfo {
                dtype,
                shape: shape.clone(),
                data_offsets: (offset, offset + n),
            },
        ));
        offset += n;
    }
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let header = header_bytes(Some(meta), infos)?;
    let file = File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut w = BufWriter::with_capacity(8 << 20, file);
    let io = |e: std::io::Error| format!("{}: {e}", path.display());
    w.write_all(&header).map_err(io)?;
    let mut f32s = vec![0f32; PIECE];
    let mut halves = vec![half::f16::ZERO; PIECE];
    let mut brains = vec![half::bf16::ZERO; PIECE];
    for (name, shape) in keys {
        let mut rng = Rng::new(name);
        // Norm scales near 1 (as in real checkpoints), everything else ≈ N(0, 0.02).
        let is_norm_weight = name.contains("norm") && name.ends_with(".weight");
        let mut left = numel(shape);
        while left > 0 {
            let m = left.min(PIECE);
            for pair in f32s[..m].chunks_mut(2) {
                let (a, b) = rng.pair(0.02);
                pair[0] = a;
                if pair.len() > 1 {
                    pair[1] = b;
                }
            }
            if is_norm_weight {
                f32s[..m].iter_mut().for_each(|x| *x += 1.0);
            }
            use half::slice::HalfFloatSliceExt;
            if dtype == Dtype::BF16 {
                brains[..m].convert_from_f32_slice(&f32s[..m]);
                w.write_all(bytemuck::cast_slice(&brains[..m]))
                    .map_err(io)?;
            } else {
                halves[..m].convert_from_f32_slice(&f32s[..m]);
                w.write_all(bytemuck::cast_slice(&halves[..m]))
                    .map_err(io)?;
            }
            left -= m;
        }
    }
    let f = w.into_inner().map_err(|e| io(e.into_error()))?;
    f.sync_all().map_err(io)?;
    Ok(header.len() as u64 + offset as u64)
}

/// The targeted weights: (module name, in features = prod(shape[1..])).
fn targets(keys: &[(String, Vec<usize>)]) -> Result<Vec<(String, usize)>, String> {
    let mut out = Vec::new();
    for (name, shape) in keys {
        let Some(module) = name.strip_suffix(".weight") else {
            continue;
        };
        if !TARGETS
            .iter()
            .any(|t| module == *t || module.ends_with(&format!(".{t}")))
        {
            continue;
        }
        let in_features: usize = shape.iter().skip(1).product();
        let conv_1x1 = shape.len() == 4 && shape[2] == 1 && shape[3] == 1;
        if shape.len() != 2 && !conv_1x1 {
            return Err(format!(
                "`{name}` has shape {shape:?}: neither a Linear nor a 1×1 conv weight"
            ));
        }
        if !in_features.is_multiple_of(BLOCK) {
            return Err(format!(
                "`{name}`: {in_features} input features are not a multiple of {BLOCK}"
            ));
        }
        out.push((module.to_string(), in_features));
    }
    Ok(out)
}

fn write_adapter(targets: &[(String, usize)], dir: &Path) -> Result<(u64, usize), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let tri = BLOCK * (BLOCK - 1) / 2;
    let mut infos = Vec::new();
    let mut data: Vec<u8> = Vec::new();
    let mut params = 0usize;
    let mut sorted: Vec<(String, usize)> = targets
        .iter()
        .map(|(m, i)| (format!("base_model.model.{m}.oft_R.weight"), *i))
        .collect();
    sorted.sort();
    for (key, in_features) in &sorted {
        let n = in_features / BLOCK * tri;
        let mut rng = Rng::new(key);
        let start = data.len();
        for _ in 0..n.div_ceil(2) {
            // Small skew entries (≈ N(0, 0.003)): rotation angles of a trained OFT adapter.
            let (a, b) = rng.pair(0.003);
            data.extend_from_slice(&a.to_le_bytes());
            data.extend_from_slice(&b.to_le_bytes());
        }
        data.truncate(start + n * 4);
        infos.push((
            key.clone(),
            TensorInfo {
                dtype: Dtype::F32,
                shape: vec![in_features / BLOCK, tri],
                data_offsets: (start, start + n * 4),
            },
        ));
        params += n;
    }
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let header = header_bytes(Some(meta), infos)?;
    let path = dir.join("adapter_model.safetensors");
    let mut bytes = header;
    bytes.extend_from_slice(&data);
    std::fs::write(&path, &bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| format!("own adapter does not parse: {e}"))?;

    let config = serde_json::json!({
        "auto_mapping": {
            "base_model_class": "UNet2DConditionModel",
            "parent_library": "diffusers.models.unets.unet_2d_condition"
        },
        "base_model_name_or_path": null,
        "bias": "none",
        "block_share": false,
        "coft": false,
        "eps": 6e-05,
        "exclude_modules": null,
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_weights": true,
        "layers_pattern": null,
        "layers_to_transform": null,
        "module_dropout": 0.0,
        "modules_to_save": null,
        "num_cayley_neumann_terms": 5,
        "oft_block_size": BLOCK,
        "peft_type": "OFT",
        "peft_version": "0.21.2",
        "r": 0,
        "revision": null,
        "target_modules": TARGETS,
        "task_type": null,
        "use_cayley_neumann": true
    });
    let cpath = dir.join("adapter_config.json");
    let text = serde_json::to_string_pretty(&config).map_err(|e| e.to_string())?;
    std::fs::write(&cpath, text).map_err(|e| format!("{}: {e}", cpath.display()))?;
    Ok((bytes.len() as u64, params))
}

/// `--oft`: a canonical adapter of synthetic Cayley layers (see the module documentation).
fn write_oft(
    keys: &[(String, Vec<usize>)],
    path: &Path,
    max_block: usize,
    stages: usize,
) -> Result<(usize, usize), String> {
    use oftool::model::*;
    let split = 1usize << stages.saturating_sub(1);
    let mut layers = Vec::new();
    let mut params = 0;
    for (name, shape) in keys {
        let Some(module) = name.strip_suffix(".weight") else {
            continue;
        };
        let hit = |t: &&str| module == *t || module.ends_with(&format!(".{t}"));
        let conv_1x1 = shape.len() == 4 && shape[2] == 1 && shape[3] == 1;
        if !(TARGETS.iter().any(hit) || LLM_TARGETS.iter().any(hit) || FLUX_TARGETS.iter().any(hit))
            || (shape.len() != 2 && !conv_1x1)
        {
            continue;
        }
        let cols: usize = shape.iter().skip(1).product();
        let Some(b) = (2..=max_block)
            .rev()
            .find(|&b| (stages == 1 || b % 2 == 0) && cols.is_multiple_of(b * split))
        else {
            return Err(format!(
                "`{name}`: no block size ≤ {max_block} fits {cols} features"
            ));
        };
        let blocks = cols / b;
        let mut rng = Rng::new(name);
        let stages = (0..stages)
            .map(|i| {
                let n = blocks * (b * (b - 1) / 2);
                params += n;
                Stage {
                    spec: StageSpec {
                        blocks: Some(blocks as u64),
                        block_size: b as u64,
                        shared: false,
                        wiring: if stages > 1 {
                            Wiring::Butterfly {
                                producer: WiringProducer::Peft,
                                index: i as u32,
                            }
                        } else {
                            Wiring::Identity
                        },
                        map: RotationMap::Cayley,
                        q: String::new(),
                        truncated: false,
                    },
                    // Small angles (≈ N(0, 0.003)), as a trained adapter's.
                    q: (0..n).map(|_| rng.pair(0.003).0 as f64).collect(),
                    q_f64: false,
                    inverse: false,
                }
            })
            .collect();
        layers.push(Layer {
            target: Target {
                name: module.to_string(),
                convention: if FLUX_TARGETS.iter().any(hit) {
                    "unknown".into() // the base's own key, as a FLUX.1 single file names it
                } else {
                    "peft".into()
                },
                component: None,
                module: ModuleKind::Unknown,
                shape: None,
                rotated_dim: Some(cols as u64),
                rows: None,
            },
            side: Side::Input,
            stages,
            row_scale: None,
            row_scale_f64: false,
            constraint: None,
            base_binding: None,
        });
    }
    let n = layers.len();
    let adapter = Adapter {
        provenance: Provenance {
            source_format: "synthetic".into(),
            source_version: None,
            tool: tool_name(),
            created: None,
            source_digest: None,
            user_metadata: Default::default(),
        },
        layers,
        features: Vec::new(),
    };
    oftool::oft_file::write(&adapter, path).map_err(|e| e.to_string())?;
    Ok((n, params))
}

/// `--onetrainer`: a OneTrainer `OFT_2` adapter in its COMFY key layout
/// (`diffusion_model.<module>.oft_R.weight`, F32 `[in/b, b·(b−1)/2]`, `ot_config` metadata) on
/// every FLUX.1 attention and MLP Linear: one input-side rotation per fused Linear, as OneTrainer
/// trains them (fixtures/dit/flux1-onetrainer-comfy-original holds a real one).
fn write_onetrainer(
    keys: &[(String, Vec<usize>)],
    path: &Path,
    block: usize,
) -> Result<(usize, usize), String> {
    let tri = block * (block - 1) / 2;
    let mut infos = Vec::new();
    let mut data: Vec<u8> = Vec::new();
    let mut params = 0;
    for (name, shape) in keys {
        let Some(module) = name.strip_suffix(".weight") else {
            continue;
        };
        if shape.len() != 2
            || !FLUX_TARGETS
                .iter()
                .any(|t| module.ends_with(&format!(".{t}")))
        {
            continue;
        }
        let cols = shape[1];
        if !cols.is_multiple_of(block) {
            return Err(format!(
                "`{name}`: {cols} features are not a multiple of {block}"
            ));
        }
        let key = format!("diffusion_model.{module}.oft_R.weight");
        let n = cols / block * tri;
        let mut rng = Rng::new(&key);
        let start = data.len();
        for _ in 0..n {
            data.extend_from_slice(&rng.pair(0.003).0.to_le_bytes());
        }
        infos.push((
            key,
            TensorInfo {
                dtype: Dtype::F32,
                shape: vec![cols / block, tri],
                data_offsets: (start, data.len()),
            },
        ));
        params += n;
    }
    let layers = infos.len();
    let config = serde_json::json!({
        "training_method": "LORA",
        "model_type": "FLUX_DEV_1",
        "output_model_format": "COMFY_LORA",
        "peft_type": "OFT_2",
        "oft_block_size": block,
        "oft_block_share": false,
        "oft_scaled": false,
    });
    let meta = HashMap::from([("ot_config".to_string(), config.to_string())]);
    let mut bytes = header_bytes(Some(meta), infos)?;
    bytes.extend_from_slice(&data);
    std::fs::write(path, &bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((layers, params))
}

/// `--shards N`: the base as a hub-style sharded folder `OUT_DIR/base/` (keys in order, cut
/// into N shards of about equal bytes, `model-0000i-of-0000N.safetensors` and
/// `model.safetensors.index.json`). Returns the folder and the bytes written.
fn write_sharded(
    keys: &[(String, Vec<usize>)],
    dir: &Path,
    shards: usize,
    dtype: Dtype,
) -> Result<(PathBuf, u64), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let total: usize = keys.iter().map(|(_, s)| numel(s) * 2).sum();
    let per = total.div_ceil(shards.max(1));
    let mut groups: Vec<Vec<(String, Vec<usize>)>> = vec![Vec::new()];
    let mut filled = 0;
    for k in keys {
        if filled >= per && groups.len() < shards {
            groups.push(Vec::new());
            filled = 0;
        }
        filled += numel(&k.1) * 2;
        if let Some(g) = groups.last_mut() {
            g.push(k.clone());
        }
    }
    let n = groups.len();
    let mut map = serde_json::Map::new();
    let mut bytes = 0;
    for (i, g) in groups.iter().enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        bytes += write_base(g, &dir.join(&file), dtype)?;
        for (name, _) in g {
            map.insert(name.clone(), serde_json::Value::String(file.clone()));
        }
    }
    let index = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": map });
    let path = dir.join("model.safetensors.index.json");
    let text = serde_json::to_string_pretty(&index).map_err(|e| e.to_string())?;
    std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((path, bytes))
}

/// Command-line options after KEYS.txt and OUT_DIR.
struct Opts {
    only: Option<usize>,
    dtype: Dtype,
    oft: Option<String>,
    block: usize,
    stages: usize,
    base: bool,
    onetrainer: Option<String>,
    shards: usize,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = || -> ! {
        eprintln!(
            "usage: make_bench_checkpoint KEYS.txt OUT_DIR [--adapter-layers N] [--dtype f16|bf16] \
             [--oft NAME --block B [--stages S]] [--onetrainer NAME --block B] [--shards N] [--no-base]"
        );
        std::process::exit(2);
    };
    if args.len() < 3 {
        usage();
    }
    let mut o = Opts {
        only: None,
        dtype: Dtype::F16,
        oft: None,
        block: BLOCK,
        stages: 1,
        base: true,
        onetrainer: None,
        shards: 1,
    };
    let mut it = args[3..].iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().unwrap_or_else(|| usage());
        match a.as_str() {
            "--adapter-layers" => o.only = Some(val().parse().unwrap_or_else(|_| usage())),
            "--dtype" => {
                o.dtype = match val().as_str() {
                    "f16" => Dtype::F16,
                    "bf16" => Dtype::BF16,
                    _ => usage(),
                }
            }
            "--oft" => o.oft = Some(val()),
            "--block" => o.block = val().parse().unwrap_or_else(|_| usage()),
            "--stages" => o.stages = val().parse().unwrap_or_else(|_| usage()),
            "--no-base" => o.base = false,
            "--onetrainer" => o.onetrainer = Some(val()),
            "--shards" => o.shards = val().parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    let only = o.only;
    let keys_path = PathBuf::from(&args[1]);
    let out = PathBuf::from(&args[2]);
    let run = || -> Result<serde_json::Value, String> {
        let keys = parse_keys(&keys_path)?;
        std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
        if let Some(name) = &o.onetrainer {
            let path = out.join(format!("{name}.safetensors"));
            let (layers, params) = write_onetrainer(&keys, &path, o.block)?;
            return Ok(serde_json::json!({
                "adapter": path.display().to_string(),
                "adapter_layers": layers,
                "adapter_parameters": params,
            }));
        }
        if let Some(name) = &o.oft {
            let start = std::time::Instant::now();
            let (base, base_bytes) = if !o.base {
                (String::new(), 0)
            } else if o.shards > 1 {
                let (index, bytes) = write_sharded(&keys, &out.join("base"), o.shards, o.dtype)?;
                (index.display().to_string(), bytes)
            } else {
                let path = out.join("base.safetensors");
                let bytes = write_base(&keys, &path, o.dtype)?;
                (path.display().to_string(), bytes)
            };
            let path = out.join(format!("{name}.oft"));
            let (layers, params) = write_oft(&keys, &path, o.block, o.stages.max(1))?;
            return Ok(serde_json::json!({
                "keys": keys_path.display().to_string(),
                "base": base,
                "tensors": keys.len(),
                "parameters": keys.iter().map(|(_, s)| numel(s)).sum::<usize>(),
                "base_bytes": base_bytes,
                "adapter": path.display().to_string(),
                "adapter_layers": layers,
                "adapter_parameters": params,
                "seconds": start.elapsed().as_secs_f64(),
            }));
        }
        let mut t = targets(&keys)?;
        let start = std::time::Instant::now();
        if let Some(n) = only {
            t.sort();
            t.truncate(n);
            let (adapter_bytes, adapter_params) =
                write_adapter(&t, &out.join(format!("adapter-{n}")))?;
            return Ok(serde_json::json!({
                "keys": keys_path.display().to_string(),
                "adapter_layers": t.len(),
                "adapter_parameters": adapter_params,
                "adapter_bytes": adapter_bytes,
                "seconds": start.elapsed().as_secs_f64(),
            }));
        }
        let base_bytes = if o.base {
            write_base(&keys, &out.join("base.safetensors"), o.dtype)?
        } else {
            0
        };
        let (adapter_bytes, adapter_params) = write_adapter(&t, &out.join("adapter"))?;
        Ok(serde_json::json!({
            "keys": keys_path.display().to_string(),
            "tensors": keys.len(),
            "parameters": keys.iter().map(|(_, s)| numel(s)).sum::<usize>(),
            "base_bytes": base_bytes,
            "adapter_layers": t.len(),
            "adapter_parameters": adapter_params,
            "adapter_bytes": adapter_bytes,
            "seconds": start.elapsed().as_secs_f64(),
        }))
    };
    match run() {
        Ok(v) => println!("{v}"),
        Err(e) => {
            eprintln!("make_bench_checkpoint: {e}");
            std::process::exit(1);
        }
    }
}
