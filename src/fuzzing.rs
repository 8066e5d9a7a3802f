//! Entry points for the fuzz targets in `fuzz/` and the corpus replay test
//! (`tests/fuzz_corpus.rs`): each takes arbitrary bytes, runs one reader of outside data the way
//! the command line does, and must return (with an error or not) — never panic, never hang,
//! never allocate without bound. Not a stable API.

use crate::layouts::{self, Context};
use crate::model::Adapter;
use crate::resolve::AliasTable;
use crate::tensors::{OwnedTensor, write_owned};
use std::path::PathBuf;

/// A private scratch directory per process (RAM-backed where the system has one).
fn scratch() -> PathBuf {
    let root = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = root.join(format!("oftool-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    dir
}

fn f32_tensor(name: String, shape: Vec<usize>, bytes: Vec<u8>) -> OwnedTensor {
    OwnedTensor {
        name,
        dtype: safetensors::Dtype::F32,
        shape,
        bytes,
    }
}

fn write(name: &str, data: &[u8]) -> PathBuf {
    let p = scratch().join(name);
    let _ = std::fs::write(&p, data);
    p
}

/// What every command does with an adapter once read: check it, report it, write it in every
/// layout of the registry that oftool writes (in memory), and serialise it as `.oft`. Returns
/// the layouts it wrote through.
fn exercise(adapter: &Adapter) -> Vec<&'static str> {
    let _ = crate::validate::check_adapter(adapter);
    let _ = crate::inspect::report(std::path::Path::new("fuzz"), "fuzz", None, adapter);
    let ctx = Context {
        dit_names: None,
        base: None,
        table: None,
        sd1: None,
    };
    let mut tried = Vec::new();
    for (layout, write) in layouts::writers() {
        if let Ok(w) = write(adapter, &ctx) {
            for f in &w.files {
                let _ = layouts::report::file_bytes(f);
            }
        }
        tried.push(layout.id);
    }
    let mut out = Vec::new();
    let _ = crate::oft_file::write_to(adapter, &mut out);
    tried
}

/// The `.oft` reader: container, manifest, digest.
pub fn oft_reader(data: &[u8]) {
    let p = write("in.oft", data);
    if let Ok(a) = crate::oft_file::read(&p) {
        exercise(&a);
    }
}

/// Layout detection and every safetensors/pickle importer, as `inspect FILE` runs them.
pub fn any_adapter(data: &[u8]) {
    let p = write("in.safetensors", data);
    if let Ok(a) = layouts::load(&p) {
        exercise(&a);
    }
}

/// A PEFT directory whose `adapter_config.json` is `data`, beside fixed small weights of each
/// PEFT layout (≥ 0.16, ≤ 0.15, BOFT).
pub fn peft_config(data: &[u8]) {
    let dir = scratch().join("peft");
    for (sub, tensors) in [
        (
            "new",
            vec![("base_model.model.a.oft_R.weight", vec![2usize, 6])],
        ),
        (
            "old",
            vec![
                ("base_model.model.a.oft_r", vec![2, 4, 4]),
                ("base_model.model.a.oft_s", vec![8, 1]),
            ],
        ),
        (
            "boft",
            vec![
                ("base_model.model.a.boft_R", vec![1, 2, 4, 4]),
                ("base_model.model.a.boft_s", vec![8, 1]),
            ],
        ),
    ] {
        let d = dir.join(sub);
        let _ = std::fs::create_dir_all(&d);
        let _ = std::fs::write(d.join("adapter_config.json"), data);
        let w = d.join("adapter_model.safetensors");
        if !w.is_file() {
            let owned: Vec<OwnedTensor> = tensors
                .iter()
                .map(|(n, s)| {
                    let len: usize = s.iter().product();
                    let bytes = (0..len)
                        .flat_map(|i| (0.01 * (i % 7) as f32).to_le_bytes())
                        .collect();
                    f32_tensor(n.to_string(), s.clone(), bytes)
                })
                .collect();
            if let Ok(mut f) = std::fs::File::create(&w) {
                let _ = write_owned(&mut f, &owned, Default::default());
            }
        }
        if let Ok(a) = layouts::load(&d) {
            exercise(&a);
        }
    }
}

/// The restricted `torch.save` reader.
pub fn pickle(data: &[u8]) {
    let p = write("in.bin", data);
    let _ = crate::pickle::read_state_dict(&p);
}

/// The name resolver: lines are base keys (`name` or `name<TAB>d0,d1,…`), the last line the
/// target name (`component:name` sets the component).
pub fn resolver(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut lines: Vec<&str> = text.lines().collect();
    let Some(target) = lines.pop() else { return };
    let keys: Vec<(String, Vec<usize>)> = lines
        .iter()
        .take(4096)
        .map(|l| {
            let (k, s) = l.split_once('\t').unwrap_or((l, ""));
            let shape = s
                .split(',')
                .filter_map(|x| x.parse().ok())
                .take(8)
                .collect();
            (k.to_string(), shape)
        })
        .collect();
    let (component, name) = match target.split_once(':') {
        Some((c, n)) => (Some(c.to_string()), n),
        None => (None, target),
    };
    let t = crate::model::Target {
        name: name.to_string(),
        convention: "unknown".into(),
        component,
        module: Default::default(),
        shape: None,
        rotated_dim: None,
        rows: None,
    };
    let plain = AliasTable::new(keys.iter().map(|(k, _)| k.as_str()));
    let _ = plain.resolve(&t);
    let shaped = AliasTable::with_shapes(keys.iter().map(|(k, s)| (k.as_str(), s.clone())));
    if let Ok(r) = shaped.resolve(&t) {
        let names = shaped.pipeline_names();
        let _ = names.of(&r);
        let _ = names.ldm(&r);
    }
}

/// Structured safetensors: the bytes choose OFT-like tensor names, shapes and values, so that
/// the importers' own checks (not only the header parser) are exercised.
pub fn structured(data: &[u8]) {
    const PREFIXES: [&str; 8] = [
        "base_model.model.down_blocks.0.attentions.0.proj_in",
        "lora_unet_down_blocks_0_resnets_0_conv1",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "oft_unet_mid_block_attentions_0_proj_out",
        "lycoris_up_blocks_1_attentions_0_to_q",
        "diffusion_model.input_blocks.1.1.proj_in",
        "x.processor.to_q_oft",
        "base_model.model.model.layers.0.mlp.down_proj",
    ];
    // Every tensor suffix of every layout in the registry.
    let suffixes = layouts::tensor_suffixes();
    let mut it = data.iter().copied();
    let mut next = || it.next().unwrap_or(0);
    let count = (next() % 6) as usize + 1;
    let mut tensors: Vec<OwnedTensor> = Vec::new();
    for _ in 0..count {
        let name = format!(
            "{}{}",
            PREFIXES[next() as usize % PREFIXES.len()],
            suffixes[next() as usize % suffixes.len()]
        );
        let rank = (next() % 5) as usize;
        let shape: Vec<usize> = (0..rank).map(|_| (next() % 9) as usize).collect();
        let len: usize = shape.iter().product();
        let mut bytes = Vec::with_capacity(len * 4);
        for _ in 0..len.min(4096) {
            let v = match next() % 8 {
                0 => 0.0f32,
                1 => 1.0,
                2 => f32::NAN,
                3 => -0.5,
                4 => 1e30,
                _ => (next() as f32 - 128.0) / 256.0,
            };
            bytes.extend(v.to_le_bytes());
        }
        if bytes.len() != len * 4 || tensors.iter().any(|t| t.name == name) {
            continue;
        }
        tensors.push(f32_tensor(name, shape, bytes));
    }
    let mut md = std::collections::HashMap::new();
    match next() % 4 {
        1 => {
            md.insert(
                "ot_config".to_string(),
                r#"{"oft_block_share": false}"#.to_string(),
            );
        }
        2 => {
            md.insert(
                "ss_network_module".to_string(),
                "networks.oft_v2".to_string(),
            );
            md.insert(
                "ss_network_args".to_string(),
                r#"{"coft": "True", "coft_eps": "0.1"}"#.to_string(),
            );
        }
        3 => {
            md.insert("ss_base_model_version".to_string(), "sd_v1".to_string());
        }
        _ => {}
    }
    let mut buf = Vec::new();
    if write_owned(&mut buf, &tensors, md).is_ok() {
        any_adapter(&buf);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn exercise_writes_every_layout_the_registry_writes() {
        let a = crate::model::Adapter {
            provenance: Default::default(),
            layers: Vec::new(),
            features: Vec::new(),
        };
        let writable: Vec<&str> = crate::layouts::LAYOUTS
            .iter()
            .filter(|l| matches!(l.writes, crate::layouts::Writes::Writer(_)))
            .map(|l| l.id)
            .collect();
        assert_eq!(super::exercise(&a), writable);
        assert!(writable.len() >= 5, "{writable:?}");
    }
}
