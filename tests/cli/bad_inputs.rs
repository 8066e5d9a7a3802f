//! The bad-input corpus: malformed files and argument sets across every command. Each case must
//! fail with its own message (asserted, not just the failure), the documented exit code (1: bad
//! content, 2: usage or I/O), no panic, and nothing left behind — no output, no temporary file.
//! The files are generated here, from a few valid ones, so the corpus needs no binary fixtures.

use assert_cmd::Command;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

fn oftool() -> Command {
    Command::cargo_bin("oftool").expect("binary built")
}

type Tensor<'a> = (&'a str, Dtype, Vec<usize>, Vec<u8>);

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn small(n: usize) -> Vec<u8> {
    f32s(
        &(0..n)
            .map(|i| 0.01 * ((i % 7) as f32 - 3.0))
            .collect::<Vec<_>>(),
    )
}

fn st(path: &Path, tensors: &[Tensor<'_>], meta: &[(&str, &str)]) -> PathBuf {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let meta: HashMap<String, String> = meta
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let meta = (!meta.is_empty()).then_some(meta);
    std::fs::write(path, safetensors::serialize(views, meta).unwrap()).unwrap();
    path.to_path_buf()
}

/// Raw bytes: an 8-byte header length, the header, then `data`.
fn raw(path: &Path, header_len: u64, header: &str, data: &[u8]) -> PathBuf {
    let mut b = header_len.to_le_bytes().to_vec();
    b.extend(header.as_bytes());
    b.extend(data);
    std::fs::write(path, b).unwrap();
    path.to_path_buf()
}

fn peft(dir: &Path) -> PathBuf {
    st(
        &dir.join("peft.safetensors"),
        &[
            (
                "base_model.model.a.oft_R.weight",
                Dtype::F32,
                vec![2, 6],
                small(12),
            ),
            (
                "base_model.model.b.oft_R.weight",
                Dtype::F32,
                vec![2, 6],
                small(12),
            ),
        ],
        &[],
    )
}

/// A base with `a.weight`, `b.weight` of `[rows, 8]`.
fn base(dir: &Path, rows: usize, cols: usize) -> PathBuf {
    st(
        &dir.join("base.safetensors"),
        &[
            ("a.weight", Dtype::F32, vec![rows, cols], small(rows * cols)),
            ("b.weight", Dtype::F32, vec![rows, cols], small(rows * cols)),
        ],
        &[],
    )
}

fn oft(dir: &Path) -> PathBuf {
    let out = dir.join("a.oft");
    oftool()
        .arg("convert")
        .arg(peft(dir))
        .arg("-o")
        .arg(&out)
        .assert()
        .success();
    out
}

/// An `.oft` with its manifest edited (the digest is left as is).
fn oft_edit(dir: &Path, name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let src = oft(dir);
    let file = crate::common::MappedFile::open(&src).unwrap();
    let mut meta = file.metadata.clone();
    let mut m: serde_json::Value = serde_json::from_str(&meta["oft.manifest"]).unwrap();
    edit(&mut m);
    meta.insert("oft.manifest".into(), m.to_string());
    let st = file.tensors();
    let views: Vec<(String, TensorView)> = st.tensors();
    let p = dir.join(name);
    std::fs::write(&p, safetensors::serialize(views, Some(meta)).unwrap()).unwrap();
    p
}

/// A LyCORIS diag-oft file with a `rescale` (a row scale) for module `a` (4 rows, blocks of 2).
fn lyco_rescaled(dir: &Path) -> PathBuf {
    st(
        &dir.join("lyco.safetensors"),
        &[
            ("lycoris_a.oft_blocks", Dtype::F32, vec![2, 2, 2], small(8)),
            ("lycoris_a.alpha", Dtype::F32, vec![], f32s(&[0.0])),
            (
                "lycoris_a.rescale",
                Dtype::F32,
                vec![4, 1],
                f32s(&[1.0, 1.1, 0.9, 1.0]),
            ),
        ],
        &[],
    )
}

fn peft_dir(dir: &Path, config: &str, tensors: &[Tensor<'_>]) -> PathBuf {
    let d = dir.join("peftdir");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("adapter_config.json"), config).unwrap();
    if !tensors.is_empty() {
        st(&d.join("adapter_model.safetensors"), tensors, &[]);
    }
    d
}

fn zip(path: &Path, members: &[(&str, &[u8], bool)]) -> PathBuf {
    let f = std::fs::File::create(path).unwrap();
    let mut z = zip::ZipWriter::new(f);
    for (name, bytes, deflate) in members {
        let m = if *deflate {
            zip::CompressionMethod::Deflated
        } else {
            zip::CompressionMethod::Stored
        };
        z.start_file(
            *name,
            zip::write::SimpleFileOptions::default().compression_method(m),
        )
        .unwrap();
        z.write_all(bytes).unwrap();
    }
    z.finish().unwrap();
    path.to_path_buf()
}

fn s(p: &Path) -> String {
    p.to_string_lossy().to_string()
}

/// One case: the arguments (built in a fresh directory), exit code, message.
struct Case {
    name: &'static str,
    setup: fn(&Path) -> Vec<String>,
    code: i32,
    needle: &'static str,
}

macro_rules! case {
    ($name:expr, $code:expr, $needle:expr, |$d:ident| $body:expr) => {
        Case {
            name: $name,
            setup: |$d: &Path| $body,
            code: $code,
            needle: $needle,
        }
    };
}

fn inspect(p: PathBuf) -> Vec<String> {
    vec!["inspect".into(), s(&p)]
}

const F: Dtype = Dtype::F32;

fn cases() -> Vec<Case> {
    vec![
        // --- containers -------------------------------------------------------------------
        case!("empty file", 1, "not a valid safetensors file", |d| {
            std::fs::write(d.join("e.safetensors"), b"").unwrap();
            inspect(d.join("e.safetensors"))
        }),
        case!("seven bytes", 1, "not a valid safetensors file", |d| {
            std::fs::write(d.join("x.safetensors"), b"1234567").unwrap();
            inspect(d.join("x.safetensors"))
        }),
        case!(
            "header length past the end",
            1,
            "not a valid safetensors file",
            |d| { inspect(raw(&d.join("x.safetensors"), 4096, "{}", b"")) }
        ),
        case!(
            "header length 2^63",
            1,
            "not a valid safetensors file",
            |d| { inspect(raw(&d.join("x.safetensors"), 1 << 63, "{}", b"")) }
        ),
        case!("header not JSON", 1, "not a valid safetensors file", |d| {
            inspect(raw(&d.join("x.safetensors"), 8, "{not js}", b""))
        }),
        case!(
            "header a JSON array",
            1,
            "not a valid safetensors file",
            |d| { inspect(raw(&d.join("x.safetensors"), 8, "[1,2,3] ", b"")) }
        ),
        case!(
            "overlapping offsets",
            1,
            "not a valid safetensors file",
            |d| {
                let h = r#"{"a.oft_R.weight":{"dtype":"F32","shape":[1,6],"data_offsets":[0,24]},"b.oft_R.weight":{"dtype":"F32","shape":[1,6],"data_offsets":[8,32]}}"#;
                let h = format!("{h:<176}");
                inspect(raw(
                    &d.join("x.safetensors"),
                    h.len() as u64,
                    &h,
                    &[0u8; 32],
                ))
            }
        ),
        case!(
            "offsets beyond the data",
            1,
            "not a valid safetensors file",
            |d| {
                let h = r#"{"a.oft_R.weight":{"dtype":"F32","shape":[1,6],"data_offsets":[0,24]}}"#;
                let h = format!("{h:<80}");
                inspect(raw(&d.join("x.safetensors"), h.len() as u64, &h, &[0u8; 8]))
            }
        ),
        case!("huge offsets", 1, "not a valid safetensors file", |d| {
            let h = r#"{"a.oft_R.weight":{"dtype":"F32","shape":[1,6],"data_offsets":[18446744073709551000,18446744073709551024]}}"#;
            let h = format!("{h:<128}");
            inspect(raw(
                &d.join("x.safetensors"),
                h.len() as u64,
                &h,
                &[0u8; 24],
            ))
        }),
        case!("duplicate keys", 1, "names `a.oft_R.weight` twice", |d| {
            let h = r#"{"a.oft_R.weight":{"dtype":"F32","shape":[1,6],"data_offsets":[0,24]},"a.oft_R.weight":{"dtype":"F32","shape":[1,6],"data_offsets":[0,24]}}"#;
            let h = format!("{h:<160}");
            inspect(raw(
                &d.join("x.safetensors"),
                h.len() as u64,
                &h,
                &[0u8; 24],
            ))
        }),
        case!("unknown dtype", 1, "not a valid safetensors file", |d| {
            let h = r#"{"a.oft_R.weight":{"dtype":"F7","shape":[1,6],"data_offsets":[0,24]}}"#;
            let h = format!("{h:<80}");
            inspect(raw(
                &d.join("x.safetensors"),
                h.len() as u64,
                &h,
                &[0u8; 24],
            ))
        }),
        case!(
            "shape disagrees with the bytes",
            1,
            "not a valid safetensors file",
            |d| {
                let h = r#"{"a.oft_R.weight":{"dtype":"F32","shape":[2,6],"data_offsets":[0,24]}}"#;
                let h = format!("{h:<80}");
                inspect(raw(
                    &d.join("x.safetensors"),
                    h.len() as u64,
                    &h,
                    &[0u8; 24],
                ))
            }
        ),
        // --- tensors ----------------------------------------------------------------------
        case!("integer dtype", 1, "not a floating-point dtype", |d| {
            inspect(st(
                &d.join("x.safetensors"),
                &[("a.oft_R.weight", Dtype::I32, vec![1, 6], vec![0; 24])],
                &[],
            ))
        }),
        case!("NaN in oft_R", 1, "non-finite value (NaN)", |d| {
            let mut v = small(6);
            v[0..4].copy_from_slice(&f32::NAN.to_le_bytes());
            inspect(st(
                &d.join("x.safetensors"),
                &[("base_model.model.a.oft_R.weight", F, vec![1, 6], v)],
                &[],
            ))
        }),
        case!("infinity in oft_blocks", 1, "non-finite value (inf)", |d| {
            let mut v = small(8);
            v[4..8].copy_from_slice(&f32::INFINITY.to_le_bytes());
            inspect(st(
                &d.join("x.safetensors"),
                &[
                    ("lora_unet_a.oft_blocks", F, vec![2, 2, 2], v),
                    ("lora_unet_a.alpha", F, vec![], small(1)),
                ],
                &[],
            ))
        }),
        case!("oft_R 1-D", 1, "PEFT stores [blocks, b(b−1)/2]", |d| {
            inspect(st(
                &d.join("x.safetensors"),
                &[("base_model.model.a.oft_R.weight", F, vec![6], small(6))],
                &[],
            ))
        }),
        case!("oft_R row not triangular", 1, "is not b(b−1)/2", |d| {
            inspect(st(
                &d.join("x.safetensors"),
                &[("base_model.model.a.oft_R.weight", F, vec![2, 5], small(10))],
                &[],
            ))
        }),
        case!("oft_blocks not square", 1, "expected [N, b, b]", |d| {
            inspect(st(
                &d.join("x.safetensors"),
                &[
                    ("lora_unet_a.oft_blocks", F, vec![2, 2, 3], small(12)),
                    ("lora_unet_a.alpha", F, vec![], small(1)),
                ],
                &[],
            ))
        }),
        case!("oft_blocks 5-D", 1, "expected [N, b, b]", |d| {
            inspect(st(
                &d.join("x.safetensors"),
                &[
                    ("lora_unet_a.oft_blocks", F, vec![1, 1, 2, 2, 2], small(8)),
                    ("lora_unet_a.alpha", F, vec![], small(1)),
                ],
                &[],
            ))
        }),
        case!("alpha with two values", 1, "must hold one value", |d| {
            inspect(st(
                &d.join("x.safetensors"),
                &[
                    ("lora_unet_a.oft_blocks", F, vec![2, 2, 2], small(8)),
                    ("lora_unet_a.alpha", F, vec![2], small(2)),
                ],
                &[],
            ))
        }),
        case!(
            "rescale of the wrong length",
            1,
            "`lora_unet_a.rescale` has shape [3, 1]",
            |d| {
                inspect(st(
                    &d.join("x.safetensors"),
                    &[
                        ("lora_unet_a.oft_blocks", F, vec![2, 2, 2], small(8)),
                        ("lora_unet_a.alpha", F, vec![], small(1)),
                        ("lora_unet_a.rescale", F, vec![3, 1], small(3)),
                    ],
                    &[],
                ))
            }
        ),
        case!(
            "alpha without oft_blocks",
            1,
            "has `alpha`/`rescale` but no `oft_blocks`",
            |d| {
                inspect(st(
                    &d.join("x.safetensors"),
                    &[
                        ("lora_unet_a.oft_blocks", F, vec![2, 2, 2], small(8)),
                        ("lora_unet_b.alpha", F, vec![], small(1)),
                    ],
                    &[],
                ))
            }
        ),
        case!("boft_R 3-D", 1, "BOFT stores [m, N, b, b]", |d| {
            inspect(st(
                &d.join("x.safetensors"),
                &[("base_model.model.a.boft_R", F, vec![2, 4, 4], small(32))],
                &[],
            ))
        }),
        case!(
            "boft_s not a column",
            1,
            "BOFT stores [out, 1] or [1, out]",
            |d| {
                inspect(st(
                    &d.join("x.safetensors"),
                    &[
                        ("base_model.model.a.boft_R", F, vec![1, 2, 4, 4], small(32)),
                        ("base_model.model.a.boft_s", F, vec![3, 3], small(9)),
                    ],
                    &[],
                ))
            }
        ),
        case!(
            "oft_r not square",
            1,
            "PEFT ≤ 0.15 stores [r, b, b]",
            |d| {
                inspect(st(
                    &d.join("x.safetensors"),
                    &[("base_model.model.a.oft_r", F, vec![2, 4, 3], small(24))],
                    &[],
                ))
            }
        ),
        case!(
            "oft_s beside modules without",
            1,
            "mixed PEFT versions",
            |d| {
                inspect(st(
                    &d.join("x.safetensors"),
                    &[
                        ("base_model.model.a.oft_r", F, vec![2, 4, 4], small(32)),
                        ("base_model.model.b.oft_s", F, vec![8, 1], small(8)),
                    ],
                    &[],
                ))
            }
        ),
        case!(
            "oft_diag with a zero row",
            1,
            "has a zero row: not a scaled rotation",
            |d| {
                inspect(st(
                    &d.join("x.safetensors"),
                    &[(
                        "lora_unet_a.oft_diag",
                        F,
                        vec![1, 2, 2],
                        f32s(&[1.0, 0.0, 0.0, 0.0]),
                    )],
                    &[],
                ))
            }
        ),
        case!("oft_diag a reflection", 1, "is not a rotation", |d| {
            inspect(st(
                &d.join("x.safetensors"),
                &[(
                    "lora_unet_a.oft_diag",
                    F,
                    vec![1, 2, 2],
                    f32s(&[-1.0, 0.0, 0.0, -1.0]),
                )],
                &[],
            ))
        }),
        case!(
            "oft_diag rows not orthogonal",
            1,
            "its rows are not orthogonal",
            |d| {
                inspect(st(
                    &d.join("x.safetensors"),
                    &[(
                        "lora_unet_a.oft_diag",
                        F,
                        vec![1, 2, 2],
                        f32s(&[1.0, 1.0, 1.0, 1.0]),
                    )],
                    &[],
                ))
            }
        ),
        case!(
            "scaled_oft without its weight",
            1,
            "has `scaled_oft` but no `oft_R.weight`",
            |d| {
                inspect(st(
                    &d.join("x.safetensors"),
                    &[
                        ("lora_unet_a.oft_R.weight", F, vec![1, 6], small(6)),
                        ("lora_unet_b.oft_R.scaled_oft", F, vec![], small(1)),
                    ],
                    &[],
                ))
            }
        ),
        case!(
            "OneTrainer proj_in without a model version",
            1,
            "names no base model",
            |d| {
                inspect(st(
                    &d.join("x.safetensors"),
                    &[(
                        "lora_unet_down_blocks_0_attentions_0_proj_in.oft_R.weight",
                        F,
                        vec![1, 6],
                        small(6),
                    )],
                    &[("ot_config", "{}")],
                ))
            }
        ),
        case!("mixed layouts", 1, "mixed layouts in one file", |d| {
            inspect(st(
                &d.join("x.safetensors"),
                &[
                    ("base_model.model.a.oft_R.weight", F, vec![1, 6], small(6)),
                    ("base_model.model.b.boft_R", F, vec![1, 2, 4, 4], small(32)),
                ],
                &[],
            ))
        }),
        case!(
            "kohya Flux split missing",
            1,
            "kohya oft_flux writes `oft_blocks.0`",
            |d| {
                inspect(st(
                    &d.join("x.safetensors"),
                    &[(
                        "oft_unet_single_blocks_0_linear1.oft_blocks.1",
                        F,
                        vec![2, 2, 2],
                        small(8),
                    )],
                    &[],
                ))
            }
        ),
        case!(
            "a LoRA, not an OFT adapter",
            1,
            "no OFT tensors found (looked for",
            |d| {
                inspect(st(
                    &d.join("x.safetensors"),
                    &[("lora_unet_a.lora_down.weight", F, vec![4, 8], small(32))],
                    &[],
                ))
            }
        ),
        case!(
            "a non-adapter tensor among OFT ones",
            1,
            "unexpected tensor `base_model.model.a.lora_A.weight`",
            |d| {
                inspect(st(
                    &d.join("x.safetensors"),
                    &[
                        ("base_model.model.a.oft_R.weight", F, vec![1, 6], small(6)),
                        ("base_model.model.a.lora_A.weight", F, vec![4, 8], small(32)),
                    ],
                    &[],
                ))
            }
        ),
        // --- .oft manifests ------------------------------------------------------------------
        case!(
            ".oft manifest not JSON",
            1,
            "the manifest is not valid JSON",
            |d| {
                let src = oft(d);
                let file = crate::common::MappedFile::open(&src).unwrap();
                let mut meta = file.metadata.clone();
                meta.insert("oft.manifest".into(), "{oops".into());
                let st = file.tensors();
                std::fs::write(
                    d.join("m.oft"),
                    safetensors::serialize(st.tensors(), Some(meta)).unwrap(),
                )
                .unwrap();
                inspect(d.join("m.oft"))
            }
        ),
        case!(".oft major version 2", 1, "format version 2.0", |d| {
            let src = oft(d);
            let file = crate::common::MappedFile::open(&src).unwrap();
            let mut meta = file.metadata.clone();
            meta.insert("oft.version".into(), "2.0".into());
            let st = file.tensors();
            std::fs::write(
                d.join("v.oft"),
                safetensors::serialize(st.tensors(), Some(meta)).unwrap(),
            )
            .unwrap();
            inspect(d.join("v.oft"))
        }),
        case!(
            ".oft unknown required feature",
            1,
            "requires features this oftool does not implement: warp-drive",
            |d| {
                inspect(oft_edit(d, "r.oft", |m| {
                    m["requires"] = serde_json::json!(["warp-drive"])
                }))
            }
        ),
        case!(
            ".oft wrong tensor name",
            1,
            "must be named `layers.0.stages.0.q`",
            |d| {
                inspect(oft_edit(d, "n.oft", |m| {
                    m["layers"][0]["stages"][0]["q"] = "other".into()
                }))
            }
        ),
        case!(
            ".oft blocks claim past every model",
            1,
            "exceed the largest dimension oftool accepts",
            |d| {
                inspect(oft_edit(d, "b.oft", |m| {
                    m["layers"][0]["stages"][0]["shared"] = true.into();
                    m["layers"][0]["stages"][0]["blocks"] = serde_json::json!(1u64 << 40);
                }))
            }
        ),
        case!(
            ".oft a thousand Neumann terms",
            1,
            "1000 Neumann terms",
            |d| {
                inspect(oft_edit(
                    d,
                    "t.oft",
                    |m| m["layers"][0]["stages"][0]["map"] = serde_json::json!({"kind": "neumann", "terms": 1000, "variant": "peft-0.18"}),
                ))
            }
        ),
        case!(
            ".oft tensor shape disagrees with the manifest",
            1,
            "expected [3, 6]",
            |d| {
                inspect(oft_edit(d, "s.oft", |m| {
                    m["layers"][0]["stages"][0]["blocks"] = 3.into()
                }))
            }
        ),
        case!(".oft corrupted digest", 1, "\"check\": \"digest\"", |d| {
            let p = oft(d);
            let mut b = std::fs::read(&p).unwrap();
            let n = b.len();
            b[n - 2] ^= 0x10;
            std::fs::write(d.join("c.oft"), b).unwrap();
            vec!["validate".into(), "--json".into(), s(&d.join("c.oft"))]
        }),
        // --- PEFT directories ----------------------------------------------------------------
        case!(
            "PEFT dir without a config",
            1,
            "must hold `adapter_config.json`",
            |d| {
                std::fs::create_dir(d.join("empty")).unwrap();
                inspect(d.join("empty"))
            }
        ),
        case!(
            "PEFT dir without weights",
            1,
            "missing `adapter_model.safetensors`",
            |d| { inspect(peft_dir(d, r#"{"peft_type":"OFT"}"#, &[])) }
        ),
        case!("PEFT config not JSON", 1, "not valid JSON", |d| {
            inspect(peft_dir(
                d,
                "{peft",
                &[(
                    "base_model.model.a.oft_R.weight",
                    Dtype::F32,
                    vec![1, 6],
                    small(6),
                )],
            ))
        }),
        case!(
            "PEFT config of a LoRA",
            1,
            "is not an OFT or BOFT adapter",
            |d| {
                inspect(peft_dir(
                    d,
                    r#"{"peft_type":"LORA"}"#,
                    &[(
                        "base_model.model.a.oft_R.weight",
                        Dtype::F32,
                        vec![1, 6],
                        small(6),
                    )],
                ))
            }
        ),
        case!(
            "PEFT config BOFT, tensors OFT",
            1,
            "says peft_type `BOFT` but the tensors are peft-oft",
            |d| {
                inspect(peft_dir(
                    d,
                    r#"{"peft_type":"BOFT"}"#,
                    &[(
                        "base_model.model.a.oft_R.weight",
                        Dtype::F32,
                        vec![1, 6],
                        small(6),
                    )],
                ))
            }
        ),
        case!(
            "PEFT config with absurd Neumann terms",
            1,
            "num_cayley_neumann_terms = 1000000",
            |d| {
                inspect(peft_dir(
                    d,
                    r#"{"peft_type":"OFT","oft_block_size":4,"use_cayley_neumann":true,"num_cayley_neumann_terms":1000000}"#,
                    &[(
                        "base_model.model.a.oft_R.weight",
                        Dtype::F32,
                        vec![1, 6],
                        small(6),
                    )],
                ))
            }
        ),
        case!(
            "PEFT config block_share with a huge r",
            1,
            "exceed the largest dimension oftool accepts",
            |d| {
                inspect(peft_dir(
                    d,
                    r#"{"peft_type":"OFT","oft_block_size":4,"use_cayley_neumann":true,"block_share":true,"r":1099511627776}"#,
                    &[(
                        "base_model.model.a.oft_R.weight",
                        Dtype::F32,
                        vec![1, 6],
                        small(6),
                    )],
                ))
            }
        ),
        // --- pickles and zips ----------------------------------------------------------------
        case!(
            "pickle that asks for os.system",
            1,
            "asks for `os.system`",
            |d| {
                let pkl = b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00true\x85R.";
                let p = zip(&d.join("x.bin"), &[("archive/data.pkl", pkl, false)]);
                vec!["convert".into(), s(&p), "-o".into(), s(&d.join("out.oft"))]
            }
        ),
        case!(
            "pickle that asks for subprocess.Popen",
            1,
            "asks for `subprocess.Popen`",
            |d| {
                let pkl = b"\x80\x04\x8c\x0asubprocess\x8c\x05Popen\x93)R.";
                let p = zip(&d.join("x.pt"), &[("archive/data.pkl", pkl, false)]);
                inspect(p)
            }
        ),
        case!("zip member with ..", 1, "climbs out with `..`", |d| {
            let p = zip(
                &d.join("x.bin"),
                &[
                    ("archive/data.pkl", b"\x80\x02}.", false),
                    ("archive/../../x", b"1", false),
                ],
            );
            vec![
                "merge".into(),
                s(&base(d, 8, 8)),
                s(&p),
                "-o".into(),
                s(&d.join("out.safetensors")),
            ]
        }),
        case!(
            "zip member with an absolute path",
            1,
            "absolute path",
            |d| {
                let p = zip(
                    &d.join("x.bin"),
                    &[
                        ("archive/data.pkl", b"\x80\x02}.", false),
                        ("/tmp/x", b"1", false),
                    ],
                );
                inspect(p)
            }
        ),
        case!("zip bomb", 1, "decompression bomb", |d| {
            let zeros = vec![0u8; 32 << 20];
            let p = zip(
                &d.join("x.bin"),
                &[
                    ("archive/data.pkl", b"\x80\x02}.", false),
                    ("archive/data/0", &zeros, true),
                ],
            );
            inspect(p)
        }),
        case!(
            "bare pre-1.6 pickle",
            1,
            "not a zip-format PyTorch file",
            |d| {
                std::fs::write(d.join("x.pt"), b"\x80\x02}q\x00.").unwrap();
                inspect(d.join("x.pt"))
            }
        ),
        // --- merge / unmerge / compose / convert / validate arguments --------------------------
        case!(
            "adapter for a different model",
            1,
            "have no target in the base",
            |d| {
                let other = st(
                    &d.join("other.safetensors"),
                    &[("z.weight", Dtype::F32, vec![8, 8], small(64))],
                    &[],
                );
                vec![
                    "merge".into(),
                    s(&other),
                    s(&peft(d)),
                    "-o".into(),
                    s(&d.join("out.safetensors")),
                ]
            }
        ),
        case!("partition that does not fit the base", 1, "a.weight", |d| {
            vec![
                "merge".into(),
                s(&base(d, 8, 12)),
                s(&peft(d)),
                "-o".into(),
                s(&d.join("out.safetensors")),
            ]
        }),
        case!(
            "output equal to the base",
            2,
            "would overwrite the input",
            |d| {
                let b = base(d, 8, 8);
                vec!["merge".into(), s(&b), s(&peft(d)), "-o".into(), s(&b)]
            }
        ),
        case!(
            "output a symlink to the base",
            2,
            "would overwrite the input",
            |d| {
                let b = base(d, 8, 8);
                std::os::unix::fs::symlink(&b, d.join("link.safetensors")).unwrap();
                vec![
                    "merge".into(),
                    s(&b),
                    s(&peft(d)),
                    "-o".into(),
                    s(&d.join("link.safetensors")),
                ]
            }
        ),
        case!(
            "output a hard link to the adapter",
            2,
            "would overwrite the input",
            |d| {
                let a = peft(d);
                std::fs::hard_link(&a, d.join("out.oft")).unwrap();
                std::fs::remove_file(d.join("out.oft")).ok();
                std::fs::hard_link(&a, d.join("h.oft")).unwrap();
                vec!["convert".into(), s(&a), "-o".into(), s(&d.join("h.oft"))]
            }
        ),
        case!(
            "output folder missing",
            2,
            "the output folder does not exist",
            |d| {
                vec![
                    "merge".into(),
                    s(&base(d, 8, 8)),
                    s(&peft(d)),
                    "-o".into(),
                    s(&d.join("no/such/out.safetensors")),
                ]
            }
        ),
        case!(
            "strength that is not a number",
            2,
            "is not a strength",
            |d| {
                vec![
                    "merge".into(),
                    s(&base(d, 8, 8)),
                    format!("{}:abc", s(&peft(d))),
                    "-o".into(),
                    s(&d.join("out.safetensors")),
                ]
            }
        ),
        case!("strength past half a turn", 1, "past ±180°", |d| {
            let big = st(
                &d.join("big.safetensors"),
                &[(
                    "base_model.model.a.oft_R.weight",
                    Dtype::F32,
                    vec![1, 6],
                    f32s(&[3.0, 0.0, 0.0, 0.0, 0.0, 0.0]),
                )],
                &[("ot_config", "{}")],
            );
            let _ = big;
            let p = peft_dir(
                d,
                r#"{"peft_type":"OFT","oft_block_size":4,"use_cayley_neumann":false}"#,
                &[(
                    "base_model.model.a.oft_R.weight",
                    Dtype::F32,
                    vec![2, 6],
                    f32s(&[5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0]),
                )],
            );
            vec![
                "compose".into(),
                format!("{}:5", s(&p)),
                "-o".into(),
                s(&d.join("out.oft")),
            ]
        }),
        case!("compose without adapters", 2, "", |d| {
            vec!["compose".into(), "-o".into(), s(&d.join("out.oft"))]
        }),
        case!(
            "unmerge with a missing target",
            1,
            "have no target in the base",
            |d| {
                let other = st(
                    &d.join("m.safetensors"),
                    &[("z.weight", Dtype::F32, vec![8, 8], small(64))],
                    &[],
                );
                vec![
                    "unmerge".into(),
                    s(&other),
                    s(&peft(d)),
                    "-o".into(),
                    s(&d.join("out.safetensors")),
                ]
            }
        ),
        case!(
            "validate against a base missing targets",
            1,
            "[target-missing] a: no tensor in",
            |d| {
                let other = st(
                    &d.join("m.safetensors"),
                    &[("z.weight", Dtype::F32, vec![8, 8], small(64))],
                    &[],
                );
                vec!["validate".into(), s(&oft(d)), "--base".into(), s(&other)]
            }
        ),
        case!(
            "validate a row-scaled layer against a 0-dim base tensor",
            1,
            "[target-shape] lycoris_a: `a.weight` has shape [], not a weight matrix",
            |d| {
                let zero = st(
                    &d.join("m.safetensors"),
                    &[("a.weight", F, vec![], small(1))],
                    &[],
                );
                vec![
                    "validate".into(),
                    s(&lyco_rescaled(d)),
                    "--base".into(),
                    s(&zero),
                ]
            }
        ),
        case!(
            "merge a row-scaled layer into a 0-dim base tensor",
            1,
            "`a.weight` has shape [], not a weight matrix",
            |d| {
                let zero = st(
                    &d.join("m.safetensors"),
                    &[("a.weight", F, vec![], small(1))],
                    &[],
                );
                vec![
                    "merge".into(),
                    s(&zero),
                    s(&lyco_rescaled(d)),
                    "-o".into(),
                    s(&d.join("out.safetensors")),
                ]
            }
        ),
        case!(
            "convert output side to diffusers",
            1,
            "output-side rotation is no input-side one",
            |d| {
                let p = st(
                    &d.join("l.safetensors"),
                    &[
                        (
                            "lora_unet_down_blocks_0_attentions_0_proj_in.oft_blocks",
                            F,
                            vec![2, 2, 2],
                            small(8),
                        ),
                        (
                            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha",
                            F,
                            vec![],
                            small(1),
                        ),
                    ],
                    &[],
                );
                vec![
                    "convert".into(),
                    s(&p),
                    "--to".into(),
                    "diffusers".into(),
                    "-o".into(),
                    s(&d.join("out")),
                ]
            }
        ),
        case!(
            "convert flattened names without a base",
            1,
            "pass --base",
            |d| {
                let p = st(
                    &d.join("o.safetensors"),
                    &[(
                        "lora_unet_down_blocks_0_attentions_0_to_q.oft_R.weight",
                        F,
                        vec![1, 6],
                        small(6),
                    )],
                    &[("ot_config", r#"{"model_type":"STABLE_DIFFUSION_20"}"#)],
                );
                vec![
                    "convert".into(),
                    s(&p),
                    "--to".into(),
                    "diffusers".into(),
                    "-o".into(),
                    s(&d.join("out")),
                ]
            }
        ),
        case!(
            "convert lossy without --allow-lossy",
            1,
            "--allow-lossy",
            |d| {
                let p = peft_dir(
                    d,
                    r#"{"peft_type":"OFT","oft_block_size":4,"use_cayley_neumann":false}"#,
                    &[(
                        "base_model.model.down_blocks.0.attentions.0.to_q.oft_R.weight",
                        Dtype::F32,
                        vec![2, 6],
                        small(12),
                    )],
                );
                vec![
                    "convert".into(),
                    s(&p),
                    "--to".into(),
                    "onetrainer".into(),
                    "-o".into(),
                    s(&d.join("out.safetensors")),
                ]
            }
        ),
        case!(
            "convert --zip of a one-file layout",
            2,
            "--zip packs a directory layout",
            |d| {
                vec![
                    "convert".into(),
                    s(&peft(d)),
                    "--to".into(),
                    "comfyui".into(),
                    "--zip".into(),
                    "-o".into(),
                    s(&d.join("out.zip")),
                ]
            }
        ),
        case!(
            "convert --zip to .oft",
            2,
            "apply to foreign layouts",
            |d| {
                vec![
                    "convert".into(),
                    s(&peft(d)),
                    "--zip".into(),
                    "-o".into(),
                    s(&d.join("out.oft")),
                ]
            }
        ),
        case!(
            "convert into an existing folder",
            2,
            "already exists",
            |d| {
                std::fs::create_dir(d.join("out")).unwrap();
                std::fs::write(d.join("out/keep"), "x").unwrap();
                vec![
                    "convert".into(),
                    s(&peft(d)),
                    "--to".into(),
                    "diffusers".into(),
                    "-o".into(),
                    s(&d.join("out")),
                ]
            }
        ),
        case!(
            "unknown layout name",
            2,
            "invalid value 'automatic1111'",
            |d| {
                vec![
                    "convert".into(),
                    s(&peft(d)),
                    "--to".into(),
                    "automatic1111".into(),
                    "-o".into(),
                    s(&d.join("out")),
                ]
            }
        ),
        case!("missing input file", 2, "No such file", |d| {
            inspect(d.join("nope.safetensors"))
        }),
    ]
}

/// Files the case may leave: everything it created itself before running the command.
fn listing(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = walk(dir);
    v.sort();
    v
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            out.push(p.clone());
            if p.is_dir() && !p.is_symlink() {
                out.extend(walk(&p));
            }
        }
    }
    out
}

/// The category an output names: `error[category]` on stderr; `usage` for clap's own errors;
/// else `validate`'s report.
fn category_of(stderr: &str) -> &str {
    match stderr.split_once("error[") {
        Some((_, rest)) => rest.split_once(']').map_or("?", |(c, _)| c),
        None if stderr.starts_with("error:") => "usage",
        None => "validate",
    }
}

/// What a user sees, with the case's temporary directory and content hashes redacted.
fn redacted(text: &str, tmp: &Path) -> String {
    redact_hashes(&text.replace(&s(tmp), "[TMP]"))
        .trim_end()
        .to_string()
}

/// Replace every run of 64 lowercase hex digits (blake3 hashes, which change with the
/// `created` time a conversion records) by `[HASH]`.
fn redact_hashes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if run.len() == 64 {
            out.push_str("[HASH]");
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for ch in text.chars() {
        if ch.is_ascii_digit() || ('a'..='f').contains(&ch) {
            run.push(ch);
        } else {
            flush(&mut run, &mut out);
            out.push(ch);
        }
    }
    flush(&mut run, &mut out);
    out
}

#[test]
fn bad_input_corpus() {
    let cases = cases();
    assert!(cases.len() >= 50, "only {} cases", cases.len());
    let mut failures = Vec::new();
    // category → what each of its cases shows the user (snapshot-tested below).
    let mut shown: std::collections::BTreeMap<String, String> = Default::default();
    for c in &cases {
        let tmp = tempfile::tempdir().unwrap();
        let args = (c.setup)(tmp.path());
        let before = listing(tmp.path());
        let out = oftool().args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let after = listing(tmp.path());
        let entry = shown.entry(category_of(&stderr).to_string()).or_default();
        entry.push_str(&format!("## {} (exit {:?})\n", c.name, out.status.code()));
        for text in [&stderr, &stdout] {
            if !text.trim().is_empty() {
                entry.push_str(&redacted(text, tmp.path()));
                entry.push('\n');
            }
        }
        entry.push('\n');
        if out.status.code() != Some(c.code) {
            failures.push(format!(
                "{}: exit {:?}, expected {}: {stderr}",
                c.name,
                out.status.code(),
                c.code
            ));
        }
        if !(stderr.contains(c.needle) || stdout.contains(c.needle)) {
            failures.push(format!(
                "{}: expected `{}` in: {stderr}{stdout}",
                c.name, c.needle
            ));
        }
        if stderr.contains("panicked") {
            failures.push(format!("{}: panicked: {stderr}", c.name));
        }
        if before != after {
            let new: Vec<_> = after.iter().filter(|p| !before.contains(p)).collect();
            failures.push(format!("{}: left {new:?} behind", c.name));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    // Every message, one snapshot per category: a changed message is a reviewable diff
    // (`cargo insta review`); CI never accepts one (`INSTA_UPDATE=no` in .ci/run).
    for (category, text) in &shown {
        insta::assert_snapshot!(format!("corpus-{category}"), text.trim_end());
    }
}
