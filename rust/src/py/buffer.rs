//! Borrow the bytes of any object that exports the buffer protocol (numpy arrays, bytearray,
//! memoryview, our TensorView). Unlike `PyBuffer<u8>`, the element format is ignored: kernels
//! take raw bytes plus a dtype code, so a float32 numpy array is as good as a uint8 view.

use std::mem::MaybeUninit;

use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;

pub struct Buffer {
    // Boxed so the Py_buffer keeps its address until PyBuffer_Release.
    view: Box<ffi::Py_buffer>,
}

impl Buffer {
    /// Acquire a C-contiguous buffer (writable if asked). `what` names the argument in errors.
    pub fn get(obj: &Bound<'_, PyAny>, writable: bool, what: &str) -> PyResult<Buffer> {
        let py = obj.py();
        let mut raw = Box::new(MaybeUninit::<ffi::Py_buffer>::zeroed());
        let flags = ffi::PyBUF_C_CONTIGUOUS | if writable { ffi::PyBUF_WRITABLE } else { 0 };
        // SAFETY: `raw` is valid for writes; on success the exporter fills it in.
        let rc = unsafe { ffi::PyObject_GetBuffer(obj.as_ptr(), raw.as_mut_ptr(), flags) };
        if rc != 0 {
            // Keep the exporter's exception type, add which argument it was about.
            let err = PyErr::fetch(py);
            return Err(PyErr::from_type(
                err.get_type(py),
                format!("{what}: {}", err.value(py)),
            ));
        }
        // SAFETY: PyObject_GetBuffer succeeded, so the struct is initialized.
        let view: Box<ffi::Py_buffer> = unsafe { Box::from_raw(Box::into_raw(raw).cast()) };
        let buf = Buffer { view };
        // SAFETY: the view is live.
        if unsafe { ffi::PyBuffer_IsContiguous(&*buf.view, b'C' as _) } == 0 {
            return Err(PyBufferError::new_err(format!(
                "{what}: buffer is not C-contiguous"
            )));
        }
        if writable && buf.view.readonly != 0 {
            return Err(PyBufferError::new_err(format!(
                "{what}: buffer is read-only"
            )));
        }
        Ok(buf)
    }

    pub fn len(&self) -> usize {
        self.view.len.max(0) as usize
    }

    fn ptr(&self) -> *mut u8 {
        let p = self.view.buf.cast::<u8>();
        // Some exporters hand out null for empty buffers; slices need a non-null pointer.
        if p.is_null() {
            std::ptr::NonNull::dangling().as_ptr()
        } else {
            p
        }
    }

    /// Address range, for overlap checks.
    pub fn range(&self) -> std::ops::Range<usize> {
        let start = self.ptr() as usize;
        start..start + self.len()
    }

    /// SAFETY: the caller must not let the slice outlive `self`, and must not hold a mutable
    /// slice of overlapping memory at the same time.
    pub unsafe fn as_slice(&self) -> &[u8] {
        unsafe { std::slice::from_raw_parts(self.ptr(), self.len()) }
    }

    /// SAFETY: as `as_slice`, and no other slice of this memory may be live.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn as_mut_slice(&self) -> &mut [u8] {
        unsafe { std::slice::from_raw_parts_mut(self.ptr(), self.len()) }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // PyBuffer_Release needs the interpreter; attaching is a no-op when already attached.
        Python::attach(|_| unsafe { ffi::PyBuffer_Release(&mut *self.view) });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::py::tests::with_py;
    use pyo3::types::{PyByteArray, PyBytes};

    #[test]
    fn reads_and_writes() {
        with_py(|py| {
            let ba = PyByteArray::new(py, &[1, 2, 3]);
            let b = Buffer::get(ba.as_any(), true, "out").unwrap();
            assert_eq!(b.len(), 3);
            unsafe { b.as_mut_slice()[0] = 9 };
            drop(b);
            assert_eq!(ba.to_vec(), [9, 2, 3]);

            let bytes = PyBytes::new(py, b"xy");
            assert_eq!(
                unsafe { Buffer::get(bytes.as_any(), false, "in").unwrap().as_slice() },
                b"xy"
            );
            let e = Buffer::get(bytes.as_any(), true, "out").err().unwrap();
            assert!(e.value(py).to_string().starts_with("out: "));
            let e = Buffer::get(
                &3i32.into_pyobject(py).unwrap().into_any(),
                false,
                "inputs[0]",
            );
            assert!(e
                .err()
                .unwrap()
                .value(py)
                .to_string()
                .starts_with("inputs[0]: "));

            let empty = PyByteArray::new(py, &[]);
            let b = Buffer::get(empty.as_any(), true, "e").unwrap();
            assert!(unsafe { b.as_slice() }.is_empty());
        });
    }
}
