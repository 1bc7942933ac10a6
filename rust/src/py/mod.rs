//! The Python module `mergekitty._native`: the only code in the crate that knows about Python.

use pyo3::exceptions::{PyKeyError, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyTuple, PyType};

use crate::error::{Error, ErrorKind};
use crate::platform;

mod buffer;
mod file;
mod gram;
mod gta;
mod health;
mod kernels;
mod method_kernels;
mod sparsify;
mod task_vector_stats;
mod writer;

/// The module that defines the exception classes raised here.
const ERRORS_MODULE: &str = "mergekitty.errors";

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        Python::attach(|py| match &e {
            Error::Io { path, source } => io_error(py, &path.to_string_lossy(), source),
            _ => error_of_kind(py, e.kind(), e.to_string()),
        })
    }
}

/// The exception raised for errors of `kind` (see `ErrorKind`), with `message`.
pub(crate) fn error_of_kind(py: Python<'_>, kind: ErrorKind, message: String) -> PyErr {
    let (class, fallback) = match kind {
        ErrorKind::Io => ("FileIOError", py.get_type::<PyOSError>()),
        ErrorKind::MalformedFile => ("SafetensorsError", py.get_type::<PyValueError>()),
        ErrorKind::InputChanged => ("ModelFormatError", py.get_type::<PyOSError>()),
        ErrorKind::NotFound => ("TensorNotFoundError", py.get_type::<PyKeyError>()),
        ErrorKind::InvalidArgument => ("InvalidArgumentError", py.get_type::<PyValueError>()),
        ErrorKind::Output => ("ShardWriterError", py.get_type::<PyValueError>()),
    };
    match (message,).into_pyobject(py) {
        Ok(args) => new_error(py, class, &fallback, args),
        Err(e) => e,
    }
}

/// `mergekitty.errors.<class>(*args)`, built now (not lazily) so that constructors which pick
/// a subclass from their arguments (FileIOError) run. `fallback(*args)` if that module cannot
/// be imported (the extension loaded on its own).
fn new_error(
    py: Python<'_>,
    class: &str,
    fallback: &Bound<'_, PyType>,
    args: Bound<'_, PyTuple>,
) -> PyErr {
    let cls = py
        .import(ERRORS_MODULE)
        .and_then(|m| m.getattr(class))
        .unwrap_or_else(|_| fallback.clone().into_any());
    match cls.call1(args) {
        Ok(instance) => PyErr::from_value(instance),
        Err(e) => e,
    }
}

/// FileIOError(errno, strerror, filename): the class picks the errno's subclass (also a
/// FileNotFoundError, PermissionError...) and formats "[Errno 2] ...: 'path'". On Windows the
/// code is a Windows error, given as `winerror` (a fourth argument) for Python to translate.
fn io_error(py: Python<'_>, path: &str, source: &std::io::Error) -> PyErr {
    let oserror = py.get_type::<PyOSError>();
    let args = match platform::os_error_code(source) {
        Some(code) => {
            let text = source.to_string();
            let raw = code.winerror.unwrap_or(code.errno);
            let strerror = text
                .strip_suffix(&format!(" (os error {raw})"))
                .unwrap_or(&text)
                .to_owned();
            match code.winerror {
                None => (code.errno, strerror, path).into_pyobject(py),
                Some(winerror) => (code.errno, strerror, path, winerror).into_pyobject(py),
            }
        }
        None => (format!("{path}: {source}"),).into_pyobject(py),
    };
    match args {
        Ok(args) => new_error(py, "FileIOError", &oserror, args),
        Err(e) => e,
    }
}

/// Which IO implementation this process uses: "portable" when `MERGEKITTY_PORTABLE_IO` is set
/// (read once), else "native" (see `crate::platform`).
#[pyfunction]
fn io_mode() -> &'static str {
    match platform::Io::from_env() {
        platform::Io::Native => "native",
        platform::Io::Portable => "portable",
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(io_mode, m)?)?;
    // The class lives in mergekitty.errors (a ModelFormatError); exported here as well.
    m.add(
        "SafetensorsError",
        m.py().import(ERRORS_MODULE)?.getattr("SafetensorsError")?,
    )?;
    m.add_class::<file::PySafetensorsFile>()?;
    m.add_class::<file::PyTensorView>()?;
    m.add_class::<writer::PyShardWriter>()?;
    m.add_function(wrap_pyfunction!(writer::plan_layout, m)?)?;
    m.add_function(wrap_pyfunction!(writer::shard_digest, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::weighted_sum, m)?)?;
    m.add_function(wrap_pyfunction!(kernels::convert, m)?)?;
    m.add_class::<health::PyTensorHealth>()?;
    m.add_function(wrap_pyfunction!(health::scan_health, m)?)?;
    m.add_function(wrap_pyfunction!(sparsify::magnitude, m)?)?;
    m.add_function(wrap_pyfunction!(sparsify::magnitude_outliers, m)?)?;
    m.add_function(wrap_pyfunction!(sparsify::random_mask, m)?)?;
    m.add_function(wrap_pyfunction!(sparsify::della, m)?)?;
    m.add_function(wrap_pyfunction!(sparsify::combine, m)?)?;
    m.add_function(wrap_pyfunction!(sparsify::uniform, m)?)?;
    m.add_function(wrap_pyfunction!(gram::gram, m)?)?;
    m.add_function(wrap_pyfunction!(gram::weighted_sum_grouped, m)?)?;
    m.add_class::<gta::PySparsity>()?;
    m.add_function(wrap_pyfunction!(gta::gta_merge, m)?)?;
    m.add_function(wrap_pyfunction!(task_vector_stats::task_vector_stats, m)?)?;
    m.add_function(wrap_pyfunction!(method_kernels::nearswap_merge, m)?)?;
    m.add_function(wrap_pyfunction!(method_kernels::sce_merge, m)?)?;
    m.add_function(wrap_pyfunction!(method_kernels::arcee_fusion_merge, m)?)?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use pyo3::exceptions::{PyFileNotFoundError, PyKeyError};

    /// Run `f` with an interpreter (cargo test links libpython; maturin builds don't run this).
    /// The source tree's `python/` is importable, so errors are raised as their real classes.
    pub(crate) fn with_py<R>(f: impl FnOnce(Python<'_>) -> R) -> R {
        Python::initialize();
        Python::attach(|py| {
            let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/python");
            let path = py.import("sys").and_then(|s| s.getattr("path")).unwrap();
            if !path.contains(dir).unwrap() {
                path.call_method1("insert", (0, dir)).unwrap();
            }
            f(py)
        })
    }

    fn class_name(py: Python<'_>, e: &PyErr) -> String {
        e.get_type(py).name().unwrap().to_string()
    }

    fn is_mergekitty_error(py: Python<'_>, e: &PyErr) -> bool {
        let base = py
            .import(ERRORS_MODULE)
            .and_then(|m| m.getattr("MergekittyError"))
            .unwrap();
        e.value(py).is_instance(&base).unwrap()
    }

    #[test]
    fn error_mapping() {
        with_py(|py| {
            // the OS's own error for a missing file, whichever OS this is
            let missing = std::fs::File::open("/no/such/file").unwrap_err();
            let e: PyErr = Error::io("/no/such", missing).into();
            assert!(e.is_instance_of::<PyFileNotFoundError>(py));
            assert_eq!(class_name(py, &e), "MissingFileError");
            let s = e.value(py).to_string();
            assert!(s.contains("/no/such"), "{s}");
            #[cfg(unix)]
            assert!(s.contains("No such file"), "{s}");
            let errno: i32 = e.value(py).getattr("errno").unwrap().extract().unwrap();
            assert_eq!(errno, 2); // ENOENT, on every platform

            let e: PyErr = Error::io("/x", std::io::Error::other("odd")).into();
            assert!(e.is_instance_of::<PyOSError>(py));
            assert_eq!(class_name(py, &e), "FileIOError");

            let e: PyErr = Error::FileTooSmall {
                path: "/m/x".into(),
                len: 1,
            }
            .into();
            assert_eq!(class_name(py, &e), "SafetensorsError");
            assert!(e.value(py).to_string().contains("/m/x"));

            let e: PyErr = Error::TensorNotFound {
                path: "/m/x".into(),
                tensor: "w".into(),
            }
            .into();
            assert!(e.is_instance_of::<PyKeyError>(py));
            assert_eq!(class_name(py, &e), "TensorNotFoundError");
            // the plain message, not KeyError's quoted repr
            assert!(e.value(py).to_string().starts_with("tensor \"w\""));

            let e: PyErr = Error::InvalidArgument("bad".into()).into();
            assert!(e.is_instance_of::<PyValueError>(py));
            assert_eq!(class_name(py, &e), "InvalidArgumentError");

            let e: PyErr = Error::AlreadyWritten("w".into()).into();
            assert!(e.is_instance_of::<PyValueError>(py));
            assert_eq!(class_name(py, &e), "ShardWriterError");

            let all = [
                Error::io("/x", std::io::Error::from_raw_os_error(13)), // EACCES on unix
                Error::HeaderNotUtf8 { path: "/x".into() },
                Error::UnknownDtype("Q".into()),
                Error::WriterClosed("finalized"),
            ];
            for e in all {
                let e: PyErr = e.into();
                assert!(is_mergekitty_error(py, &e), "{}", class_name(py, &e));
            }
        });
    }
}
