//! Ground truth from the real libraries: each fixture case's merged weights (computed by PEFT
//! or LyCORIS, see fixtures/generate.py) must equal what oftool computes from the imported
//! adapter, and from its `.oft` round trip. The conformance cases that are not known gaps are
//! checked the same way (`common::checked_cases`).

#[allow(unused_imports)]
use crate::common;

use crate::common::*;
use oftool::apply::{Matrix, apply_layer};
use oftool::model::Adapter;
use oftool::{layouts, oft_file};
use std::path::Path;

fn find_layer<'a>(adapter: &'a Adapter, name: &str) -> &'a oftool::model::Layer {
    let name = name.strip_prefix("base_model.model.").unwrap_or(name);
    let hits: Vec<_> = adapter
        .layers
        .iter()
        .filter(|l| l.target.name == name)
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "adapter layer `{name}` found {} times",
        hits.len()
    );
    hits[0]
}

/// Check every layer of one case; returns the number of layers checked, or what is off.
pub fn check_case(dir: &Path, adapter: &Adapter, label: &str) -> Result<usize, String> {
    let case = read_json(&dir.join("case.json"));
    let base = dir.join(case["base"].as_str().expect("base"));
    let merged = dir.join(case["merged"].as_str().expect("merged"));
    let layers = case["layers"].as_array().expect("layers");
    assert_eq!(
        layers.len(),
        adapter.layers.len(),
        "{label}: case.json lists {} layers, the adapter has {}",
        layers.len(),
        adapter.layers.len()
    );
    // Group the layers per base tensor (fused tensors take several, each on a row slice), in
    // the order case.json lists them.
    let mut groups: Vec<(&str, Vec<&serde_json::Value>)> = Vec::new();
    for l in layers {
        let key = l["base_key"].as_str().expect("base_key");
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(l),
            None => groups.push((key, vec![l])),
        }
    }
    let mut failures = Vec::new();
    for (key, group) in &groups {
        let (w, shape, dtype) = tensor(&base, key);
        let (want, want_shape, want_dtype) = tensor(&merged, key);
        assert_eq!(shape, want_shape);
        assert_eq!(dtype, want_dtype);
        let cols: usize = shape[1..].iter().product();
        let mut data = w.clone();
        for l in group {
            let layer = find_layer(adapter, l["adapter_name"].as_str().expect("adapter_name"));
            let (start, len) = match l.get("rows").and_then(|r| r.as_array()) {
                Some(r) => (
                    r[0].as_u64().unwrap() as usize,
                    r[1].as_u64().unwrap() as usize,
                ),
                None => (0, shape[0]),
            };
            let mut m = Matrix::from_shape(
                &[len, cols],
                data[start * cols..(start + len) * cols].to_vec(),
            )
            .expect("2-D view");
            apply_layer(layer, &mut m).unwrap_or_else(|e| panic!("{label} {key}: {e}"));
            data[start * cols..(start + len) * cols].copy_from_slice(&m.data);
        }
        let got = round_to(&data, dtype);
        let (ratio, i) = worst(&got, &want, dtype);
        if ratio > 1.0 {
            failures.push(format!(
                "{key}: element {i}: oftool {} vs library {} (base {}), {ratio:.2}× the tolerance",
                got[i], want[i], w[i]
            ));
        }
        // The adapter must actually change the weight, or the case proves nothing; except
        // where the library itself left it bit-identical (a conformance case's identity
        // rotation without a row scale, `merge_changes_weight: false`), which oftool must too.
        if group.iter().all(|l| l["merge_changes_weight"] == false) {
            assert!(
                want == w && got == w,
                "{label} {key}: an identity layer changed the weight"
            );
        } else {
            assert!(
                want != round_to(&w, dtype),
                "{label} {key}: merged equals base"
            );
        }
    }
    if failures.is_empty() {
        Ok(layers.len())
    } else {
        Err(format!(
            "{label}: {} layer(s) off, first: {}",
            failures.len(),
            failures[0]
        ))
    }
}

#[test]
fn every_fixture_case_matches_the_library_merge() {
    let cases = checked_cases();
    assert!(
        cases.len() >= 10,
        "expected the fixture cases, found {}",
        cases.len()
    );
    let mut total = 0;
    let mut errors = Vec::new();
    for dir in &cases {
        let case = read_json(&dir.join("case.json"));
        let adapter_path = dir.join(case["adapter"].as_str().expect("adapter"));
        let label = dir.file_name().unwrap().to_string_lossy().to_string();
        let adapter =
            layouts::load(&adapter_path).unwrap_or_else(|e| panic!("{label}: import: {e}"));
        match check_case(dir, &adapter, &label) {
            Ok(n) => total += n,
            Err(e) => errors.push(e),
        }
    }
    assert!(
        errors.is_empty(),
        "{} case(s) off:\n{}",
        errors.len(),
        errors.join("\n")
    );
    assert!(total >= 50, "only {total} layers checked");
}

#[test]
fn oft_round_trip_is_bit_exact_and_merges_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    for dir in checked_cases() {
        let case = read_json(&dir.join("case.json"));
        let label = dir.file_name().unwrap().to_string_lossy().to_string();
        let adapter = layouts::load(&dir.join(case["adapter"].as_str().unwrap())).unwrap();
        let out = tmp.path().join(format!("{label}.oft"));
        oft_file::write(&adapter, &out).unwrap();
        let back = oft_file::read(&out).unwrap();
        assert_eq!(back.layers.len(), adapter.layers.len());
        for (a, b) in adapter.layers.iter().zip(&back.layers) {
            assert_eq!(a.target, b.target, "{label}");
            assert_eq!(a.side, b.side);
            assert_eq!(a.row_scale, b.row_scale, "{label}: row scale changed");
            for (sa, sb) in a.stages.iter().zip(&b.stages) {
                // bit-exact values (compare bits, so −0.0 and NaN would be caught too)
                let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&sa.q),
                    bits(&sb.q),
                    "{label}: Q changed in the round trip"
                );
                assert_eq!(sa.spec.map, sb.spec.map);
            }
        }
        // Writing the re-read adapter gives the same bytes.
        let again = tmp.path().join(format!("{label}.again.oft"));
        oft_file::write(&back, &again).unwrap();
        let (a, b) = (std::fs::read(&out).unwrap(), std::fs::read(&again).unwrap());
        if let Some(i) = a
            .iter()
            .zip(&b)
            .position(|(x, y)| x != y)
            .or((a.len() != b.len()).then_some(a.len().min(b.len())))
        {
            let ctx = |v: &[u8]| {
                String::from_utf8_lossy(&v[i.saturating_sub(80)..(i + 80).min(v.len())]).to_string()
            };
            panic!(
                "{label}: rewrite differs at byte {i}:\n{}\nvs\n{}",
                ctx(&a),
                ctx(&b)
            );
        }
        check_case(&dir, &back, &format!("{label} (.oft)")).unwrap_or_else(|e| panic!("{e}"));
    }
}
