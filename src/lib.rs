//! oftool: read, check, bake, compose and convert Orthogonal Finetuning (OFT/BOFT) adapters.
//!
//! The canonical model ([`model`]) and its file format ([`oft_file`], `spec/oft-format.md`) sit
//! at the centre; [`import`] maps every producer's layout onto it, [`apply`] computes merged
//! weights from it, and the command modules ([`inspect`], [`validate`], [`convert`]) are what
//! `src/main.rs` calls.

pub mod apply;
pub mod bake;
#[doc(hidden)]
pub mod candle_rotate;
pub mod compose;
pub mod convert;
#[doc(hidden)]
pub mod device_check;
pub mod error;
pub mod export;
#[doc(hidden)]
pub mod fuzzing;
pub mod import;
pub mod inspect;
pub mod model;
pub mod oft_file;
pub mod pickle;
pub mod resolve;
pub mod rotation;
pub mod strength;
pub mod tensors;
pub mod validate;
pub mod wiring;

pub use error::{Error, Result};

/// Process setup for the command line: a file-size limit (`ulimit -f`) must surface as an
/// ordinary write error ("File too large"), not kill the process with SIGXFSZ midway.
pub fn init_process() {
    #[cfg(unix)]
    // SAFETY: setting a signal disposition to SIG_IGN at startup, before any thread exists.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    // Bakes allocate a few tensor-sized buffers per tensor: keep freed memory in the heap for
    // reuse instead of returning it to the kernel and faulting fresh zeroed pages each time.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes glibc's allocator; called once at startup.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 512 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
