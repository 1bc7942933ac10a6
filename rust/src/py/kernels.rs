//! `weighted_sum` and `convert` over Python buffers.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use super::buffer::Buffer;
use crate::dtype::FloatDtype;
use crate::error::Error;
use crate::kernels::{self, WeightedInput};

pub(super) fn check_no_overlap(out: &Buffer, inputs: &[Buffer]) -> PyResult<()> {
    let o = out.range();
    for (i, b) in inputs.iter().enumerate() {
        let r = b.range();
        if !o.is_empty() && !r.is_empty() && r.start < o.end && o.start < r.end {
            // Rust slices may not alias; an in-place sum would also read rewritten values.
            return Err(PyValueError::new_err(format!(
                "out overlaps inputs[{i}]; write into a separate buffer"
            )));
        }
    }
    Ok(())
}

/// out = sum_i weights[i] * inputs[i], accumulated in float32, written as `out_dtype`.
#[pyfunction]
#[pyo3(signature = (inputs, in_dtypes, weights, out, out_dtype, threads = 0))]
pub fn weighted_sum(
    py: Python<'_>,
    inputs: Vec<Bound<'_, PyAny>>,
    in_dtypes: Vec<String>,
    weights: Vec<f64>,
    out: Bound<'_, PyAny>,
    out_dtype: &str,
    threads: usize,
) -> PyResult<()> {
    if inputs.len() != in_dtypes.len() || inputs.len() != weights.len() {
        return Err(Error::ArgumentCount {
            inputs: inputs.len(),
            dtypes: in_dtypes.len(),
            weights: weights.len(),
        }
        .into());
    }
    let dtypes = in_dtypes
        .iter()
        .map(|c| FloatDtype::parse(c))
        .collect::<Result<Vec<_>, _>>()?;
    let out_dtype = FloatDtype::parse(out_dtype)?;
    let bufs = inputs
        .iter()
        .enumerate()
        .map(|(i, o)| Buffer::get(o, false, &format!("inputs[{i}]")))
        .collect::<PyResult<Vec<_>>>()?;
    let out_buf = Buffer::get(&out, true, "out")?;
    check_no_overlap(&out_buf, &bufs)?;
    // SAFETY: the buffers stay acquired until the end of this function, and `out` does not
    // overlap any input (checked above).
    let (slices, out_slice) = unsafe {
        (
            bufs.iter().map(|b| b.as_slice()).collect::<Vec<_>>(),
            out_buf.as_mut_slice(),
        )
    };
    let winputs: Vec<WeightedInput> = slices
        .iter()
        .zip(&dtypes)
        .zip(&weights)
        .map(|((&data, &dtype), &w)| WeightedInput {
            data,
            dtype,
            weight: w as f32,
        })
        .collect();
    py.detach(|| kernels::weighted_sum(&winputs, out_slice, out_dtype, threads))?;
    Ok(())
}

/// Cast `input` (in_dtype) into `out` (out_dtype) among F32/F16/BF16.
#[pyfunction]
#[pyo3(signature = (input, in_dtype, out, out_dtype, threads = 0))]
pub fn convert(
    py: Python<'_>,
    input: Bound<'_, PyAny>,
    in_dtype: &str,
    out: Bound<'_, PyAny>,
    out_dtype: &str,
    threads: usize,
) -> PyResult<()> {
    let in_dtype = FloatDtype::parse(in_dtype)?;
    let out_dtype = FloatDtype::parse(out_dtype)?;
    let in_buf = Buffer::get(&input, false, "input")?;
    let out_buf = Buffer::get(&out, true, "out")?;
    check_no_overlap(&out_buf, std::slice::from_ref(&in_buf))?;
    // SAFETY: as in `weighted_sum`.
    let (src, dst) = unsafe { (in_buf.as_slice(), out_buf.as_mut_slice()) };
    py.detach(|| kernels::convert(src, in_dtype, dst, out_dtype, threads))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::py::tests::with_py;
    use pyo3::types::{PyByteArray, PyBytes};

    #[test]
    fn sums_python_buffers() {
        with_py(|py| {
            let a = PyBytes::new(py, &[1.0f32, 2.0].map(f32::to_le_bytes).concat());
            let b = PyBytes::new(py, &[0x3f80u16, 0x4000].map(u16::to_le_bytes).concat()); // bf16 1, 2
            let out = PyByteArray::new(py, &[0u8; 8]);
            weighted_sum(
                py,
                vec![a.clone().into_any(), b.into_any()],
                vec!["F32".into(), "BF16".into()],
                vec![0.5, 2.0],
                out.clone().into_any(),
                "F32",
                1,
            )
            .unwrap();
            assert_eq!(out.to_vec(), [2.5f32, 5.0].map(f32::to_le_bytes).concat());

            let e = weighted_sum(
                py,
                vec![a.clone().into_any()],
                vec![],
                vec![1.0],
                out.clone().into_any(),
                "F32",
                1,
            );
            assert!(e.is_err());
            let e = weighted_sum(
                py,
                vec![out.clone().into_any()],
                vec!["F32".into()],
                vec![1.0],
                out.clone().into_any(),
                "F32",
                1,
            );
            assert!(e.unwrap_err().value(py).to_string().contains("overlaps"));

            let out16 = PyByteArray::new(py, &[0u8; 4]);
            convert(py, a.into_any(), "F32", out16.clone().into_any(), "BF16", 0).unwrap();
            assert_eq!(
                out16.to_vec(),
                [0x3f80u16, 0x4000].map(u16::to_le_bytes).concat()
            );
        });
    }
}
