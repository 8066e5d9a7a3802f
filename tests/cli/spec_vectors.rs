//! The spec's test vectors (spec/vectors/*.json): R blocks and merged weights computed by an
//! independent NumPy implementation of spec/oft-format.md (cross-checked there against PEFT
//! and LyCORIS) must equal oftool's to 1e-12.

#[allow(unused_imports)]
use crate::common;

use crate::common::*;
use oftool::apply::{Matrix, PreparedStage, apply_layer};
use oftool::model::*;
use serde_json::Value;

fn floats(v: &Value) -> Vec<f64> {
    match v {
        Value::Array(a) => a.iter().flat_map(floats).collect(),
        Value::Number(n) => vec![n.as_f64().expect("number")],
        other => panic!("expected numbers, got {other}"),
    }
}

fn layer_from(v: &Value) -> Layer {
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
        let w = floats(&v["w"]);
        let rows = v["w"].as_array().unwrap().len();
        let mut m = Matrix::from_shape(&[rows, w.len() / rows], w).unwrap();
        apply_layer(&layer, &mut m).unwrap_or_else(|e| panic!("{name}: {e}"));
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
