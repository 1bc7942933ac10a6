//! The task-vector figures of one tensor (`kernels::task_vector_stats`) over Python buffers:
//! the base and the models are read straight from their (typically memory-mapped) storage.
//! The call releases the GIL.

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::buffer::Buffers;
use super::kernels::{parse_dtypes, tensors};
use crate::dtype::FloatDtype;
use crate::kernels::task_vector_stats as stats;

/// The raw sums comparing the task vectors `f32(models[i]) - f32(base)` of one tensor (see
/// `kernels/task_vector_stats.rs`), with TIES at `density`; `scratch` is a writable float32
/// buffer of at least as many elements as the tensor. Returns a dict: `numel`, `base_sumsq`,
/// `base_nonfinite`, per model `sumsq`, `sum4`, `nonzero`, `nonfinite`, `ties_sumsq`,
/// `ties_kept`, and per pair (0,1), (0,2), .., (1,2), .. `dot`, `both_nonzero`, `sign_agree`.
#[pyfunction]
#[pyo3(signature = (base, base_dtype, models, model_dtypes, density, scratch, threads = 0))]
#[allow(clippy::too_many_arguments)]
pub fn task_vector_stats<'py>(
    py: Python<'py>,
    base: Bound<'py, PyAny>,
    base_dtype: &str,
    models: Vec<Bound<'py, PyAny>>,
    model_dtypes: Vec<String>,
    density: f64,
    scratch: Bound<'py, PyAny>,
    threads: usize,
) -> PyResult<Bound<'py, PyDict>> {
    let dtypes = parse_dtypes("task_vector_stats", models.len(), &model_dtypes)?;
    let base_dtype = FloatDtype::parse(base_dtype)?;
    let mut bufs = Buffers::default();
    bufs.input(&base, "base")?;
    bufs.inputs(&models, "models")?;
    bufs.output(&scratch, "scratch")?;
    let (slices, scratch) = bufs.slices_f32()?;
    let tensors = tensors(&slices, &[vec![base_dtype], dtypes].concat());
    let (&base, models) = tensors.split_first().expect("base was added");
    let s = py.detach(|| stats::task_vector_stats(base, models, density, scratch, threads))?;
    let out = PyDict::new(py);
    out.set_item("numel", s.numel)?;
    out.set_item("base_sumsq", s.base_sumsq)?;
    out.set_item("base_nonfinite", s.base_nonfinite)?;
    out.set_item("sumsq", s.sumsq)?;
    out.set_item("sum4", s.sum4)?;
    out.set_item("nonzero", s.nonzero)?;
    out.set_item("nonfinite", s.nonfinite)?;
    out.set_item("ties_sumsq", s.ties_sumsq)?;
    out.set_item("ties_kept", s.ties_kept)?;
    out.set_item("dot", s.dot)?;
    out.set_item("both_nonzero", s.both_nonzero)?;
    out.set_item("sign_agree", s.sign_agree)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::py::tests::with_py;
    use pyo3::types::{PyByteArray, PyBytes};

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn figures_of_python_buffers() {
        with_py(|py| {
            let base = PyBytes::new(py, &f32_bytes(&[0.0, 0.0, 0.0, 0.0])).into_any();
            let m1 = PyBytes::new(py, &f32_bytes(&[1.0, -2.0, 0.0, 4.0])).into_any();
            let m2 = PyBytes::new(py, &f32_bytes(&[1.0, 3.0, 3.0, -4.0])).into_any();
            let scratch = PyByteArray::new(py, &[0u8; 16]).into_any();
            let d = task_vector_stats(
                py,
                base.clone(),
                "F32",
                vec![m1.clone(), m2],
                vec!["F32".into(), "F32".into()],
                0.5,
                scratch.clone(),
                1,
            )
            .unwrap();
            let get = |k: &str| d.get_item(k).unwrap().unwrap();
            assert_eq!(get("numel").extract::<u64>().unwrap(), 4);
            assert_eq!(get("sumsq").extract::<Vec<f64>>().unwrap(), [21.0, 35.0]);
            assert_eq!(get("dot").extract::<Vec<f64>>().unwrap(), [-21.0]);
            assert_eq!(
                get("ties_sumsq").extract::<Vec<f64>>().unwrap(),
                [20.0, 34.0]
            );
            assert_eq!(get("sign_agree").extract::<Vec<u64>>().unwrap(), [1]);
            // bad dtypes, counts and scratch are errors, not panics
            let one = |dtypes: Vec<String>, scratch: Bound<'_, PyAny>| {
                task_vector_stats(
                    py,
                    base.clone(),
                    "F32",
                    vec![m1.clone()],
                    dtypes,
                    0.5,
                    scratch,
                    1,
                )
                .map(drop)
            };
            assert!(one(vec!["I8".into()], scratch.clone()).is_err());
            assert!(one(vec![], scratch.clone()).is_err());
            let short = PyByteArray::new(py, &[0u8; 8]).into_any();
            assert!(one(vec!["F32".into()], short).is_err());
            let readonly = PyBytes::new(py, &[0u8; 16]).into_any();
            assert!(one(vec!["F32".into()], readonly).is_err());
        });
    }
}
