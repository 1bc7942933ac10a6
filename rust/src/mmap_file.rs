//! An open safetensors file: a read-only mmap plus its validated header.
//!
//! The mapping sits behind an `Arc` so zero-copy views handed to Python keep it alive after the
//! file object itself is gone.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::{Advice, Mmap, UncheckedAdvice};

use crate::error::{Error, Result};
use crate::header::{self, Header, TensorInfo};

pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Arc<Mmap>,
    header: Header,
}

/// A tensor's bytes inside a shared mapping. Cheap to clone; keeps the mapping alive.
#[derive(Clone)]
pub struct MappedBytes {
    mmap: Arc<Mmap>,
    start: usize,
    end: usize,
}

impl MappedBytes {
    pub fn as_slice(&self) -> &[u8] {
        // The range was validated against the mapping's length when the header was parsed.
        &self.mmap[self.start..self.end]
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

impl SafetensorsFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        if len < 8 {
            return Err(Error::FileTooSmall { path, len });
        }
        // SAFETY: the mapping is read-only and private. If another process truncates the file
        // while it is mapped, reads fault (SIGBUS) — the same contract every mmap reader has.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let header = header::parse(&path, &mmap)?;
        Ok(SafetensorsFile {
            path,
            mmap: Arc::new(mmap),
            header,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> u64 {
        self.mmap.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.mmap.is_empty()
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn metadata(&self) -> Option<&[(String, String)]> {
        self.header.metadata.as_deref()
    }

    /// Tensors sorted by start offset.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.header.tensors
    }

    pub fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.header.get(name).ok_or_else(|| Error::TensorNotFound {
            path: self.path.clone(),
            tensor: name.to_owned(),
        })
    }

    /// Absolute byte range of a tensor within the file.
    pub fn absolute_range(&self, info: &TensorInfo) -> (u64, u64) {
        (
            self.header.data_start + info.start,
            self.header.data_start + info.end,
        )
    }

    pub fn bytes(&self, name: &str) -> Result<MappedBytes> {
        let (start, end) = self.absolute_range(self.info(name)?);
        Ok(MappedBytes {
            mmap: Arc::clone(&self.mmap),
            start: start as usize,
            end: end as usize,
        })
    }

    /// Ask the kernel to start reading a tensor's pages in the background.
    pub fn prefetch(&self, name: &str) -> Result<()> {
        let (start, end) = self.absolute_range(self.info(name)?);
        if end == start {
            return Ok(());
        }
        // memmap2 rounds the start down to a page; the kernel rounds the length up.
        self.mmap
            .advise_range(Advice::WillNeed, start as usize, (end - start) as usize)
            .map_err(|e| Error::io(&self.path, e))
    }

    /// Drop a tensor's pages from this process's mapping (they stay in the page cache), so a
    /// streaming reader's resident memory stays bounded.
    pub fn release(&self, name: &str) -> Result<()> {
        let (start, end) = self.absolute_range(self.info(name)?);
        if end == start {
            return Ok(());
        }
        // SAFETY: the mapping is a private, read-only file mapping that is never written, so
        // MADV_DONTNEED only discards clean pages; any later access (including through a live
        // view of a neighbouring tensor sharing an edge page) re-faults identical bytes from
        // the file. Rounding the range outward to whole pages is therefore harmless.
        unsafe {
            self.mmap.unchecked_advise_range(
                UncheckedAdvice::DontNeed,
                start as usize,
                (end - start) as usize,
            )
        }
        .map_err(|e| Error::io(&self.path, e))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::header::build_file;
    use std::io::Write;

    /// A fresh temporary directory under the system temp dir, removed on drop.
    pub(crate) struct TempDir(pub PathBuf);
    impl TempDir {
        pub(crate) fn new(tag: &str) -> TempDir {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "mergekitty-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn write(dir: &TempDir, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.0.join(name);
        std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    #[test]
    fn open_and_read() {
        let dir = TempDir::new("mmap");
        let data: Vec<u8> = (0..24u8).collect();
        let p = write(
            &dir,
            "a.safetensors",
            &build_file(
                r#"{"__metadata__":{"k":"v"},"x":{"dtype":"U8","shape":[3],"data_offsets":[5,8]},"y":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"z":{"dtype":"U8","shape":[0],"data_offsets":[24,24]}}"#,
                &data,
            ),
        );
        let f = SafetensorsFile::open(&p).unwrap();
        assert_eq!(f.metadata().unwrap(), &[("k".to_string(), "v".to_string())]);
        let names: Vec<_> = f.tensors().iter().map(|t| t.name.clone()).collect();
        assert_eq!(names, ["y", "x", "z"]);
        let x = f.bytes("x").unwrap();
        assert_eq!(x.as_slice(), &[5, 6, 7]);
        let (s, e) = f.absolute_range(f.info("x").unwrap());
        assert_eq!(e - s, 3);
        assert_eq!(f.len(), std::fs::metadata(&p).unwrap().len());
        assert!(f.bytes("z").unwrap().is_empty());
        f.prefetch("x").unwrap();
        f.release("x").unwrap();
        f.prefetch("z").unwrap();
        f.release("y").unwrap();
        // Data is still readable after DONTNEED, and views outlive the file object.
        drop(f);
        assert_eq!(x.as_slice(), &[5, 6, 7]);
    }

    #[test]
    fn missing_tensor_and_file() {
        let dir = TempDir::new("mmap");
        let p = write(&dir, "e.safetensors", &build_file("{}", &[]));
        let f = SafetensorsFile::open(&p).unwrap();
        let e = f.bytes("nope").err().unwrap();
        assert!(matches!(e, Error::TensorNotFound { .. }));
        assert!(e.to_string().contains("e.safetensors"));
        let e = SafetensorsFile::open(dir.0.join("missing")).err().unwrap();
        match e {
            Error::Io { source, path } => {
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
                assert!(path.ends_with("missing"));
            }
            other => panic!("{other}"),
        }
    }

    #[test]
    fn short_and_empty_files() {
        let dir = TempDir::new("mmap");
        let p = write(&dir, "empty.safetensors", &[]);
        assert!(matches!(
            SafetensorsFile::open(&p),
            Err(Error::FileTooSmall { len: 0, .. })
        ));
        let p = write(&dir, "bad.safetensors", &build_file("{\"a\":", &[]));
        assert!(SafetensorsFile::open(&p).err().unwrap().is_malformed_file());
    }
}
