#![no_main]
//! See `oftool::fuzzing::pickle`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    oftool::fuzzing::pickle(data);
});
