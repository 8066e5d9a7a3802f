#![no_main]
//! See `oftool::fuzzing::structured`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    oftool::fuzzing::structured(data);
});
