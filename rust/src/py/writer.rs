//! `ShardWriter`: the Python face of `writer::ShardWriter`.

use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::buffer::Buffers;
use super::error_of_kind;
use crate::dtype::Dtype;
use crate::error::ErrorKind;
use crate::layout::{Layout, TensorSpec};
use crate::writer::ShardWriter;

/// A str -> str dict as ordered pairs (dicts keep insertion order; headers should too).
fn string_pairs(d: Option<&Bound<'_, PyDict>>) -> PyResult<Vec<(String, String)>> {
    let Some(d) = d else { return Ok(Vec::new()) };
    d.iter()
        .map(|(k, v)| Ok((k.extract::<String>()?, v.extract::<String>()?)))
        .collect()
}

/// (name, dtype code, shape) triples as the layout's tensor specs.
fn tensor_specs(tensors: Vec<(String, String, Vec<u64>)>) -> Result<Vec<TensorSpec>, crate::Error> {
    tensors
        .into_iter()
        .map(|(name, code, shape)| {
            Ok(TensorSpec {
                dtype: Dtype::parse(&code)?,
                name,
                shape,
            })
        })
        .collect()
}

/// Where `ShardWriter(out_dir, tensors, max_shard_bytes, metadata)` will put each tensor:
/// `(name, shard file name, absolute byte offset, byte length)` in the given order. The writer
/// plans with the same function, so the two always agree.
#[pyfunction]
#[pyo3(signature = (tensors, max_shard_bytes, metadata = None))]
pub fn plan_layout(
    tensors: Vec<(String, String, Vec<u64>)>,
    max_shard_bytes: i64,
    metadata: Option<Bound<'_, PyDict>>,
) -> PyResult<Vec<(String, String, u64, u64)>> {
    let metadata = string_pairs(metadata.as_ref())?;
    let layout = Layout::plan(tensor_specs(tensors)?, max_shard_bytes, &metadata)?;
    Ok(layout
        .specs
        .iter()
        .zip(&layout.placements)
        .map(|(spec, place)| {
            (
                spec.name.clone(),
                layout.shards[place.shard].file_name.clone(),
                place.offset,
                place.len,
            )
        })
        .collect())
}

#[pyclass(frozen, module = "mergekitty._native", name = "ShardWriter")]
pub struct PyShardWriter {
    inner: ShardWriter,
}

#[pymethods]
impl PyShardWriter {
    /// `reuse`: shard files already complete in `out_dir` (verified by the caller), taken as
    /// written. `journal`: a file each shard completed is appended to (shard, size, digest).
    #[new]
    #[pyo3(signature = (out_dir, tensors, max_shard_bytes, metadata = None, index_metadata = None, reuse = None, journal = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        out_dir: PathBuf,
        tensors: Vec<(String, String, Vec<u64>)>,
        max_shard_bytes: i64,
        metadata: Option<Bound<'_, PyDict>>,
        index_metadata: Option<Bound<'_, PyDict>>,
        reuse: Option<Vec<String>>,
        journal: Option<PathBuf>,
    ) -> PyResult<Self> {
        let specs = tensor_specs(tensors)?;
        let metadata = string_pairs(metadata.as_ref())?;
        let index_metadata = string_pairs(index_metadata.as_ref())?;
        let reuse = reuse.unwrap_or_default();
        let inner = py.detach(|| {
            ShardWriter::create_resuming(
                &out_dir,
                specs,
                max_shard_bytes,
                &metadata,
                &index_metadata,
                &reuse,
                journal.as_deref(),
            )
        })?;
        Ok(PyShardWriter { inner })
    }

    /// Whether tensor `name` is written (or in a reused shard).
    fn is_written(&self, py: Python<'_>, name: &str) -> PyResult<bool> {
        self.inner
            .is_written(name)
            .map_err(|e| error_of_kind(py, ErrorKind::NotFound, e.to_string()))
    }

    #[getter]
    fn shard_files(&self) -> Vec<String> {
        self.inner.shard_files()
    }

    /// A lookup by name: an unknown tensor is a TensorNotFoundError (a KeyError).
    fn shard_of(&self, py: Python<'_>, name: &str) -> PyResult<String> {
        self.inner
            .shard_of(name)
            .map(str::to_owned)
            .map_err(|e| error_of_kind(py, ErrorKind::NotFound, e.to_string()))
    }

    #[getter]
    fn total_bytes(&self) -> u64 {
        self.inner.total_bytes()
    }

    fn write(&self, py: Python<'_>, name: &str, data: Bound<'_, PyAny>) -> PyResult<()> {
        let mut bufs = Buffers::default();
        bufs.input(&data, "data")?;
        let (inputs, _) = bufs.slices();
        let bytes = inputs[0];
        Ok(py.detach(|| self.inner.write(name, bytes))?)
    }

    fn finalize(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        Ok(py.detach(|| self.inner.finalize())?)
    }

    fn abort(&self, py: Python<'_>) {
        py.detach(|| self.inner.abort())
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    /// Leaving the block normally does not finalize (that must be explicit); leaving it with
    /// an exception aborts. Never swallows the exception.
    #[pyo3(signature = (exc_type = None, _exc = None, _tb = None))]
    fn __exit__(
        &self,
        py: Python<'_>,
        exc_type: Option<Bound<'_, PyAny>>,
        _exc: Option<Bound<'_, PyAny>>,
        _tb: Option<Bound<'_, PyAny>>,
    ) -> bool {
        if exc_type.is_some_and(|t| !t.is_none()) {
            self.abort(py);
        }
        false
    }

    fn __repr__(&self) -> String {
        format!(
            "ShardWriter({:?}, {} shard(s), {} bytes)",
            self.inner.dir().display(),
            self.inner.shard_files().len(),
            self.inner.total_bytes()
        )
    }
}

/// The digest a ShardWriter journals for a complete shard, recomputed from the file at `path`
/// (16 hex digits).
#[pyfunction]
pub fn shard_digest(py: Python<'_>, path: PathBuf) -> PyResult<String> {
    let digest = py.detach(|| crate::writer::file_digest(&path))?;
    Ok(format!("{digest:016x}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mmap_file::tests::TempDir;
    use crate::py::tests::with_py;
    use pyo3::types::PyBytes;

    #[test]
    fn write_and_finalize() {
        let dir = TempDir::new("pywriter");
        with_py(|py| {
            let meta = PyDict::new(py);
            meta.set_item("a", "b").unwrap();
            let w = PyShardWriter::new(
                py,
                dir.0.clone(),
                vec![
                    ("t".into(), "U8".into(), vec![2]),
                    ("u".into(), "BF16".into(), vec![1]),
                ],
                2,
                Some(meta),
                None,
                None,
                None,
            )
            .unwrap();
            assert_eq!(w.shard_files().len(), 2);
            assert!(w.shard_of(py, "zz").is_err());
            w.write(py, "t", PyBytes::new(py, &[1, 2]).into_any())
                .unwrap();
            assert!(w.write(py, "u", PyBytes::new(py, &[1]).into_any()).is_err());
            w.write(py, "u", PyBytes::new(py, &[1, 2]).into_any())
                .unwrap();
            assert_eq!(w.finalize(py).unwrap().len(), 3);
            assert!(PyShardWriter::new(
                py,
                dir.0.clone(),
                vec![("t".into(), "Q".into(), vec![])],
                0,
                None,
                None,
                None,
                None
            )
            .is_err());
        });
    }
}
