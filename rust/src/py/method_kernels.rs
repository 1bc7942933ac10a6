//! The kernels of single merge methods (NearSwap, SCE, Arcee Fusion) over Python buffers: the
//! model tensors are read straight from their (typically memory-mapped) storage. Only argument
//! conversion lives here; each call releases the GIL.

use pyo3::prelude::*;

use super::buffer::Buffers;
use super::health::PyTensorHealth;
use super::kernels::{parse_dtypes, tensors};
use crate::dtype::FloatDtype;
use crate::kernels::gta::Tensor;
use crate::kernels::{arcee_fusion, nearswap, sce};

/// The base's and the other model's tensors and the output of a two-model kernel, held by
/// `bufs` (the output checked to overlap neither input).
fn base_and_other<'a>(
    bufs: &'a mut Buffers,
    base: (&Bound<'_, PyAny>, &str),
    other: (&Bound<'_, PyAny>, &str),
    out: &Bound<'_, PyAny>,
) -> PyResult<(Tensor<'a>, Tensor<'a>, &'a mut [u8])> {
    let (base_dtype, other_dtype) = (FloatDtype::parse(base.1)?, FloatDtype::parse(other.1)?);
    bufs.input(base.0, "base")?;
    bufs.input(other.0, "other")?;
    bufs.output(out, "out")?;
    let (slices, out) = bufs.slices();
    let pair = tensors(&slices, &[base_dtype, other_dtype]);
    Ok((pair[0], pair[1], out))
}

/// NearSwap of `base` and `other` with threshold `t` (methods/nearswap.py), written into `out`
/// as `out_dtype`. Returns the `TensorHealth` of `base`, `other` and the output.
#[pyfunction]
#[pyo3(signature = (base, base_dtype, other, other_dtype, t, out, out_dtype, threads = 0))]
#[allow(clippy::too_many_arguments)]
pub fn nearswap_merge(
    py: Python<'_>,
    base: Bound<'_, PyAny>,
    base_dtype: &str,
    other: Bound<'_, PyAny>,
    other_dtype: &str,
    t: f64,
    out: Bound<'_, PyAny>,
    out_dtype: &str,
    threads: usize,
) -> PyResult<PyTensorHealth> {
    let out_dtype = FloatDtype::parse(out_dtype)?;
    let mut bufs = Buffers::default();
    let (b, x, out) = base_and_other(&mut bufs, (&base, base_dtype), (&other, other_dtype), &out)?;
    let health = py.detach(|| nearswap::nearswap(b, x, t, out, out_dtype, threads))?;
    Ok(health.into())
}

/// SCE of `base` and the models `inputs` (config order) keeping the `select_topk` fraction of
/// the highest-variance positions (methods/sce.py), written into `out` as `out_dtype`. Returns
/// the `TensorHealth` of `base`, then `inputs`, and the output.
#[pyfunction]
#[pyo3(signature = (base, base_dtype, inputs, in_dtypes, select_topk, out, out_dtype, threads = 0))]
#[allow(clippy::too_many_arguments)]
pub fn sce_merge(
    py: Python<'_>,
    base: Bound<'_, PyAny>,
    base_dtype: &str,
    inputs: Vec<Bound<'_, PyAny>>,
    in_dtypes: Vec<String>,
    select_topk: f64,
    out: Bound<'_, PyAny>,
    out_dtype: &str,
    threads: usize,
) -> PyResult<PyTensorHealth> {
    let base_dtype = FloatDtype::parse(base_dtype)?;
    let dtypes = parse_dtypes("sce_merge", inputs.len(), &in_dtypes)?;
    let out_dtype = FloatDtype::parse(out_dtype)?;
    let mut bufs = Buffers::default();
    bufs.input(&base, "base")?;
    bufs.inputs(&inputs, "inputs")?;
    bufs.output(&out, "out")?;
    let (slices, out) = bufs.slices();
    let tensors = tensors(&slices, &[vec![base_dtype], dtypes].concat());
    let (&b, xs) = tensors.split_first().expect("base was added");
    let health = py.detach(|| sce::sce(b, xs, select_topk, out, out_dtype, threads))?;
    Ok(health.into())
}

/// Arcee Fusion of `base` and `other` (methods/arcee_fusion.py), the softmax and KL along rows
/// of `row_len` elements (the last axis; a 1-D tensor is one row), written into `out` as
/// `out_dtype`. Returns the `TensorHealth` of `base`, `other` and the output.
#[pyfunction]
#[pyo3(signature = (base, base_dtype, other, other_dtype, row_len, out, out_dtype, threads = 0))]
#[allow(clippy::too_many_arguments)]
pub fn arcee_fusion_merge(
    py: Python<'_>,
    base: Bound<'_, PyAny>,
    base_dtype: &str,
    other: Bound<'_, PyAny>,
    other_dtype: &str,
    row_len: usize,
    out: Bound<'_, PyAny>,
    out_dtype: &str,
    threads: usize,
) -> PyResult<PyTensorHealth> {
    let out_dtype = FloatDtype::parse(out_dtype)?;
    let mut bufs = Buffers::default();
    let (b, x, out) = base_and_other(&mut bufs, (&base, base_dtype), (&other, other_dtype), &out)?;
    let health =
        py.detach(|| arcee_fusion::arcee_fusion(b, x, row_len, out, out_dtype, threads))?;
    Ok(health.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::py::tests::with_py;
    use pyo3::exceptions::PyValueError;
    use pyo3::types::{PyByteArray, PyBytes};

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn python_entry_points() {
        with_py(|py| {
            let b = PyBytes::new(py, &f32_bytes(&[0.0, 1.0, 2.0, 3.0])).into_any();
            let x = PyBytes::new(py, &f32_bytes(&[0.1, 1.0, 4.0, 3.0])).into_any();
            let out = PyByteArray::new(py, &[0u8; 16]);
            let o = || out.clone().into_any();

            let h =
                nearswap_merge(py, b.clone(), "F32", x.clone(), "F32", 0.5, o(), "F32", 1).unwrap();
            let w = (1.0f32 / 2.0) * 0.5;
            assert_eq!(
                out.to_vec(),
                f32_bytes(&[0.1, 1.0, w * 4.0 + (1.0 - w) * 2.0, 3.0])
            );
            let sumsq = h.input_sumsq();
            assert_eq!(sumsq[0], 14.0);
            assert!((sumsq[1] - 26.01).abs() < 1e-5, "{sumsq:?}");

            // one model, no selection: b + d
            let h = sce_merge(
                py,
                b.clone(),
                "F32",
                vec![x.clone()],
                vec!["F32".into()],
                1.0,
                o(),
                "F32",
                0,
            )
            .unwrap();
            assert_eq!(out.to_vec(), f32_bytes(&[0.1, 1.0, 4.0, 3.0]));
            assert_eq!(h.input_nonfinite(), [0, 0]);
            let e = sce_merge(
                py,
                b.clone(),
                "F32",
                vec![x.clone()],
                vec![],
                1.0,
                o(),
                "F32",
                0,
            )
            .unwrap_err();
            assert!(e.is_instance_of::<PyValueError>(py), "{e}");

            arcee_fusion_merge(py, b.clone(), "F32", x.clone(), "F32", 4, o(), "F32", 0).unwrap();
            let e = arcee_fusion_merge(py, b.clone(), "F32", x.clone(), "F32", 3, o(), "F32", 0)
                .unwrap_err();
            assert!(e.value(py).to_string().contains("row length 3"), "{e}");
            let e = arcee_fusion_merge(py, b.clone(), "F32", x.clone(), "I8", 4, o(), "F32", 0)
                .unwrap_err();
            assert!(e.is_instance_of::<PyValueError>(py), "{e}");
            let short = PyBytes::new(py, &[0u8; 12]).into_any();
            let e =
                nearswap_merge(py, b.clone(), "F32", short, "F32", 0.5, o(), "F32", 0).unwrap_err();
            assert!(
                e.value(py).to_string().contains("other (F32) has 12 bytes"),
                "{e}"
            );
        });
    }
}
