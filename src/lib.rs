//! oftool: read, check, bake, compose and convert Orthogonal Finetuning (OFT/BOFT) adapters.
//!
//! The canonical model ([`model`]) and its file format ([`oft_file`], `spec/oft-format.md`) sit
//! at the centre; [`layouts`] maps every producer's layout onto it and back, [`apply`] computes
//! merged weights from it, [`base`] opens the checkpoints adapters target, and the command modules
//! ([`inspect`], [`validate`], [`convert`], [`compose`], [`bake`]) are what `src/main.rs` calls.
//! The library takes typed arguments and sets no process-wide state; parsing `PATH:S`,
//! drawing progress and process setup are the binary's.

#![warn(missing_docs)]

pub mod apply;
pub mod bake;
pub mod base;
pub mod bridge;
#[doc(hidden)]
pub mod candle_rotate;
pub mod compose;
pub mod convert;
#[doc(hidden)]
pub mod device_check;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod inspect;
pub mod layouts;
pub mod lowrank;
pub mod model;
pub mod oft_file;
pub(crate) mod pickle;
pub mod procrustes;
pub(crate) mod resolve;
pub(crate) mod rotation;
pub mod strength;
pub(crate) mod tensors;
pub mod validate;
pub(crate) mod wiring;

pub use error::{Error, Result};
