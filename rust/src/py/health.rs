//! `TensorHealth`, what the kernel calls return about their inputs and output, and
//! `scan_health`, the same figures for a tensor no kernel computes (a copy).

use pyo3::prelude::*;

use super::buffer::Buffers;
use crate::dtype::FloatDtype;
use crate::kernels::{self, Health};

/// Non-finite element counts and sums of squares (of the finite elements, in float64) of each
/// input of a kernel call, in the order the call takes them, and of its output as written.
#[derive(Debug)]
#[pyclass(frozen, module = "mergekitty._native", name = "TensorHealth")]
pub struct PyTensorHealth {
    inner: Health,
}

impl From<Health> for PyTensorHealth {
    fn from(inner: Health) -> Self {
        PyTensorHealth { inner }
    }
}

#[pymethods]
impl PyTensorHealth {
    #[getter]
    pub(crate) fn input_nonfinite(&self) -> Vec<u64> {
        self.inner.inputs.iter().map(|s| s.nonfinite).collect()
    }

    #[getter]
    pub(crate) fn input_sumsq(&self) -> Vec<f64> {
        self.inner.inputs.iter().map(|s| s.sumsq).collect()
    }

    #[getter]
    pub(crate) fn output_nonfinite(&self) -> u64 {
        self.inner.output.nonfinite
    }

    #[getter]
    pub(crate) fn output_sumsq(&self) -> f64 {
        self.inner.output.sumsq
    }

    fn __repr__(&self) -> String {
        format!(
            "TensorHealth(input_nonfinite={:?}, input_sumsq={:?}, output_nonfinite={}, output_sumsq={:?})",
            self.input_nonfinite(),
            self.input_sumsq(),
            self.inner.output.nonfinite,
            self.inner.output.sumsq
        )
    }
}

/// The figures of one tensor (`dtype` F32, F16 or BF16) in one pass: a `TensorHealth` whose one
/// input and output are both that tensor.
#[pyfunction]
#[pyo3(signature = (data, dtype, threads = 0))]
pub fn scan_health(
    py: Python<'_>,
    data: Bound<'_, PyAny>,
    dtype: &str,
    threads: usize,
) -> PyResult<PyTensorHealth> {
    let dtype = FloatDtype::parse(dtype)?;
    let mut bufs = Buffers::default();
    bufs.input(&data, "data")?;
    let (slices, _) = bufs.slices();
    let src = slices[0];
    let stats = py.detach(|| kernels::scan_tensor(src, dtype, threads))?;
    Ok(Health {
        inputs: vec![stats],
        output: stats,
    }
    .into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::py::tests::with_py;
    use pyo3::types::PyBytes;

    #[test]
    fn scans_a_python_buffer() {
        with_py(|py| {
            let b = PyBytes::new(py, &[3.0f32, f32::NAN, 4.0].map(f32::to_le_bytes).concat());
            let h = scan_health(py, b.clone().into_any(), "F32", 1).unwrap();
            assert_eq!(h.input_nonfinite(), [1]);
            assert_eq!(h.input_sumsq(), [25.0]);
            assert_eq!((h.output_nonfinite(), h.output_sumsq()), (1, 25.0));
            assert!(h.__repr__().starts_with("TensorHealth(input_nonfinite=[1]"));
            assert!(scan_health(py, b.into_any(), "I8", 1).is_err());
            let ragged = PyBytes::new(py, &[0u8; 5]);
            assert!(scan_health(py, ragged.into_any(), "BF16", 1).is_err());
        });
    }
}
