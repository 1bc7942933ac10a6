//! The Python module `mergekitty._native`: the only code in the crate that knows about Python.

use pyo3::exceptions::{PyException, PyKeyError, PyOSError, PyValueError};
use pyo3::prelude::*;

use crate::error::Error;

mod buffer;
mod file;
mod gta;
mod kernels;
mod sparsify;
mod writer;

pyo3::create_exception!(
    mergekitty._native,
    SafetensorsError,
    PyException,
    "A file is not a valid safetensors file; the message names the file and the tensor."
);

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        match e {
            Error::Io { path, source } => os_error(&path.to_string_lossy(), &source),
            e if e.is_malformed_file() => SafetensorsError::new_err(e.to_string()),
            e @ Error::TensorNotFound { .. } => PyKeyError::new_err(e.to_string()),
            e => PyValueError::new_err(e.to_string()),
        }
    }
}

/// OSError(errno, strerror, filename): Python picks the subclass from errno
/// (FileNotFoundError, PermissionError...) and formats "[Errno 2] ...: 'path'".
fn os_error(path: &str, source: &std::io::Error) -> PyErr {
    match source.raw_os_error() {
        Some(errno) => {
            let text = source.to_string();
            let strerror = text
                .strip_suffix(&format!(" (os error {errno})"))
                .unwrap_or(&text)
                .to_owned();
            // Build the instance now (not lazily) so the errno -> subclass mapping applies.
            Python::attach(|py| {
                match py
                    .get_type::<PyOSError>()
                    .call1((errno, strerror.as_str(), path))
                {
                    Ok(instance) => PyErr::from_value(instance),
                    Err(e) => e,
                }
            })
        }
        None => PyOSError::new_err(format!("{path}: {source}")),
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("SafetensorsError", m.py().get_type::<SafetensorsError>())?;
    m.add_class::<file::PySafetensorsFile>()?;
    m.add_class::<file::PyTensorView>()?;
    m.add_class::<writer::PyShardWriter>()?;
    m.add_function(wrap_pyfunction!(kernels::weighted_sum, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::convert, m)?)?;
    m.add_function(wrap_pyfunction!(sparsify::magnitude, m)?)?;
    m.add_function(wrap_pyfunction!(sparsify::magnitude_outliers, m)?)?;
    m.add_function(wrap_pyfunction!(sparsify::random_mask, m)?)?;
    m.add_function(wrap_pyfunction!(sparsify::della, m)?)?;
    m.add_function(wrap_pyfunction!(sparsify::combine, m)?)?;
    m.add_function(wrap_pyfunction!(sparsify::uniform, m)?)?;
    m.add_function(wrap_pyfunction!(gta::gta_thresholds, m)?)?;
    m.add_function(wrap_pyfunction!(gta::gta_combine, m)?)?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use pyo3::exceptions::{PyFileNotFoundError, PyKeyError};

    /// Run `f` with an interpreter (cargo test links libpython; maturin builds don't run this).
    pub(crate) fn with_py<R>(f: impl FnOnce(Python<'_>) -> R) -> R {
        Python::initialize();
        Python::attach(f)
    }

    #[test]
    fn error_mapping() {
        with_py(|py| {
            let e: PyErr =
                Error::io("/no/such", std::io::Error::from_raw_os_error(libc::ENOENT)).into();
            assert!(e.is_instance_of::<PyFileNotFoundError>(py));
            let s = e.value(py).to_string();
            assert!(s.contains("/no/such") && s.contains("No such file"), "{s}");

            let e: PyErr = Error::FileTooSmall {
                path: "/m/x".into(),
                len: 1,
            }
            .into();
            assert!(e.is_instance_of::<SafetensorsError>(py));
            assert!(e.value(py).to_string().contains("/m/x"));

            let e: PyErr = Error::TensorNotFound {
                path: "/m/x".into(),
                tensor: "w".into(),
            }
            .into();
            assert!(e.is_instance_of::<PyKeyError>(py));
            let e: PyErr = Error::AlreadyWritten("w".into()).into();
            assert!(e.is_instance_of::<PyValueError>(py));
        });
    }
}
