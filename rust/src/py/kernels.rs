//! `weighted_sum` and `convert` over Python buffers.

use pyo3::prelude::*;

use super::buffer::Buffers;
use super::health::PyTensorHealth;
use crate::dtype::FloatDtype;
use crate::error::Error;
use crate::kernels::gta::Tensor;
use crate::kernels::{self, WeightedInput};

/// The kernel dtypes of `count` inputs from their codes; `caller` names the function in the
/// error when there are not as many codes as inputs.
pub(super) fn parse_dtypes(
    caller: &str,
    count: usize,
    codes: &[String],
) -> Result<Vec<FloatDtype>, Error> {
    if count != codes.len() {
        return Err(Error::InvalidArgument(format!(
            "{caller}: {count} inputs but {} dtypes",
            codes.len()
        )));
    }
    codes.iter().map(|c| FloatDtype::parse(c)).collect()
}

/// The tensors of a kernel's inputs: each buffer of `slices` with its dtype.
pub(super) fn tensors<'a>(slices: &[&'a [u8]], dtypes: &[FloatDtype]) -> Vec<Tensor<'a>> {
    slices
        .iter()
        .zip(dtypes)
        .map(|(&data, &dtype)| Tensor { data, dtype })
        .collect()
}

/// out = sum_i weights[i] * inputs[i], accumulated in float32, written as `out_dtype`.
/// Returns the inputs' and the output's `TensorHealth`.
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
) -> PyResult<PyTensorHealth> {
    if inputs.len() != in_dtypes.len() || inputs.len() != weights.len() {
        return Err(Error::ArgumentCount {
            inputs: inputs.len(),
            dtypes: in_dtypes.len(),
            weights: weights.len(),
        }
        .into());
    }
    let dtypes = parse_dtypes("weighted_sum", inputs.len(), &in_dtypes)?;
    let out_dtype = FloatDtype::parse(out_dtype)?;
    let mut bufs = Buffers::default();
    bufs.inputs(&inputs, "inputs")?;
    bufs.output(&out, "out")?;
    let (slices, out_slice) = bufs.slices();
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
    let health = py.detach(|| kernels::weighted_sum(&winputs, out_slice, out_dtype, threads))?;
    Ok(health.into())
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
    let mut bufs = Buffers::default();
    bufs.input(&input, "input")?;
    bufs.output(&out, "out")?;
    let (inputs, dst) = bufs.slices();
    let src = inputs[0];
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
            let health = weighted_sum(
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
            assert_eq!(health.input_sumsq(), [5.0, 5.0]);
            assert_eq!(health.input_nonfinite(), [0, 0]);
            assert_eq!(health.output_sumsq(), 2.5 * 2.5 + 25.0);

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
