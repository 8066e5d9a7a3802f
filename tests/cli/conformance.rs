//! The conformance cases (`fixtures/conformance/`, issue #12): adapters at the edges of what the
//! producers write (block size 1, PEFT 0.13 with `out % r != 0`, BOFT by block count), made and
//! merged by the libraries themselves. Every case is either checked like the `fixtures/cases/`
//! ones (`common::checked_cases()` feeds the fixture, merge and convert tests) or a known gap
//! (`common::KNOWN_GAPS`), refused with its reason; this module checks the second half.

#[allow(unused_imports)]
use crate::common;

use crate::common::*;
use assert_cmd::Command;
use oftool::apply::{Matrix, apply_layer};
use oftool::layouts;

/// The first error importing a case, or baking its layers onto its base in memory, gives.
fn first_error(dir: &std::path::Path) -> Option<String> {
    let case = read_json(&dir.join("case.json"));
    let adapter = match layouts::load(&dir.join(case["adapter"].as_str().unwrap())) {
        Ok(a) => a,
        Err(e) => return Some(e.to_string()),
    };
    let base = dir.join(case["base"].as_str().unwrap());
    for l in case["layers"].as_array().unwrap() {
        let name = l["adapter_name"].as_str().unwrap();
        let short = name.strip_prefix("base_model.model.").unwrap_or(name);
        let layer = adapter
            .layers
            .iter()
            .find(|x| x.target.name == short)
            .unwrap_or_else(|| panic!("{}: no layer {short}", dir.display()));
        let (w, shape, _) = tensor(&base, l["base_key"].as_str().unwrap());
        let mut m = Matrix::from_shape(&shape, w).unwrap();
        if let Err(e) = apply_layer(layer, &mut m) {
            return Some(e.to_string());
        }
    }
    None
}

#[test]
fn every_conformance_case_is_checked_or_a_known_gap() {
    let all = conformance_cases();
    assert!(
        all.len() >= 14,
        "expected the conformance cases, found {}",
        all.len()
    );
    for (gap, _) in KNOWN_GAPS {
        assert!(
            all.iter().any(|d| d.ends_with(gap)),
            "KNOWN_GAPS names `{gap}`, which is not a conformance case"
        );
    }
    let checked = checked_cases();
    for d in &all {
        assert!(
            known_gap(d).is_some() || checked.contains(d),
            "{} is neither checked nor a known gap",
            d.display()
        );
    }
}

#[test]
fn known_gaps_are_refused_with_their_reason() {
    let tmp = tempfile::tempdir().unwrap();
    for dir in conformance_cases() {
        let Some(why) = known_gap(&dir) else { continue };
        let label = dir.file_name().unwrap().to_string_lossy().to_string();
        let err = first_error(&dir).unwrap_or_else(|| {
            panic!("{label} imports and bakes now: take it off KNOWN_GAPS (tests/cli/common.rs)")
        });
        assert!(
            err.contains(why),
            "{label}: refused with `{err}`, expected `{why}`"
        );
        // The binary refuses it too, with a non-zero exit, and writes nothing.
        let case = read_json(&dir.join("case.json"));
        let out = tmp.path().join(format!("{label}.safetensors"));
        let o = Command::cargo_bin("oftool")
            .unwrap()
            .arg("merge")
            .arg(dir.join(case["base"].as_str().unwrap()))
            .arg(dir.join(case["adapter"].as_str().unwrap()))
            .arg("-o")
            .arg(&out)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1), "{label}");
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(stderr.contains(why), "{label}: {stderr}");
        assert!(!out.exists(), "{label}: refused but wrote its output");
    }
}
