//! Write a planned checkpoint: hidden temp files sized and headed up front, positioned writes in
//! any order (from any thread), then fsync + rename, with the index written last. An interrupted
//! or abandoned writer never leaves anything that looks like a finished model.
//!
//! Large tensors bypass the page cache where the file system allows it ([`crate::direct_io`]):
//! their whole aligned pages are written with O_DIRECT, their partial edge pages buffered.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::direct_io::{align_down, align_up, DirectWriter, MIN_DIRECT};
use crate::error::{Error, Result};
use crate::layout::{Layout, TensorSpec, INDEX_FILE_NAME};

const EMPTY: u8 = 0;
const WRITING: u8 = 1;
const DONE: u8 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Open,
    Finalized,
    Aborted,
}

pub struct ShardWriter {
    dir: PathBuf,
    layout: Layout,
    index_metadata: Vec<(String, String)>,
    files: Vec<File>,
    direct: DirectWriter,
    temp_paths: Vec<PathBuf>,
    /// Per tensor: EMPTY, WRITING (claimed by a writer thread) or DONE.
    slots: Vec<AtomicU8>,
    state: Mutex<State>,
}

fn temp_name(final_name: &str) -> String {
    format!(".{final_name}.partial")
}

impl ShardWriter {
    pub fn create(
        dir: impl AsRef<Path>,
        specs: Vec<TensorSpec>,
        max_shard_bytes: i64,
        metadata: &[(String, String)],
        index_metadata: &[(String, String)],
    ) -> Result<ShardWriter> {
        let dir = dir.as_ref().to_path_buf();
        let layout = Layout::plan(specs, max_shard_bytes, metadata)?;
        fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;

        let mut files = Vec::with_capacity(layout.shards.len());
        let mut temp_paths = Vec::with_capacity(layout.shards.len());
        for shard in &layout.shards {
            let path = dir.join(temp_name(&shard.file_name));
            let opened = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .and_then(|f| {
                    // set_len makes a sparse file of the final size; untouched gaps read as 0.
                    f.set_len(shard.file_len())?;
                    f.write_all_at(&shard.header, 0)?;
                    Ok(f)
                });
            match opened {
                Ok(f) => {
                    files.push(f);
                    temp_paths.push(path);
                }
                Err(e) => {
                    let _ = fs::remove_file(&path);
                    for p in &temp_paths {
                        let _ = fs::remove_file(p);
                    }
                    return Err(Error::io(path, e));
                }
            }
        }
        let slots = (0..layout.specs.len())
            .map(|_| AtomicU8::new(EMPTY))
            .collect();
        let direct = DirectWriter::open(&temp_paths);
        Ok(ShardWriter {
            dir,
            layout,
            index_metadata: index_metadata.to_vec(),
            files,
            direct,
            temp_paths,
            slots,
            state: Mutex::new(State::Open),
        })
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn shard_files(&self) -> Vec<String> {
        self.layout
            .shards
            .iter()
            .map(|s| s.file_name.clone())
            .collect()
    }

    pub fn shard_of(&self, name: &str) -> Result<&str> {
        self.layout
            .shard_file_of(name)
            .ok_or_else(|| Error::UnknownTensor(name.to_owned()))
    }

    pub fn total_bytes(&self) -> u64 {
        self.layout.total_bytes
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave State inconsistent (it is a plain enum).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ensure_open(&self) -> Result<()> {
        match *self.lock() {
            State::Open => Ok(()),
            State::Finalized => Err(Error::WriterClosed("finalized")),
            State::Aborted => Err(Error::WriterClosed("aborted")),
        }
    }

    /// Write one tensor's bytes at its planned offset. Safe to call from several threads.
    pub fn write(&self, name: &str, data: &[u8]) -> Result<()> {
        self.ensure_open()?;
        let i = self
            .layout
            .index_of(name)
            .ok_or_else(|| Error::UnknownTensor(name.to_owned()))?;
        let place = &self.layout.placements[i];
        if data.len() as u64 != place.len {
            return Err(Error::WriteSizeMismatch {
                name: name.to_owned(),
                expected: place.len,
                actual: data.len() as u64,
            });
        }
        if self.slots[i]
            .compare_exchange(EMPTY, WRITING, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(Error::AlreadyWritten(name.to_owned()));
        }
        match self.write_placed(place.shard, data, place.offset) {
            Ok(()) => {
                self.slots[i].store(DONE, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                // Let the caller retry.
                self.slots[i].store(EMPTY, Ordering::Release);
                Err(Error::io(&self.temp_paths[place.shard], e))
            }
        }
    }

    /// `data` at `offset` of shard `shard`: the whole aligned pages directly (when the shard
    /// takes direct writes and they are worth it), everything else through the page cache.
    fn write_placed(&self, shard: usize, data: &[u8], offset: u64) -> std::io::Result<()> {
        let file = &self.files[shard];
        let end = offset + data.len() as u64;
        let (mid_start, mid_end) = (align_up(offset), align_down(end));
        if self.direct.enabled(shard) && mid_end > mid_start && mid_end - mid_start >= MIN_DIRECT {
            let (a, b) = ((mid_start - offset) as usize, (mid_end - offset) as usize);
            if self.direct.write(shard, &data[a..b], mid_start)? {
                // the partial first and last pages, shared with neighbours, go through the cache
                for (lo, part) in [(offset, &data[..a]), (mid_end, &data[b..])] {
                    file.write_all_at(part, lo)?;
                    start_writeback(file, lo, part.len() as u64);
                }
                return Ok(());
            }
        }
        file.write_all_at(data, offset)?;
        start_writeback(file, offset, data.len() as u64);
        Ok(())
    }

    /// Check every tensor was written, make the data durable, and publish the files. Returns
    /// the file names written (relative to the output directory), the index last.
    pub fn finalize(&self) -> Result<Vec<String>> {
        let mut state = self.lock();
        match *state {
            State::Open => {}
            State::Finalized => return Err(Error::WriterClosed("finalized")),
            State::Aborted => return Err(Error::WriterClosed("aborted")),
        }
        let missing: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].load(Ordering::Acquire) != DONE)
            .collect();
        if !missing.is_empty() {
            // Still open: the caller may write the rest, or abort.
            return Err(Error::NotWritten {
                count: missing.len(),
                names: missing
                    .iter()
                    .take(5)
                    .map(|&i| self.layout.specs[i].name.clone())
                    .collect(),
            });
        }
        match self.publish() {
            Ok(names) => {
                *state = State::Finalized;
                Ok(names)
            }
            Err(e) => {
                // Half-published output must not survive: remove finals and temps alike.
                for shard in &self.layout.shards {
                    let _ = fs::remove_file(self.dir.join(&shard.file_name));
                }
                self.remove_temps();
                *state = State::Aborted;
                Err(e)
            }
        }
    }

    fn publish(&self) -> Result<Vec<String>> {
        for (f, p) in self.files.iter().zip(&self.temp_paths) {
            f.sync_all().map_err(|e| Error::io(p, e))?;
        }
        let mut written = Vec::with_capacity(self.temp_paths.len() + 1);
        for (shard, tmp) in self.layout.shards.iter().zip(&self.temp_paths) {
            let dest = self.dir.join(&shard.file_name);
            fs::rename(tmp, &dest).map_err(|e| Error::io(&dest, e))?;
            written.push(shard.file_name.clone());
        }
        if self.layout.shards.len() > 1 {
            let tmp = self.dir.join(temp_name(INDEX_FILE_NAME));
            let dest = self.dir.join(INDEX_FILE_NAME);
            let text = self.layout.index_json(&self.index_metadata);
            let result = File::create(&tmp)
                .and_then(|f| {
                    f.write_all_at(text.as_bytes(), 0)?;
                    f.sync_all()
                })
                .map_err(|e| Error::io(&tmp, e))
                .and_then(|()| fs::rename(&tmp, &dest).map_err(|e| Error::io(&dest, e)));
            if let Err(e) = result {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
            written.push(INDEX_FILE_NAME.to_owned());
        }
        // Make the renames themselves durable.
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(&self.dir, e))?;
        Ok(written)
    }

    fn remove_temps(&self) {
        for p in &self.temp_paths {
            let _ = fs::remove_file(p);
        }
    }

    /// Delete the temp files. Idempotent; a no-op after a successful finalize.
    pub fn abort(&self) {
        let mut state = self.lock();
        if *state == State::Open {
            self.remove_temps();
            *state = State::Aborted;
        }
    }

    pub fn is_finalized(&self) -> bool {
        *self.lock() == State::Finalized
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        self.abort();
    }
}

/// Ask the kernel to start writing this range to disk now, without waiting. The final fsync
/// then has little left to do, so durability overlaps with the rest of the merge instead of
/// stalling at the end. Advisory: errors are ignored (fsync reports real ones).
#[cfg(target_os = "linux")]
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::unix::io::AsRawFd;
    if len == 0 {
        return;
    }
    // SAFETY: plain syscall on a valid open descriptor; no memory is passed.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_file: &File, _offset: u64, _len: u64) {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::Dtype;
    use crate::mmap_file::tests::TempDir;
    use crate::mmap_file::SafetensorsFile;

    fn spec(name: &str, n: u64) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            dtype: Dtype::U8,
            shape: vec![n],
        }
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn single_shard_round_trip() {
        let dir = TempDir::new("writer");
        let w = ShardWriter::create(
            &dir.0,
            vec![spec("a", 3), spec("b", 5), spec("empty", 0)],
            0,
            &[("k".into(), "v".into())],
            &[],
        )
        .unwrap();
        assert_eq!(listing(&dir.0), [".model.safetensors.partial"]);
        // Out of order on purpose.
        w.write("b", &[5, 6, 7, 8, 9]).unwrap();
        w.write("empty", &[]).unwrap();
        w.write("a", &[1, 2, 3]).unwrap();
        assert_eq!(w.finalize().unwrap(), ["model.safetensors"]);
        assert!(w.is_finalized());
        assert_eq!(listing(&dir.0), ["model.safetensors"]);
        let f = SafetensorsFile::open(dir.0.join("model.safetensors")).unwrap();
        assert_eq!(f.bytes("a").unwrap().as_slice(), &[1, 2, 3]);
        assert_eq!(f.bytes("b").unwrap().as_slice(), &[5, 6, 7, 8, 9]);
        assert_eq!(f.metadata().unwrap()[0], ("format".into(), "pt".into()));
        // Finalized output survives drop and abort.
        w.abort();
        drop(w);
        assert_eq!(listing(&dir.0), ["model.safetensors"]);
    }

    #[test]
    fn sharded_with_index() {
        let dir = TempDir::new("writer");
        let w = ShardWriter::create(
            &dir.0,
            vec![spec("a", 6), spec("b", 6), spec("c", 2)],
            8,
            &[],
            &[("mergekitty".into(), "1".into())],
        )
        .unwrap();
        assert_eq!(w.total_bytes(), 14);
        assert_eq!(w.shard_files().len(), 2);
        assert_eq!(w.shard_of("c").unwrap(), "model-00002-of-00002.safetensors");
        assert!(matches!(w.shard_of("x"), Err(Error::UnknownTensor(_))));
        for (n, len) in [("a", 6), ("b", 6), ("c", 2)] {
            w.write(n, &vec![len as u8; len]).unwrap();
        }
        let files = w.finalize().unwrap();
        assert_eq!(
            files,
            [
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
                "model.safetensors.index.json"
            ]
        );
        assert_eq!(listing(&dir.0), {
            let mut f = files.clone();
            f.sort();
            f
        });
        let idx: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(dir.0.join(INDEX_FILE_NAME)).unwrap())
                .unwrap();
        assert_eq!(idx["metadata"]["total_size"], 14);
        assert_eq!(idx["metadata"]["mergekitty"], "1");
        assert_eq!(idx["weight_map"]["b"], "model-00002-of-00002.safetensors");
        let f = SafetensorsFile::open(dir.0.join("model-00002-of-00002.safetensors")).unwrap();
        assert_eq!(f.bytes("c").unwrap().as_slice(), &[2, 2]);
        assert!(matches!(w.write("a", &[0; 6]), Err(Error::WriterClosed(_))));
        assert!(matches!(w.finalize(), Err(Error::WriterClosed(_))));
    }

    #[test]
    fn write_errors() {
        let dir = TempDir::new("writer");
        let w = ShardWriter::create(&dir.0, vec![spec("a", 3), spec("b", 1)], 0, &[], &[]).unwrap();
        assert!(matches!(w.write("zz", &[1]), Err(Error::UnknownTensor(_))));
        assert!(matches!(
            w.write("a", &[1]),
            Err(Error::WriteSizeMismatch {
                expected: 3,
                actual: 1,
                ..
            })
        ));
        w.write("a", &[1, 2, 3]).unwrap();
        assert!(matches!(
            w.write("a", &[1, 2, 3]),
            Err(Error::AlreadyWritten(_))
        ));
        let e = w.finalize().unwrap_err();
        assert!(matches!(&e, Error::NotWritten { count: 1, names } if names == &["b"]));
        // Still usable after a failed finalize.
        w.write("b", &[9]).unwrap();
        w.finalize().unwrap();
    }

    #[test]
    fn drop_and_abort_clean_up() {
        let dir = TempDir::new("writer");
        let w = ShardWriter::create(&dir.0, vec![spec("a", 4), spec("b", 4)], 4, &[], &[]).unwrap();
        assert_eq!(listing(&dir.0).len(), 2);
        w.write("a", &[0; 4]).unwrap();
        drop(w);
        assert!(listing(&dir.0).is_empty());

        let w = ShardWriter::create(&dir.0, vec![spec("a", 4)], 0, &[], &[]).unwrap();
        w.abort();
        w.abort();
        assert!(listing(&dir.0).is_empty());
        assert!(matches!(
            w.write("a", &[0; 4]),
            Err(Error::WriterClosed("aborted"))
        ));
    }

    #[test]
    fn duplicate_names_rejected_before_touching_disk() {
        let dir = TempDir::new("writer");
        let r = ShardWriter::create(&dir.0, vec![spec("a", 1), spec("a", 1)], 0, &[], &[]);
        assert!(matches!(r, Err(Error::DuplicateTensor(_))));
        assert!(listing(&dir.0).is_empty());
    }

    #[test]
    fn large_unaligned_tensors_round_trip() {
        // Tensors of a few MiB at odd offsets: aligned interiors go direct (where the file
        // system allows), edges through the page cache; the bytes must come back exact.
        let dir = TempDir::new("writer");
        let sizes = [3_000_001u64, 5, 2_500_000, 4096 * 300, 1_048_577];
        let specs: Vec<_> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| spec(&format!("t{i}"), n))
            .collect();
        let w = ShardWriter::create(&dir.0, specs, 0, &[], &[]).unwrap();
        let data: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                (0..n)
                    .map(|j| ((j * 31 + i as u64 * 7) % 253) as u8)
                    .collect()
            })
            .collect();
        // Out of file order, so edge pages are completed by a later write.
        for i in [3, 0, 4, 1, 2] {
            w.write(&format!("t{i}"), &data[i]).unwrap();
        }
        w.finalize().unwrap();
        let f = SafetensorsFile::open(dir.0.join("model.safetensors")).unwrap();
        for (i, d) in data.iter().enumerate() {
            assert_eq!(
                f.bytes(&format!("t{i}")).unwrap().as_slice(),
                &d[..],
                "t{i}"
            );
        }
    }

    #[test]
    fn concurrent_writes() {
        let dir = TempDir::new("writer");
        let specs: Vec<_> = (0..64).map(|i| spec(&format!("t{i}"), 1000)).collect();
        let w = ShardWriter::create(&dir.0, specs, 10_000, &[], &[]).unwrap();
        std::thread::scope(|s| {
            for k in 0..4 {
                let w = &w;
                s.spawn(move || {
                    for i in (k..64).step_by(4) {
                        w.write(&format!("t{i}"), &vec![i as u8; 1000]).unwrap();
                    }
                });
            }
        });
        let files = w.finalize().unwrap();
        assert_eq!(files.len(), 8); // 7 shards + index
        let f = SafetensorsFile::open(dir.0.join(w.shard_of("t63").unwrap())).unwrap();
        assert!(f.bytes("t63").unwrap().as_slice().iter().all(|&b| b == 63));
    }
}
