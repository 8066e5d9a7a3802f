//! Replays the fuzz seeds (`fuzz/corpus/<target>/seed-*`) and every input that once crashed a
//! target (`fuzz/regressions/<target>/*`) through the same entry points the fuzz targets use,
//! on stable Rust, so CI keeps them fixed without cargo-fuzz.

use std::path::Path;

fn replay(target: &str, f: fn(&[u8])) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut n = 0;
    for dir in [
        root.join("corpus").join(target),
        root.join("regressions").join(target),
    ] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            let seed =
                dir.ends_with(target) && p.parent().unwrap().parent().unwrap().ends_with("corpus");
            if seed && !name.starts_with("seed-") {
                continue; // a local fuzzing run's corpus, not committed
            }
            f(&std::fs::read(&p).unwrap());
            n += 1;
        }
    }
    n
}

#[test]
fn every_seed_and_regression_runs_cleanly() {
    use oftool::fuzzing::*;
    let mut total = 0;
    for (t, f) in [
        ("oft_reader", oft_reader as fn(&[u8])),
        ("any_adapter", any_adapter),
        ("structured", structured),
        ("peft_config", peft_config),
        ("pickle", pickle),
        ("resolver", resolver),
    ] {
        let n = replay(t, f);
        assert!(n > 0, "no inputs for {t}");
        total += n;
    }
    assert!(total >= 30, "{total}");
}
