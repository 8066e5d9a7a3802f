//! oftool: read, check, bake, compose and convert Orthogonal Finetuning (OFT/BOFT) adapters.
//!
//! The canonical model ([`model`]) and its file format ([`oft_file`], `spec/oft-format.md`) sit
//! at the centre; [`import`] maps every producer's layout onto it, [`apply`] computes merged
//! weights from it, and the command modules ([`inspect`], [`validate`], [`convert`]) are what
//! `src/main.rs` calls.

pub mod apply;
pub mod bake;
pub mod convert;
pub mod error;
pub mod import;
pub mod inspect;
pub mod model;
pub mod oft_file;
pub mod resolve;
pub mod rotation;
pub mod tensors;
pub mod validate;
pub mod wiring;

pub use error::{Error, Result};
