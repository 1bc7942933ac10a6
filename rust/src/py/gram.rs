//! `gram` and `weighted_sum_grouped`: the two passes of the geometric merge methods.

use pyo3::prelude::*;

use super::buffer::Buffers;
use super::health::PyTensorHealth;
use super::kernels::parse_dtypes;
use crate::error::Error;
use crate::kernels::gram::{gram as gram_of, Groups, Input};

fn gram_inputs<'a>(slices: &[&'a [u8]], dtypes: &[crate::dtype::FloatDtype]) -> Vec<Input<'a>> {
    slices
        .iter()
        .zip(dtypes)
        .map(|(&data, &dtype)| Input { data, dtype })
        .collect()
}

/// Gram matrices of the vectors of `groups` ("whole", "rows" of `group_len` elements, or
/// "columns": element e in vector e % `group_len`) of `inputs` minus `center` (when given),
/// written to `out` as `count * k * k` little-endian float64 values.
#[pyfunction]
#[pyo3(signature = (inputs, in_dtypes, center, center_dtype, groups, group_len, out, threads = 0))]
#[allow(clippy::too_many_arguments)]
pub fn gram(
    py: Python<'_>,
    inputs: Vec<Bound<'_, PyAny>>,
    in_dtypes: Vec<String>,
    center: Option<Bound<'_, PyAny>>,
    center_dtype: Option<String>,
    groups: &str,
    group_len: usize,
    out: Bound<'_, PyAny>,
    threads: usize,
) -> PyResult<()> {
    let dtypes = parse_dtypes("gram", inputs.len(), &in_dtypes)?;
    let groups = Groups::parse(groups, group_len)?;
    let center_dtype = match (&center, center_dtype) {
        (Some(_), Some(code)) => Some(crate::dtype::FloatDtype::parse(&code)?),
        (None, _) => None,
        (Some(_), None) => {
            return Err(Error::InvalidArgument("center given without center_dtype".into()).into())
        }
    };
    let mut bufs = Buffers::default();
    bufs.inputs(&inputs, "inputs")?;
    if let Some(c) = &center {
        bufs.input(c, "center")?;
    }
    bufs.output(&out, "out")?;
    let (slices, out_bytes) = bufs.slices();
    let k = inputs.len();
    let xs = gram_inputs(&slices[..k], &dtypes);
    let c = center_dtype.map(|dtype| Input {
        data: slices[k],
        dtype,
    });
    if !out_bytes.len().is_multiple_of(8) {
        return Err(Error::InvalidArgument(format!(
            "out: {} bytes is not a whole number of float64 values",
            out_bytes.len()
        ))
        .into());
    }
    let mut result = vec![0f64; out_bytes.len() / 8];
    py.detach(|| gram_of(&xs, c, groups, &mut result, threads))?;
    for (o, v) in out_bytes.chunks_exact_mut(8).zip(&result) {
        o.copy_from_slice(&v.to_le_bytes());
    }
    Ok(())
}

/// `out[e] = sum_i coefs[g(e)][i] * inputs[i][e]` with the grouping of [`gram`]; `coefs` is a
/// buffer of `count * k` little-endian float32 weights. Returns the inputs' and output's health.
#[pyfunction]
#[pyo3(signature = (inputs, in_dtypes, coefs, groups, group_len, out, out_dtype, threads = 0))]
#[allow(clippy::too_many_arguments)]
pub fn weighted_sum_grouped(
    py: Python<'_>,
    inputs: Vec<Bound<'_, PyAny>>,
    in_dtypes: Vec<String>,
    coefs: Bound<'_, PyAny>,
    groups: &str,
    group_len: usize,
    out: Bound<'_, PyAny>,
    out_dtype: &str,
    threads: usize,
) -> PyResult<PyTensorHealth> {
    let dtypes = parse_dtypes("weighted_sum_grouped", inputs.len(), &in_dtypes)?;
    let out_dtype = crate::dtype::FloatDtype::parse(out_dtype)?;
    let groups = Groups::parse(groups, group_len)?;
    let mut bufs = Buffers::default();
    bufs.inputs(&inputs, "inputs")?;
    bufs.input(&coefs, "coefs")?;
    bufs.output(&out, "out")?;
    let (slices, out_bytes) = bufs.slices();
    let k = inputs.len();
    let xs = gram_inputs(&slices[..k], &dtypes);
    let raw = slices[k];
    if !raw.len().is_multiple_of(4) {
        return Err(Error::InvalidArgument(format!(
            "coefs: {} bytes is not a whole number of float32 values",
            raw.len()
        ))
        .into());
    }
    let w: Vec<f32> = raw
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let health = py.detach(|| {
        crate::kernels::weighted_sum_grouped(&xs, &w, groups, out_bytes, out_dtype, threads)
    })?;
    Ok(health.into())
}
