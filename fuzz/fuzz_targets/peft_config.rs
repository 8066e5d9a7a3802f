#![no_main]
//! See `oftool::fuzzing::peft_config`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    oftool::fuzzing::peft_config(data);
});
