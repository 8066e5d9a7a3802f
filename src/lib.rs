//! oftool: read, check, bake, compose and convert Orthogonal Finetuning (OFT/BOFT) adapters.
//!
//! The canonical model ([`model`]) and its file format ([`oft_file`], `spec/oft-format.md`) sit
//! at the centre; [`layouts`] maps every producer's layout onto it and back, [`apply`] computes
//! merged weights from it, [`base`] opens the checkpoints adapters target, and the command modules
//! ([`inspect`], [`validate`], [`convert`], [`compose`], [`bake`]) are what `src/main.rs` calls.
//! The library takes typed arguments and sets no process-wide state; parsing `PATH:S`,
//! drawing progress and process setup are the binary's.

#![warn(missing_docs)]

#[allow(missing_docs)] // not yet documented item by item
pub mod apply;
#[allow(missing_docs)] // not yet documented item by item
pub mod bake;
#[allow(missing_docs)] // not yet documented item by item
pub mod base;
#[allow(missing_docs)] // not yet documented item by item
pub mod compose;
#[allow(missing_docs)] // not yet documented item by item
pub mod convert;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
#[allow(missing_docs)] // not yet documented item by item
pub mod inspect;
#[allow(missing_docs)] // not yet documented item by item
pub mod layouts;
#[allow(missing_docs)] // not yet documented item by item
pub mod lowrank;
#[allow(missing_docs)] // not yet documented item by item
pub mod model;
#[allow(missing_docs)] // not yet documented item by item
pub mod oft_file;
pub(crate) mod pickle;
#[allow(missing_docs)] // not yet documented item by item
pub mod procrustes;
pub(crate) mod resolve;
pub(crate) mod rotation;
#[allow(missing_docs)] // not yet documented item by item
pub mod strength;
pub(crate) mod tensors;
#[allow(missing_docs)] // not yet documented item by item
pub mod validate;
pub(crate) mod wiring;

pub use error::{Error, Result};
