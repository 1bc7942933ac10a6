//! `SafetensorsFile` and the zero-copy `TensorView` it hands out.

use std::ffi::{c_int, c_void};
use std::path::PathBuf;

use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};

use crate::mmap_file::{MappedBytes, SafetensorsFile};

#[pyclass(frozen, module = "mergekitty._native", name = "SafetensorsFile")]
pub struct PySafetensorsFile {
    inner: SafetensorsFile,
    path: String,
}

#[pymethods]
impl PySafetensorsFile {
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let shown = path.to_string_lossy().into_owned();
        let inner = py.detach(|| SafetensorsFile::open(&path))?;
        Ok(PySafetensorsFile { inner, path: shown })
    }

    #[getter]
    fn path(&self) -> &str {
        &self.path
    }

    #[getter]
    fn nbytes(&self) -> u64 {
        self.inner.len()
    }

    /// The `__metadata__` entry, or None.
    fn metadata<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let Some(meta) = self.inner.metadata() else {
            return Ok(None);
        };
        let d = PyDict::new(py);
        for (k, v) in meta {
            d.set_item(k, v)?;
        }
        Ok(Some(d))
    }

    /// (name, dtype, shape, start, end), absolute byte offsets, sorted by start. Built straight
    /// into Python objects (no intermediate copy), with one string object per dtype code.
    fn tensors<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let list = PyList::empty(py);
        for t in self.inner.tensors() {
            let (s, e) = self.inner.absolute_range(t);
            let dtype = PyString::intern(py, t.dtype.code());
            list.append((t.name.as_str(), dtype, t.shape.as_slice(), s, e))?;
        }
        Ok(list)
    }

    /// A read-only, zero-copy buffer over the tensor's bytes.
    fn view(&self, name: &str) -> PyResult<PyTensorView> {
        let bytes = self.inner.bytes(name)?;
        let len = bytes.len() as ffi::Py_ssize_t;
        Ok(PyTensorView {
            bytes,
            name: name.to_owned(),
            shape: [len],
            strides: [1],
        })
    }

    fn prefetch(&self, py: Python<'_>, name: &str) -> PyResult<()> {
        Ok(py.detach(|| self.inner.prefetch(name))?)
    }

    fn release(&self, py: Python<'_>, name: &str) -> PyResult<()> {
        Ok(py.detach(|| self.inner.release(name))?)
    }

    /// Raise ModelFormatError naming the file if it changed since it was opened (a read ran
    /// past its end because it shrank, or its size, inode or mtime differ).
    fn check_intact(&self, py: Python<'_>) -> PyResult<()> {
        Ok(py.detach(|| self.inner.check_intact())?)
    }

    fn __contains__(&self, name: &str) -> bool {
        self.inner.header().get(name).is_some()
    }

    fn __len__(&self) -> usize {
        self.inner.tensors().len()
    }

    fn __repr__(&self) -> String {
        format!(
            "SafetensorsFile({:?}, {} tensors, {} bytes)",
            self.path,
            self.inner.tensors().len(),
            self.inner.len()
        )
    }
}

/// Read-only bytes of one tensor, exported through the buffer protocol as a 1-D "B" buffer.
/// Holds the mapping alive, so it may outlive its `SafetensorsFile`.
#[pyclass(frozen, module = "mergekitty._native", name = "TensorView")]
pub struct PyTensorView {
    bytes: MappedBytes,
    name: String,
    // Py_buffer points at these; they live as long as the object, which the buffer references.
    shape: [ffi::Py_ssize_t; 1],
    strides: [ffi::Py_ssize_t; 1],
}

#[pymethods]
impl PyTensorView {
    fn __len__(&self) -> usize {
        self.bytes.len()
    }

    fn __repr__(&self) -> String {
        format!("TensorView({:?}, {} bytes)", self.name, self.bytes.len())
    }

    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        if view.is_null() {
            return Err(PyBufferError::new_err("null Py_buffer"));
        }
        if flags & ffi::PyBUF_WRITABLE == ffi::PyBUF_WRITABLE {
            return Err(PyBufferError::new_err("TensorView is read-only"));
        }
        let me = slf.get();
        // A slice pointer is never null, even for an empty tensor.
        let data = me.bytes.as_slice().as_ptr();
        // SAFETY: `view` is a valid Py_buffer to fill (checked non-null above). The pointers
        // stored in it stay valid while `obj` (a strong reference to this object) lives.
        unsafe {
            (*view).buf = data as *mut c_void;
            (*view).len = me.shape[0];
            (*view).readonly = 1;
            (*view).itemsize = 1;
            (*view).format = if flags & ffi::PyBUF_FORMAT == ffi::PyBUF_FORMAT {
                c"B".as_ptr().cast_mut()
            } else {
                std::ptr::null_mut()
            };
            (*view).ndim = 1;
            (*view).shape = if flags & ffi::PyBUF_ND == ffi::PyBUF_ND {
                me.shape.as_ptr().cast_mut()
            } else {
                std::ptr::null_mut()
            };
            (*view).strides = if flags & ffi::PyBUF_STRIDES == ffi::PyBUF_STRIDES {
                me.strides.as_ptr().cast_mut()
            } else {
                std::ptr::null_mut()
            };
            (*view).suboffsets = std::ptr::null_mut();
            (*view).internal = std::ptr::null_mut();
            (*view).obj = slf.into_any().into_ptr();
        }
        Ok(())
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {
        // Nothing was allocated per export; the reference in `obj` is dropped by Python.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::header::build_file;
    use crate::mmap_file::tests::TempDir;
    use crate::py::buffer::Buffer;
    use crate::py::tests::with_py;

    #[test]
    fn view_exports_bytes() {
        let dir = TempDir::new("pyfile");
        let p = dir.0.join("a.safetensors");
        std::fs::write(
            &p,
            build_file(
                r#"{"x":{"dtype":"U8","shape":[3],"data_offsets":[1,4]},"z":{"dtype":"U8","shape":[0],"data_offsets":[4,4]}}"#,
                &[0, 7, 8, 9],
            ),
        )
        .unwrap();
        with_py(|py| {
            let f = PySafetensorsFile::new(py, p.clone()).unwrap();
            let first = f.tensors(py).unwrap().get_item(0).unwrap();
            assert_eq!(first.get_item(0).unwrap().extract::<String>().unwrap(), "x");
            let v = Bound::new(py, f.view("x").unwrap()).unwrap();
            drop(f);
            let b = Buffer::get(v.as_any(), false, "v").unwrap();
            assert_eq!(unsafe { b.as_slice() }, &[7, 8, 9]);
            assert!(Buffer::get(v.as_any(), true, "v").is_err());
            let f = PySafetensorsFile::new(py, p.clone()).unwrap();
            let z = Bound::new(py, f.view("z").unwrap()).unwrap();
            assert_eq!(Buffer::get(z.as_any(), false, "z").unwrap().len(), 0);
            assert!(f.view("nope").is_err());
        });
    }
}
