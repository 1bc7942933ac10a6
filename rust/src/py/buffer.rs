//! Borrow the bytes of any object that exports the buffer protocol (numpy arrays, bytearray,
//! memoryview, our TensorView). Unlike `PyBuffer<u8>`, the element format is ignored: kernels
//! take raw bytes plus a dtype code, so a float32 numpy array is as good as a uint8 view.

use std::mem::MaybeUninit;

use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;

use crate::error::Error;

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

/// The buffers of one kernel call, acquired together: read-only inputs and at most one
/// writable output that overlaps none of them (Rust slices may not alias, and an in-place
/// kernel would read values it already rewrote), so all their slices can be handed out at once.
#[derive(Default)]
pub struct Buffers {
    inputs: Vec<(Buffer, String)>,
    out: Option<(Buffer, String)>,
}

impl Buffers {
    /// Add a read-only input; `what` names it in errors.
    pub fn input(&mut self, obj: &Bound<'_, PyAny>, what: &str) -> PyResult<()> {
        let buf = Buffer::get(obj, false, what)?;
        if let Some((out, out_name)) = &self.out {
            check_disjoint(out, out_name, &buf, what)?;
        }
        self.inputs.push((buf, what.to_owned()));
        Ok(())
    }

    /// Add every object of `objs` as an input, named `what[i]`.
    pub fn inputs(&mut self, objs: &[Bound<'_, PyAny>], what: &str) -> PyResult<()> {
        for (i, o) in objs.iter().enumerate() {
            self.input(o, &format!("{what}[{i}]"))?;
        }
        Ok(())
    }

    /// Set the writable output.
    pub fn output(&mut self, obj: &Bound<'_, PyAny>, what: &str) -> PyResult<()> {
        let buf = Buffer::get(obj, true, what)?;
        for (b, name) in &self.inputs {
            check_disjoint(&buf, what, b, name)?;
        }
        self.out = Some((buf, what.to_owned()));
        Ok(())
    }

    /// The inputs' bytes in the order they were added, and the output's (empty without one).
    /// Borrowing `self` mutably keeps the output slice unique.
    pub fn slices(&mut self) -> (Vec<&[u8]>, &mut [u8]) {
        // SAFETY: the slices borrow `self`, which holds every buffer acquired; the output was
        // checked to overlap no input, and `&mut self` prevents a second output slice.
        unsafe {
            let inputs = self.inputs.iter().map(|(b, _)| b.as_slice()).collect();
            let out = match &self.out {
                Some((b, _)) => b.as_mut_slice(),
                None => &mut [],
            };
            (inputs, out)
        }
    }

    /// The output as float32 elements, for the in-place kernels: a whole number of 4-byte
    /// aligned floats (a numpy view of a contiguous float32 CPU tensor is).
    pub fn out_f32(&mut self) -> PyResult<&mut [f32]> {
        Ok(self.slices_f32()?.1)
    }

    /// The inputs' bytes and the output as float32 elements (checked as [`Buffers::out_f32`]),
    /// for a kernel that reads the inputs and works in a float32 buffer of the caller's.
    pub fn slices_f32(&mut self) -> PyResult<(Vec<&[u8]>, &mut [f32])> {
        let what = self
            .out
            .as_ref()
            .map_or("out", |(_, n)| n.as_str())
            .to_owned();
        let (inputs, bytes) = self.slices();
        if !bytes.len().is_multiple_of(4) {
            return Err(Error::InvalidArgument(format!(
                "{what}: {} bytes is not a whole number of float32 elements",
                bytes.len()
            ))
            .into());
        }
        if !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<f32>()) {
            return Err(
                Error::InvalidArgument(format!("{what}: buffer is not 4-byte aligned")).into(),
            );
        }
        // SAFETY: the pointer is non-null and 4-byte aligned, the length is a whole number of
        // f32s, every bit pattern is a valid f32, and the borrow is that of `bytes`.
        let floats = unsafe {
            std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<f32>(), bytes.len() / 4)
        };
        Ok((inputs, floats))
    }
}

fn check_disjoint(out: &Buffer, out_name: &str, input: &Buffer, name: &str) -> PyResult<()> {
    let (o, r) = (out.range(), input.range());
    if !o.is_empty() && !r.is_empty() && r.start < o.end && o.start < r.end {
        return Err(Error::InvalidArgument(format!(
            "{out_name} overlaps {name}; write into a separate buffer"
        ))
        .into());
    }
    Ok(())
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
