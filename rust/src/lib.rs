//! Native core of mergekitty: safetensors I/O over mmaps, shard planning and writing, and CPU
//! merge kernels. Everything except `py/` is plain Rust; `py/` defines the Python module
//! `mergekitty._native` (its `#[pymodule]` lives in `py/mod.rs` so pyo3 stays out of here).

pub mod direct_io;
pub mod dtype;
pub mod error;
pub mod header;
pub mod kernels;
pub mod layout;
pub mod mmap_file;
pub mod platform;
#[cfg(test)]
pub(crate) mod test_rng;
pub mod threads;
pub mod writer;

pub mod py;

pub use error::{Error, ErrorKind, Result};
