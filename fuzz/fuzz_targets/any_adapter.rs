#![no_main]
//! See `oftool::fuzzing::any_adapter`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    oftool::fuzzing::any_adapter(data);
});
