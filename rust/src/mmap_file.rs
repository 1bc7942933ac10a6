//! An open safetensors file: a read-only mmap plus its validated header.
//!
//! The mapping sits behind an `Arc` so zero-copy views handed to Python keep it alive after the
//! file object itself is gone. It is registered with [`crate::platform::sigbus`] for its whole
//! life, so a read past the end of a file that shrank under us gives zeros instead of killing
//! the process (on Linux); [`SafetensorsFile::check_intact`] turns that, and any other change of
//! the file since it was opened, into an error naming the file.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use crate::error::{Error, Result};
use crate::header::{self, Header, TensorInfo};
use crate::platform::{self, sigbus, FileIdentity, Io};

pub struct SafetensorsFile {
    path: PathBuf,
    mapping: Arc<Mapping>,
    header: Header,
    opened: FileIdentity,
}

/// A file's bytes, mapped read-only and registered with the SIGBUS guard while mapped.
struct Mapping {
    // Declared before `map`, so it is dropped first: unregistered before the unmap.
    guard: sigbus::Registration,
    map: Mmap,
}

/// A tensor's bytes inside a shared mapping. Cheap to clone; keeps the mapping alive.
#[derive(Clone)]
pub struct MappedBytes {
    mapping: Arc<Mapping>,
    start: usize,
    end: usize,
}

impl MappedBytes {
    pub fn as_slice(&self) -> &[u8] {
        // The range was validated against the mapping's length when the header was parsed.
        &self.mapping.map[self.start..self.end]
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
        let opened = platform::file_identity(&file.metadata().map_err(|e| Error::io(&path, e))?);
        if opened.len < 8 {
            return Err(Error::FileTooSmall {
                path,
                len: opened.len,
            });
        }
        // SAFETY: the mapping is read-only and private. Another process may still change the
        // file under it: a read past a shrunken end is survived through `sigbus` (registered
        // before the first read, the header's) and reported by `check_intact`.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let guard = sigbus::register(map.as_ptr(), map.len()).map_err(|e| Error::io(&path, e))?;
        let mapping = Arc::new(Mapping { guard, map });
        // A header read from a file that shrank meanwhile is zeros: report the change, not
        // the nonsense it parsed into.
        let header = header::parse(&path, &mapping.map);
        mapping.check_intact(&path, opened)?;
        Ok(SafetensorsFile {
            header: header?,
            path,
            mapping,
            opened,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> u64 {
        self.mapping.map.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.mapping.map.is_empty()
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
            mapping: Arc::clone(&self.mapping),
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
        Io::from_env()
            .advise_willneed(&self.mapping.map, start as usize, (end - start) as usize)
            .map_err(|e| Error::io(&self.path, e))
    }

    /// Drop a tensor's pages from this process's mapping (they stay in the page cache), so a
    /// streaming reader's resident memory stays bounded.
    pub fn release(&self, name: &str) -> Result<()> {
        let (start, end) = self.absolute_range(self.info(name)?);
        if end == start {
            return Ok(());
        }
        // SAFETY: the mapping is a private, read-only file mapping that is never written.
        unsafe {
            Io::from_env().advise_dontneed(
                &self.mapping.map,
                start as usize,
                (end - start) as usize,
            )
        }
        .map_err(|e| Error::io(&self.path, e))
    }

    /// Whether the file is still the one that was opened: an error naming the file if a read
    /// ran past its end (it shrank while mapped), or its size, inode or mtime changed. Call it
    /// before using anything computed from the file's tensors.
    pub fn check_intact(&self) -> Result<()> {
        self.mapping.check_intact(&self.path, self.opened)
    }
}

impl Mapping {
    fn check_intact(&self, path: &Path, opened: FileIdentity) -> Result<()> {
        let faulted = self.guard.faulted();
        let detail = match std::fs::metadata(path) {
            Err(e) => format!("was {} bytes, now unreadable: {e}", opened.len),
            Ok(meta) => {
                let now = platform::file_identity(&meta);
                if now == opened && !faulted {
                    return Ok(());
                }
                let sizes = format!("was {} bytes, now {}", opened.len, now.len);
                if now.file != opened.file {
                    format!("replaced by another file; {sizes}")
                } else if now.len != opened.len {
                    sizes
                } else if now.mtime != opened.mtime {
                    format!("rewritten in place; {sizes}")
                } else {
                    format!("a read ran past its end; {sizes}")
                }
            }
        };
        Err(Error::InputChanged {
            path: path.to_path_buf(),
            detail,
        })
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

    fn changed(f: &SafetensorsFile) -> String {
        let e = f.check_intact().unwrap_err();
        assert!(matches!(e, Error::InputChanged { .. }));
        let s = e.to_string();
        assert!(s.contains(&f.path().display().to_string()), "{s}");
        s
    }

    #[test]
    fn truncated_under_a_view() {
        let dir = TempDir::new("mmap");
        let data = vec![9u8; 3 * 16384];
        let header = format!(
            r#"{{"w":{{"dtype":"U8","shape":[{n}],"data_offsets":[0,{n}]}}}}"#,
            n = data.len()
        );
        let p = write(&dir, "t.safetensors", &build_file(&header, &data));
        let f = SafetensorsFile::open(&p).unwrap();
        f.check_intact().unwrap();
        let w = f.bytes("w").unwrap();
        let len = f.len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(4096)
            .unwrap();
        // SAFETY: in bounds of the view; volatile so the read really happens after the truncation
        let last = unsafe { std::ptr::read_volatile(w.as_slice().as_ptr().add(w.len() - 1)) };
        assert_eq!(last, 0);
        let s = changed(&f);
        assert!(s.contains(&format!("(was {len} bytes, now 4096)")), "{s}");
        // Still reported after the file is restored to its old size.
        std::fs::write(&p, build_file(&header, &data)).unwrap();
        changed(&f);
    }

    #[test]
    fn replaced_rewritten_or_removed() {
        let dir = TempDir::new("mmap");
        let bytes = build_file(
            r#"{"x":{"dtype":"U8","shape":[3],"data_offsets":[0,3]}}"#,
            &[1, 2, 3],
        );
        let p = write(&dir, "a.safetensors", &bytes);
        let f = SafetensorsFile::open(&p).unwrap();

        let other = write(&dir, "b.safetensors", &bytes);
        std::fs::rename(&other, &p).unwrap();
        assert!(changed(&f).contains("replaced by another file"));
        // The old contents stay readable through the map.
        assert_eq!(f.bytes("x").unwrap().as_slice(), &[1, 2, 3]);

        let f = SafetensorsFile::open(&p).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut g = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        g.write_all(&bytes).unwrap();
        drop(g);
        assert!(changed(&f).contains("rewritten in place"));

        let f = SafetensorsFile::open(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
        assert!(changed(&f).contains("now unreadable"));
    }
}
