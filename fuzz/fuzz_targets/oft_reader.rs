#![no_main]
//! See `oftool::fuzzing::oft_reader`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    oftool::fuzzing::oft_reader(data);
});
