//! The fused GTA kernels (`kernels::gta`) over Python buffers: the model tensors are read
//! straight from their (typically memory-mapped) storage. Every call releases the GIL.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use super::buffer::Buffer;
use super::kernels::check_no_overlap;
use crate::dtype::FloatDtype;
use crate::kernels::gta::{self, Gta, KeyMode, Sparsify, Tensor};
use crate::kernels::random::Stream;

fn acquire(
    xs: &[Bound<'_, PyAny>],
    x_dtypes: &[String],
    base: &Bound<'_, PyAny>,
    base_dtype: &str,
) -> PyResult<(Vec<Buffer>, Vec<FloatDtype>)> {
    if xs.len() != x_dtypes.len() {
        return Err(PyValueError::new_err(format!(
            "{} inputs but {} dtypes",
            xs.len(),
            x_dtypes.len()
        )));
    }
    let mut dtypes = x_dtypes
        .iter()
        .map(|c| FloatDtype::parse(c))
        .collect::<Result<Vec<_>, _>>()?;
    dtypes.push(FloatDtype::parse(base_dtype)?);
    let mut bufs = xs
        .iter()
        .enumerate()
        .map(|(i, o)| Buffer::get(o, false, &format!("xs[{i}]")))
        .collect::<PyResult<Vec<_>>>()?;
    bufs.push(Buffer::get(base, false, "base")?);
    Ok((bufs, dtypes))
}

/// For each model i, the magnitude keys (float32 bit patterns of |f32(x_i) - f32(base)|, NaN
/// and inf ranked as `modes[i]` says: "magnitude" or "outliers") at the ascending ranks
/// `ranks[i]` (at most two; an empty list skips the model).
#[pyfunction]
#[pyo3(signature = (xs, x_dtypes, base, base_dtype, ranks, modes, threads = 0))]
#[allow(clippy::too_many_arguments)]
pub fn gta_thresholds(
    py: Python<'_>,
    xs: Vec<Bound<'_, PyAny>>,
    x_dtypes: Vec<String>,
    base: Bound<'_, PyAny>,
    base_dtype: &str,
    ranks: Vec<Vec<usize>>,
    modes: Vec<String>,
    threads: usize,
) -> PyResult<Vec<Vec<u32>>> {
    let modes = modes
        .iter()
        .map(|m| KeyMode::parse(m))
        .collect::<Result<Vec<_>, _>>()?;
    let (bufs, dtypes) = acquire(&xs, &x_dtypes, &base, base_dtype)?;
    // SAFETY: the buffers stay acquired until the end of this function; all are read-only.
    let slices: Vec<&[u8]> = bufs.iter().map(|b| unsafe { b.as_slice() }).collect();
    let tensors: Vec<Tensor> = slices
        .iter()
        .zip(&dtypes)
        .map(|(&data, &dtype)| Tensor { data, dtype })
        .collect();
    let (base_t, xs_t) = tensors.split_last().expect("base was pushed");
    let base_t = *base_t;
    Ok(py.detach(|| gta::thresholds(xs_t, base_t, &ranks, &modes, threads))?)
}

/// One model's sparsification: ("none",), ("band", lo_key, hi_key, mode),
/// ("random", p, key, inverse) or ("della", density, epsilon, key, inverse).
fn parse_sparsify(spec: &Bound<'_, PyAny>, seed: u64, i: usize) -> PyResult<Sparsify> {
    let t = spec
        .cast::<PyTuple>()
        .map_err(|_| PyValueError::new_err(format!("sparsify[{i}] must be a tuple")))?;
    let kind: String = t.get_item(0)?.extract()?;
    Ok(match kind.as_str() {
        "none" => Sparsify::None,
        "band" => {
            let (_, lo, hi, mode): (String, u32, u32, String) = t.extract()?;
            Sparsify::Band {
                lo,
                hi,
                mode: KeyMode::parse(&mode)?,
            }
        }
        "random" => {
            let (_, p, key, inverse): (String, f64, String, bool) = t.extract()?;
            Sparsify::Random {
                p: p as f32,
                stream: Stream::new(seed, &key),
                inverse,
            }
        }
        "della" => {
            let (_, density, epsilon, key, inverse): (String, f64, f64, String, bool) =
                t.extract()?;
            Sparsify::Della {
                density,
                epsilon,
                stream: Stream::new(seed, &key),
                inverse,
            }
        }
        other => {
            return Err(PyValueError::new_err(format!(
                "sparsify[{i}]: unknown kind {other:?}"
            )))
        }
    })
}

/// `out = base + lambda_ * combine(sparsify_i(f32(x_i) - f32(base)), weights)` in one pass,
/// written as `out_dtype` (see `kernels::gta::combine`).
#[pyfunction]
#[pyo3(signature = (xs, x_dtypes, base, base_dtype, out, out_dtype, weights, sparsify, consensus, normalize, lambda_, row_len, seed, threads = 0))]
#[allow(clippy::too_many_arguments)]
pub fn gta_combine(
    py: Python<'_>,
    xs: Vec<Bound<'_, PyAny>>,
    x_dtypes: Vec<String>,
    base: Bound<'_, PyAny>,
    base_dtype: &str,
    out: Bound<'_, PyAny>,
    out_dtype: &str,
    weights: Vec<f64>,
    sparsify: Vec<Bound<'_, PyAny>>,
    consensus: bool,
    normalize: bool,
    lambda_: f64,
    row_len: usize,
    seed: u64,
    threads: usize,
) -> PyResult<()> {
    let out_dtype = FloatDtype::parse(out_dtype)?;
    let specs = sparsify
        .iter()
        .enumerate()
        .map(|(i, s)| parse_sparsify(s, seed, i))
        .collect::<PyResult<Vec<_>>>()?;
    let (bufs, dtypes) = acquire(&xs, &x_dtypes, &base, base_dtype)?;
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
    let tensors: Vec<Tensor> = slices
        .iter()
        .zip(&dtypes)
        .map(|(&data, &dtype)| Tensor { data, dtype })
        .collect();
    let (base_t, xs_t) = tensors.split_last().expect("base was pushed");
    let spec = Gta {
        xs: xs_t,
        base: *base_t,
        sparsify: &specs,
        weights: &weights,
        consensus,
        normalize,
        lambda: lambda_ as f32,
    };
    py.detach(|| gta::combine(&spec, row_len, out_slice, out_dtype, threads))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::py::tests::with_py;
    use pyo3::types::PyByteArray;

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn python_entry_points() {
        with_py(|py| {
            let b = PyByteArray::new(py, &f32_bytes(&[0.0, 0.0, 0.0, 0.0]));
            let x = PyByteArray::new(py, &f32_bytes(&[1.0, -3.0, 2.0, 0.5]));
            let keys = gta_thresholds(
                py,
                vec![x.clone().into_any()],
                vec!["F32".into()],
                b.clone().into_any(),
                "F32",
                vec![vec![1]],
                vec!["magnitude".into()],
                1,
            )
            .unwrap();
            assert_eq!(keys, vec![vec![1.0f32.to_bits()]]);
            let out = PyByteArray::new(py, &[0u8; 16]);
            let spec = ("band", 1.0f32.to_bits(), u32::MAX, "magnitude")
                .into_pyobject(py)
                .unwrap()
                .into_any();
            gta_combine(
                py,
                vec![x.clone().into_any()],
                vec!["F32".into()],
                b.clone().into_any(),
                "F32",
                out.clone().into_any(),
                "F32",
                vec![2.0],
                vec![spec],
                false,
                false,
                1.0,
                4,
                0,
                1,
            )
            .unwrap();
            assert_eq!(out.to_vec(), f32_bytes(&[2.0, -6.0, 4.0, 0.0]));
            let bogus = ("bogus",).into_pyobject(py).unwrap().into_any();
            let e = gta_combine(
                py,
                vec![x.clone().into_any()],
                vec!["F32".into()],
                b.into_any(),
                "F32",
                out.into_any(),
                "F32",
                vec![2.0],
                vec![bogus],
                false,
                false,
                1.0,
                4,
                0,
                1,
            )
            .unwrap_err();
            assert!(e.is_instance_of::<PyValueError>(py));
        });
    }
}
