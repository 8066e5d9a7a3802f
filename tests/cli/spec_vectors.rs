//! The spec's test vectors (spec/vectors/*.json): R blocks and merged weights computed by an
//! independent NumPy implementation of spec/oft-format.md (cross-checked there against PEFT
//! and LyCORIS) must equal oftool's to 1e-12.

#[allow(unused_imports)]
use crate::common;

use crate::common::*;
use oftool::apply::{Matrix, PreparedStage, apply_layer};
use oftool::model::*;
use serde_json::Value;

pub(crate) fn floats(v: &Value) -> Vec<f64> {
    match v {
        Value::Array(a) => a.iter().flat_map(floats).collect(),
        Value::Number(n) => vec![n.as_f64().expect("number")],
        other => panic!("expected numbers, got {other}"),
    }
}

pub(crate) fn layer_from(v: &Value) -> Layer {
    let side: Side = serde_json::from_value(v["side"].clone()).expect("side");
    let stages = v["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .map(|s| Stage {
            spec: StageSpec {
                truncated: s["truncated"].as_bool().unwrap_or(false),
                blocks: s["blocks"].as_u64(),
                block_size: s["block_size"].as_u64().expect("block_size"),
                shared: s["shared"].as_bool().unwrap_or(false),
                wiring: serde_json::from_value(s["wiring"].clone()).expect("wiring"),
                map: serde_json::from_value(s["map"].clone()).expect("map"),
                q: String::new(),
            },
            q: floats(&s["q"]),
            q_f64: true,
            inverse: false,
        })
        .collect();
    let row_scale = match &v["row_scale"] {
        Value::Null => None,
        rs => Some((
            serde_json::from_value(rs["position"].clone()).expect("position"),
            floats(&rs["values"]),
        )),
    };
    Layer {
        target: Target {
            name: "vector".into(),
            convention: "unknown".into(),
            component: None,
            module: ModuleKind::Unknown,
            shape: None,
            rotated_dim: None,
            rows: None,
        },
        side,
        stages,
        row_scale,
        row_scale_f64: true,
        constraint: None,
        base_binding: None,
    }
}

#[test]
fn spec_vectors_match() {
    let dir = repo().join("spec").join("vectors");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("spec/vectors exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 15,
        "expected the spec vectors, found {}",
        files.len()
    );
    let mut kinds = std::collections::BTreeSet::new();
    for f in &files {
        let v = read_json(f);
        if v.get("side").is_none() {
            continue; // the container vector, checked below
        }
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        let layer = layer_from(&v);
        let w_rows = v["w"].as_array().unwrap().len();
        let axis = match layer.side {
            Side::Output => w_rows,
            Side::Input => floats(&v["w"]).len() / w_rows,
        };
        for (j, (stage, sv)) in layer
            .stages
            .iter()
            .zip(v["stages"].as_array().unwrap())
            .enumerate()
        {
            kinds.insert(format!(
                "{} {}",
                stage.spec.map.describe(),
                stage.spec.wiring.describe()
            ));
            let b = stage.spec.block_size as usize;
            let want_r = sv["r_blocks"].as_array().expect("r_blocks");
            assert_eq!(
                want_r.len() as u64,
                stage.stored_blocks(),
                "{name} stage {j}"
            );
            let prepared = PreparedStage::<f64>::new(stage, axis).unwrap();
            for (k, rb) in want_r.iter().enumerate() {
                let got = &prepared.blocks()[k];
                assert_eq!(got.len(), b * b, "{name} stage {j} block {k}: size");
                let want = floats(rb);
                let err = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f64::max);
                assert!(
                    err < 1e-12,
                    "{name} stage {j} block {k}: R differs by {err}"
                );
            }
            if let Some(sigma) = sv.get("sigma").filter(|s| !s.is_null()) {
                let want: Vec<usize> = floats(sigma).iter().map(|&x| x as usize).collect();
                let got = prepared
                    .gather_list()
                    .map_or_else(|| (0..want.len()).collect(), <[usize]>::to_vec);
                assert_eq!(got, want, "{name} stage {j}: σ");
            }
        }
        // `w` in its stored shape (a conv's 4-D one with `w_shape`): the 2-D view flattens
        // every axis after the first.
        let w = floats(&v["w"]);
        let rows = v["w"].as_array().unwrap().len();
        if let Some(shape) = v.get("w_shape") {
            let shape: Vec<usize> = floats(shape).iter().map(|&x| x as usize).collect();
            assert_eq!(shape.iter().product::<usize>(), w.len(), "{name}: w_shape");
        }
        let cols = w.len() / rows;
        let mut m = Matrix::from_shape(&[rows, cols], w.clone()).unwrap();
        if let Some(listed) = v.get("rows") {
            // Gather the listed rows in order, apply, scatter back (spec §3.4.1).
            let order: Vec<usize> = listed
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|r| {
                    let (a, n) = (r[0].as_u64().unwrap(), r[1].as_u64().unwrap());
                    (a..a + n).map(|x| x as usize)
                })
                .collect();
            let part: Vec<f64> = order
                .iter()
                .flat_map(|&r| w[r * cols..(r + 1) * cols].to_vec())
                .collect();
            let mut p = Matrix::from_shape(&[order.len(), cols], part).unwrap();
            apply_layer(&layer, &mut p).unwrap_or_else(|e| panic!("{name}: {e}"));
            for (i, &r) in order.iter().enumerate() {
                m.data[r * cols..(r + 1) * cols].copy_from_slice(&p.data[i * cols..(i + 1) * cols]);
            }
        } else {
            apply_layer(&layer, &mut m).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        if v.get("base_dtype").and_then(Value::as_str) == Some("BF16") {
            let bits = |x: &Value| -> Vec<u8> {
                floats(x)
                    .iter()
                    .flat_map(|&b| (b as u16).to_le_bytes())
                    .collect()
            };
            let base = common::bf16_bytes(&w);
            assert_eq!(base, bits(&v["w_bits"]), "{name}: w is BF16");
            let got = common::bf16_bytes(&m.data);
            assert_eq!(
                got,
                bits(&v["expected_bits"]),
                "{name}: rounded once to BF16"
            );
        }
        let want = floats(&v["expected"]);
        let err = m
            .data
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(err < 1e-12, "{name}: W' differs by {err}");
    }
    assert!(
        kinds.iter().any(|k| k.contains("butterfly(peft")),
        "no peft butterfly vector"
    );
    assert!(
        kinds.iter().any(|k| k.contains("butterfly(lycoris")),
        "no lycoris butterfly vector"
    );
    assert!(
        kinds.iter().any(|k| k.contains("peft-0.16")),
        "no peft-0.16 vector"
    );
}

/// The complete-file vector: our reader opens `container_example.oft`, its digest checks, and
/// the layers applied to the vector's base give the expected merged weights.
#[test]
fn container_vector_reads_and_merges() {
    let dir = repo().join("spec").join("vectors");
    let v = read_json(&dir.join("container_example.json"));
    let file = dir.join(v["file"].as_str().expect("file"));
    let (adapter, status) = oftool::oft_file::read_unverified(&file).expect("reads");
    assert_eq!(status, oftool::oft_file::DigestStatus::Ok);
    assert_eq!(
        oftool::oft_file::read(&file)
            .expect("digest ok")
            .layers
            .len(),
        adapter.layers.len()
    );
    let hex = |s: &str| -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    };
    for m in v["merged"].as_array().expect("merged") {
        let i = m["layer"].as_u64().unwrap() as usize;
        let layer = &adapter.layers[i];
        let base = v["base"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["target"].as_str() == Some(layer.target.name.as_str()))
            .expect("base tensor for the layer");
        let bytes = hex(base["data_hex"].as_str().unwrap());
        let dtype: safetensors::Dtype = serde_json::from_value(base["dtype"].clone()).unwrap();
        let shape: Vec<usize> = base["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        if let Some(bind) = &layer.base_binding {
            assert_eq!(
                bind.blake3,
                blake3::hash(&bytes).to_hex().to_string(),
                "binding hash"
            );
        }
        let view = safetensors::tensor::TensorView::new(dtype, shape.clone(), &bytes).unwrap();
        let w = crate::common::to_f64(&view);
        let mut mat = Matrix::from_shape(&shape, w).unwrap();
        apply_layer(layer, &mut mat).unwrap();
        let want = floats(&m["expected_f64"]);
        let err = mat
            .data
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(err < 1e-12, "container layer {i}: W' differs by {err}");
    }
}

/// Every file of `spec/vectors/invalid/` is refused by `validate` with the rule of §9.1 and the
/// category `expected.json` gives it; every file of `spec/vectors/valid/` (and the container
/// example) is accepted.
#[test]
fn invalid_vectors_are_refused_with_their_rule_and_category() {
    let dir = repo().join("spec/vectors/invalid");
    let expected = read_json(&dir.join("expected.json"));
    let expected = expected.as_object().unwrap();
    assert!(expected.len() >= 60, "{}", expected.len());
    let mut wrong = Vec::new();
    for (file, want) in expected {
        let rule = want["rule"].as_u64().unwrap();
        let category = want["category"].as_str().unwrap();
        let v = oftool::validate::run(&dir.join(file), None).unwrap();
        let hit = v
            .problems
            .iter()
            .any(|p| p.category.id() == category && p.rule.map(u64::from) == Some(rule));
        if v.valid || !hit {
            let got: Vec<String> = v
                .problems
                .iter()
                .map(|p| format!("{}/{:?}: {}", p.category.id(), p.rule, p.message))
                .collect();
            wrong.push(format!("{file} (want {category}/{rule}): {got:?}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    let valid = repo().join("spec/vectors/valid");
    let shown = read_json(&valid.join("expected.json"));
    let mut files: Vec<std::path::PathBuf> = shown
        .as_object()
        .unwrap()
        .keys()
        .map(|f| valid.join(f))
        .collect();
    files.push(repo().join("spec/vectors/container_example.oft"));
    for f in files {
        let v = oftool::validate::run(&f, None).unwrap();
        assert!(v.valid, "{}: {:?}", f.display(), v.problems);
    }
}
