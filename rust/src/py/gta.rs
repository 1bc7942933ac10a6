//! The fused GTA merge (`kernels::gta_spec`) over Python buffers: the model tensors are read
//! straight from their (typically memory-mapped) storage. Only argument conversion lives
//! here; the call releases the GIL.

use pyo3::prelude::*;

use super::buffer::Buffers;
use super::health::PyTensorHealth;
use super::kernels::{parse_dtypes, tensors};
use crate::dtype::FloatDtype;
use crate::kernels::gta_spec::{self, GtaMerge, Sparsity};

/// One model's sparsifier in a GTA merge (docs/kernels.md). `kind`: "none", "magnitude",
/// "outliers" (Breadcrumbs: `density`, `gamma`), "random" (DARE: `density`, stream `key`) or
/// "della" (`density`, `epsilon`, `key`); `rescale`: "none", or "inverse" for random/della.
#[pyclass(frozen, module = "mergekitty._native", name = "Sparsity")]
pub struct PySparsity {
    inner: Sparsity,
    rescale: &'static str,
}

#[pymethods]
impl PySparsity {
    #[new]
    #[pyo3(signature = (kind, density = 1.0, gamma = 0.0, epsilon = 0.0, key = "", rescale = "none"))]
    fn new(
        kind: &str,
        density: f64,
        gamma: f64,
        epsilon: f64,
        key: &str,
        rescale: &str,
    ) -> PyResult<Self> {
        let inner = Sparsity::new(kind, density, gamma, epsilon, key, rescale)?;
        let rescale = if inner.inverse { "inverse" } else { "none" };
        Ok(PySparsity { inner, rescale })
    }

    #[getter]
    fn kind(&self) -> &'static str {
        self.inner.kind.name()
    }

    #[getter]
    fn density(&self) -> f64 {
        self.inner.density
    }

    #[getter]
    fn gamma(&self) -> f64 {
        self.inner.gamma
    }

    #[getter]
    fn epsilon(&self) -> f64 {
        self.inner.epsilon
    }

    #[getter]
    fn key(&self) -> &str {
        &self.inner.key
    }

    #[getter]
    fn rescale(&self) -> &'static str {
        self.rescale
    }

    fn __repr__(&self) -> String {
        let s = &self.inner;
        format!(
            "Sparsity({:?}, density={:?}, gamma={:?}, epsilon={:?}, key={:?}, rescale={:?})",
            s.kind.name(),
            s.density,
            s.gamma,
            s.epsilon,
            s.key,
            self.rescale
        )
    }
}

/// `out = base + lambda_ * combine(sparsify_i(f32(x_i) - f32(base)), weights)` for one tensor
/// of `shape`, written as `out_dtype`: the order statistics the sparsifiers need, then one
/// pass over the inputs (see `kernels::gta_spec::merge`). `scales`: per model, a factor of its
/// kept values (the L1 rescale). Returns the `TensorHealth` of `xs`, then `base`, and the output.
#[pyfunction]
#[pyo3(signature = (xs, x_dtypes, base, base_dtype, out, out_dtype, shape, sparsity, weights, consensus, normalize, lambda_, seed, threads = 0, scales = None))]
#[allow(clippy::too_many_arguments)]
pub fn gta_merge(
    py: Python<'_>,
    xs: Vec<Bound<'_, PyAny>>,
    x_dtypes: Vec<String>,
    base: Bound<'_, PyAny>,
    base_dtype: &str,
    out: Bound<'_, PyAny>,
    out_dtype: &str,
    shape: Vec<usize>,
    sparsity: Vec<Bound<'_, PySparsity>>,
    weights: Vec<f64>,
    consensus: bool,
    normalize: bool,
    lambda_: f64,
    seed: u64,
    threads: usize,
    scales: Option<Vec<f64>>,
) -> PyResult<PyTensorHealth> {
    let dtypes = parse_dtypes("gta_merge", xs.len(), &x_dtypes)?;
    let base_dtype = FloatDtype::parse(base_dtype)?;
    let out_dtype = FloatDtype::parse(out_dtype)?;
    let sparsity: Vec<Sparsity> = sparsity.iter().map(|s| s.get().inner.clone()).collect();
    let mut bufs = Buffers::default();
    bufs.inputs(&xs, "xs")?;
    bufs.input(&base, "base")?;
    bufs.output(&out, "out")?;
    let (slices, out) = bufs.slices();
    let tensors = tensors(&slices, &[dtypes, vec![base_dtype]].concat());
    let (&base, xs) = tensors.split_last().expect("base was added");
    let m = GtaMerge {
        xs,
        base,
        shape: &shape,
        sparsity: &sparsity,
        weights: &weights,
        scales: scales.as_deref().unwrap_or(&[]),
        consensus,
        normalize,
        lambda: lambda_,
        seed,
    };
    let health = py.detach(|| gta_spec::merge(&m, out, out_dtype, threads))?;
    Ok(health.into())
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
            let b = PyByteArray::new(py, &f32_bytes(&[0.0, 0.0, 0.0, 0.0]));
            let x = PyByteArray::new(py, &f32_bytes(&[1.0, -3.0, 2.0, 0.5]));
            let out = PyByteArray::new(py, &[0u8; 16]);
            let magnitude = |density| {
                Bound::new(
                    py,
                    PySparsity::new("magnitude", density, 0.0, 0.0, "", "none").unwrap(),
                )
                .unwrap()
            };
            let run = |sparsity, out: &Bound<'_, PyByteArray>, shape| {
                gta_merge(
                    py,
                    vec![x.clone().into_any()],
                    vec!["F32".into()],
                    b.clone().into_any(),
                    "F32",
                    out.clone().into_any(),
                    "F32",
                    shape,
                    vec![sparsity],
                    vec![2.0],
                    false,
                    false,
                    1.0,
                    0,
                    1,
                    None,
                )
            };
            // density 0.75 of 4: the three largest magnitudes
            let health = run(magnitude(0.75), &out, vec![2, 2]).unwrap();
            assert_eq!(out.to_vec(), f32_bytes(&[2.0, -6.0, 4.0, 0.0]));
            assert_eq!(health.input_sumsq(), [1.0 + 9.0 + 4.0 + 0.25, 0.0]);
            assert_eq!(health.output_sumsq(), 4.0 + 36.0 + 16.0);
            let e = run(magnitude(0.5), &out, vec![3]).unwrap_err();
            assert!(e.is_instance_of::<PyValueError>(py), "{e}");
            let e = run(magnitude(0.5), &x, vec![4]).unwrap_err();
            assert!(e.value(py).to_string().contains("overlaps"), "{e}");

            let e = PySparsity::new("magnitude", 0.5, 0.0, 0.0, "", "l1")
                .err()
                .unwrap();
            assert!(e.is_instance_of::<PyValueError>(py));
            let s = PySparsity::new("random", 0.5, 0.0, 0.0, "w#0", "inverse").unwrap();
            assert_eq!(
                (s.kind(), s.rescale(), s.key()),
                ("random", "inverse", "w#0")
            );
            assert!(s.__repr__().starts_with("Sparsity(\"random\", density=0.5"));
        });
    }
}
