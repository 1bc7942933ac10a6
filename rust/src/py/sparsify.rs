//! Sparsification, consensus and the counter-based generator over Python buffers.
//!
//! The sparsifiers work in place on a writable float32 buffer (a numpy view of a contiguous
//! CPU float32 tensor: 4-byte aligned, native little-endian). Every call releases the GIL.

use pyo3::prelude::*;

use super::buffer::Buffers;
use crate::dtype::FloatDtype;
use crate::kernels::consensus::{self, Combine};
use crate::kernels::random::{self, Stream};
use crate::kernels::sparsify::{self, Rescale};

/// Zero all but the `max(1, floor(density*n))` largest magnitudes (ties at the threshold kept,
/// NaN counts as largest), in place; `rescale_l1` multiplies by `sum|x| / sum|kept|`.
#[pyfunction]
#[pyo3(signature = (x, density, rescale_l1 = false, threads = 0))]
pub fn magnitude(
    py: Python<'_>,
    x: Bound<'_, PyAny>,
    density: f64,
    rescale_l1: bool,
    threads: usize,
) -> PyResult<()> {
    let mut bufs = Buffers::default();
    bufs.output(&x, "x")?;
    let xs = bufs.out_f32()?;
    py.detach(|| sparsify::magnitude(xs, density, rescale_l1, threads))?;
    Ok(())
}

/// Breadcrumbs: keep the band of magnitudes below the `floor(gamma*n)` largest, about
/// `density*n` wide (docs/kernels.md), in place.
#[pyfunction]
#[pyo3(signature = (x, density, gamma, rescale_l1 = false, threads = 0))]
pub fn magnitude_outliers(
    py: Python<'_>,
    x: Bound<'_, PyAny>,
    density: f64,
    gamma: f64,
    rescale_l1: bool,
    threads: usize,
) -> PyResult<()> {
    let mut bufs = Buffers::default();
    bufs.output(&x, "x")?;
    let xs = bufs.out_f32()?;
    py.detach(|| sparsify::magnitude_outliers(xs, density, gamma, rescale_l1, threads))?;
    Ok(())
}

/// DARE: keep element i when `uniform(seed, key, i) < density`, in place;
/// rescale is "inverse" (divide by density), "l1" or "none".
#[pyfunction]
#[pyo3(signature = (x, density, seed, key, rescale = "inverse", threads = 0))]
pub fn random_mask(
    py: Python<'_>,
    x: Bound<'_, PyAny>,
    density: f64,
    seed: u64,
    key: &str,
    rescale: &str,
    threads: usize,
) -> PyResult<()> {
    let rescale = Rescale::parse(rescale)?;
    let stream = Stream::new(seed, key);
    let mut bufs = Buffers::default();
    bufs.output(&x, "x")?;
    let xs = bufs.out_f32()?;
    py.detach(|| sparsify::random_mask(xs, density, &stream, rescale, threads))?;
    Ok(())
}

/// DELLA on `rows` rows of `row_len` elements, in place: keep probability linear in the
/// per-row stable rank of |x|, from density - epsilon to density + epsilon.
#[pyfunction]
#[pyo3(signature = (x, rows, row_len, density, epsilon, seed, key, rescale = "inverse", threads = 0))]
#[allow(clippy::too_many_arguments)]
pub fn della(
    py: Python<'_>,
    x: Bound<'_, PyAny>,
    rows: usize,
    row_len: usize,
    density: f64,
    epsilon: f64,
    seed: u64,
    key: &str,
    rescale: &str,
    threads: usize,
) -> PyResult<()> {
    let rescale = Rescale::parse(rescale)?;
    let stream = Stream::new(seed, key);
    let mut bufs = Buffers::default();
    bufs.output(&x, "x")?;
    let xs = bufs.out_f32()?;
    py.detach(|| {
        sparsify::della(
            xs, rows, row_len, density, epsilon, &stream, rescale, threads,
        )
    })?;
    Ok(())
}

/// `out = base + lambda_ * M` (or `lambda_ * M` when base is None), M the (sign-consensus)
/// weighted combination of the float32 task vectors `deltas`; written as `out_dtype`.
#[pyfunction]
#[pyo3(signature = (deltas, weights, consensus, normalize, lambda_, base, base_dtype, out, out_dtype, threads = 0))]
#[allow(clippy::too_many_arguments)]
pub fn combine(
    py: Python<'_>,
    deltas: Vec<Bound<'_, PyAny>>,
    weights: Vec<f64>,
    consensus: bool,
    normalize: bool,
    lambda_: f64,
    base: Option<Bound<'_, PyAny>>,
    base_dtype: &str,
    out: Bound<'_, PyAny>,
    out_dtype: &str,
    threads: usize,
) -> PyResult<()> {
    let out_dtype = FloatDtype::parse(out_dtype)?;
    let mut bufs = Buffers::default();
    bufs.inputs(&deltas, "deltas")?;
    let base = match &base {
        Some(b) => {
            bufs.input(b, "base")?;
            Some(FloatDtype::parse(base_dtype)?)
        }
        None => None,
    };
    bufs.output(&out, "out")?;
    let (slices, out_slice) = bufs.slices();
    let (delta_slices, base) = match base {
        Some(bd) => (&slices[..slices.len() - 1], slices.last().map(|&s| (s, bd))),
        None => (&slices[..], None),
    };
    let spec = Combine {
        deltas: delta_slices,
        weights: &weights,
        consensus,
        normalize,
    };
    py.detach(|| {
        consensus::combine_into(&spec, lambda_ as f32, base, out_slice, out_dtype, threads)
    })?;
    Ok(())
}

/// Fill the float32 buffer `out` with `uniform(seed, key, start + j)`.
#[pyfunction]
pub fn uniform(
    py: Python<'_>,
    seed: u64,
    key: &str,
    start: u64,
    out: Bound<'_, PyAny>,
) -> PyResult<()> {
    let stream = Stream::new(seed, key);
    let mut bufs = Buffers::default();
    bufs.output(&out, "out")?;
    let xs = bufs.out_f32()?;
    py.detach(|| random::fill_uniform(&stream, start, xs));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::py::tests::with_py;
    use pyo3::exceptions::PyValueError;
    use pyo3::types::PyByteArray;

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn python_entry_points() {
        with_py(|py| {
            let x = PyByteArray::new(py, &f32_bytes(&[1.0, -3.0, 2.0, 0.5]));
            magnitude(py, x.clone().into_any(), 0.5, false, 1).unwrap();
            assert_eq!(x.to_vec(), f32_bytes(&[0.0, -3.0, 2.0, 0.0]));

            let e = random_mask(py, x.clone().into_any(), 0.5, 1, "k", "bogus", 1).unwrap_err();
            assert!(e.is_instance_of::<PyValueError>(py));
            let e = della(py, x.clone().into_any(), 3, 1, 0.5, 0.1, 1, "k", "none", 1).unwrap_err();
            assert!(e.is_instance_of::<PyValueError>(py), "{e}");
            let ragged = PyByteArray::new(py, &[0u8; 6]);
            let e = magnitude(py, ragged.into_any(), 0.5, false, 1).unwrap_err();
            assert!(e.value(py).to_string().contains("float32"));

            let out = PyByteArray::new(py, &[0u8; 8]);
            uniform(
                py,
                42,
                "model.layers.3.mlp.up_proj.weight#1",
                0,
                out.clone().into_any(),
            )
            .unwrap();
            let v = out.to_vec();
            assert_eq!(
                f32::from_le_bytes([v[0], v[1], v[2], v[3]]) as f64,
                0.6520769596099854
            );

            let d = PyByteArray::new(py, &f32_bytes(&[1.0, -2.0]));
            let base = PyByteArray::new(py, &f32_bytes(&[10.0, 10.0]));
            let out = PyByteArray::new(py, &[0u8; 8]);
            combine(
                py,
                vec![d.clone().into_any()],
                vec![2.0],
                false,
                false,
                0.5,
                Some(base.into_any()),
                "F32",
                out.clone().into_any(),
                "F32",
                1,
            )
            .unwrap();
            assert_eq!(out.to_vec(), f32_bytes(&[11.0, 8.0]));
            let e = combine(
                py,
                vec![d.clone().into_any()],
                vec![2.0],
                false,
                false,
                1.0,
                None,
                "F32",
                d.clone().into_any(),
                "F32",
                1,
            )
            .unwrap_err();
            assert!(e.value(py).to_string().contains("overlaps"));
            let e = combine(
                py,
                vec![d.into_any()],
                vec![1.0],
                true,
                true,
                1.0,
                None,
                "F32",
                out.into_any(),
                "I8",
                1,
            )
            .unwrap_err();
            assert!(e.is_instance_of::<PyValueError>(py));
        });
    }
}
