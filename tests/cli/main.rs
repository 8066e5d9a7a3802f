//! The integration tests: one binary (one link after a library change), a module per area.
//! Each runs the real `oftool` binary on real files, or the library's public API.

#![allow(clippy::needless_range_loop)]
#![allow(dead_code)]

mod algebra;
mod bad_input;
mod bad_inputs;
mod basics;
mod bridge;
mod candle;
mod clients;
mod common;
mod conformance;
mod convert;
mod device;
mod dit;
mod dit_check;
mod faults;
mod fixtures;
mod fuzz_corpus;
mod merge;
mod messages;
mod pickle;
mod spec_vectors;
