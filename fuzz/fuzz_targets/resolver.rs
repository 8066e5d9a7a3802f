#![no_main]
//! See `oftool::fuzzing::resolver`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    oftool::fuzzing::resolver(data);
});
