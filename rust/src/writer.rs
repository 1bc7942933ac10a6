//! Write a planned checkpoint: hidden temp files sized and headed up front, positioned writes in
//! any order (from any thread), then fsync + rename, with the index written last. An interrupted
//! or abandoned writer never leaves anything that looks like a finished model.
//!
//! Resuming: with a journal, a shard is put in place the moment its last tensor is written: it
//! is fsynced, renamed to its final name, and recorded in the journal with
//! its size and digest, so that a killed run's complete shards can be verified and reused by the
//! next run of the same plan (`reuse`: those shards are taken as written). The digest
//! ([`shard_digest`]) is built from hashes of each tensor's bytes taken as they are written, so
//! it costs no extra pass over the output; verifying reads the file once.
//!
//! Large tensors bypass the page cache where the platform and the file system allow it
//! ([`crate::direct_io`]): their whole aligned pages are written with O_DIRECT, their partial
//! edge pages buffered. Every positioned write goes through [`crate::platform::Io`].

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use xxhash_rust::xxh3::xxh3_64;

use crate::direct_io::{align_down, align_up, DirectWriter, MIN_DIRECT};
use crate::error::{Error, Result};
use crate::layout::{Layout, TensorSpec, INDEX_FILE_NAME};
use crate::platform::{self, Io};

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
    /// Per shard: its temp file (None for a reused shard).
    files: Vec<Option<File>>,
    /// Per shard: fsynced and renamed into place (or reused).
    completed: Vec<AtomicBool>,
    direct: DirectWriter,
    temp_paths: Vec<PathBuf>,
    /// Per tensor: EMPTY, WRITING (claimed by a writer thread) or DONE.
    slots: Vec<AtomicU8>,
    /// Per tensor: the hash of the bytes written (see [`shard_digest`]).
    hashes: Vec<AtomicU64>,
    /// Per shard: tensors not written yet.
    remaining: Vec<AtomicUsize>,
    journal: Option<Mutex<File>>,
    state: Mutex<State>,
    io: Io,
}

/// The digest of a safetensors file as the writer records it: a hash of the header bytes and of
/// each tensor's bytes, in file order. Verifying a journaled shard recomputes it from the file.
pub fn shard_digest(header: &[u8], tensor_hashes: impl Iterator<Item = u64>) -> u64 {
    // file_digest combines its parts the same way
    let mut parts = xxh3_64(header).to_le_bytes().to_vec();
    for h in tensor_hashes {
        parts.extend_from_slice(&h.to_le_bytes());
    }
    xxh3_64(&parts)
}

/// [`shard_digest`] of the file at `path`, read back (with positioned reads, not a map: a file
/// that shrinks under the reader is an error, not a fault).
pub fn file_digest(path: &Path) -> Result<u64> {
    let header = crate::mmap_file::SafetensorsFile::open(path)?;
    let mut ranges: Vec<_> = header
        .tensors()
        .iter()
        .map(|t| header.absolute_range(t))
        .collect();
    ranges.sort_unstable();
    let data_start = ranges.first().map_or(header.len(), |r| r.0);
    drop(header);
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let io = Io::from_env();
    let mut buf = vec![0u8; 8 << 20];
    let mut hash_range = |start: u64, end: u64| -> Result<u64> {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        let mut at = start;
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            io.read_exact_at(&file, &mut buf[..n], at)
                .map_err(|e| Error::io(path, e))?;
            h.update(&buf[..n]);
            at += n as u64;
        }
        Ok(h.digest())
    };
    let head = hash_range(0, data_start)?;
    let tensors = ranges
        .iter()
        .map(|&(a, b)| hash_range(a, b))
        .collect::<Result<Vec<u64>>>()?;
    let mut parts = head.to_le_bytes().to_vec();
    for t in tensors {
        parts.extend_from_slice(&t.to_le_bytes());
    }
    Ok(xxh3_64(&parts))
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
        Self::create_resuming(
            dir,
            specs,
            max_shard_bytes,
            metadata,
            index_metadata,
            &[],
            None,
        )
    }

    /// [`ShardWriter::create`] for a run that takes the shards named in `reuse` (already complete
    /// in `dir`, verified by the caller) as written, and appends each shard it completes to the
    /// journal file `journal` (one JSON line: shard, size, digest).
    pub fn create_resuming(
        dir: impl AsRef<Path>,
        specs: Vec<TensorSpec>,
        max_shard_bytes: i64,
        metadata: &[(String, String)],
        index_metadata: &[(String, String)],
        reuse: &[String],
        journal: Option<&Path>,
    ) -> Result<ShardWriter> {
        Self::create_with_io(
            dir,
            specs,
            max_shard_bytes,
            metadata,
            index_metadata,
            reuse,
            journal,
            Io::from_env(),
        )
    }

    /// [`ShardWriter::create_resuming`] through the given IO implementation rather than the
    /// process's choice.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn create_with_io(
        dir: impl AsRef<Path>,
        specs: Vec<TensorSpec>,
        max_shard_bytes: i64,
        metadata: &[(String, String)],
        index_metadata: &[(String, String)],
        reuse: &[String],
        journal: Option<&Path>,
        io: Io,
    ) -> Result<ShardWriter> {
        let dir = dir.as_ref().to_path_buf();
        let layout = Layout::plan(specs, max_shard_bytes, metadata)?;
        fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        // one shard is complete only when everything is: nothing a rerun could reuse
        let journal = match journal.filter(|_| layout.shards.len() > 1) {
            Some(path) => Some(Mutex::new(
                OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(path)
                    .map_err(|e| Error::io(path, e))?,
            )),
            None => None,
        };

        let mut files = Vec::with_capacity(layout.shards.len());
        let mut temp_paths = Vec::with_capacity(layout.shards.len());
        let slots: Vec<AtomicU8> = (0..layout.specs.len())
            .map(|_| AtomicU8::new(EMPTY))
            .collect();
        let mut remaining = Vec::with_capacity(layout.shards.len());
        for shard in &layout.shards {
            let path = dir.join(temp_name(&shard.file_name));
            if reuse.contains(&shard.file_name) {
                for &i in &shard.tensors {
                    slots[i].store(DONE, Ordering::Relaxed);
                }
                files.push(None);
                temp_paths.push(path);
                remaining.push(AtomicUsize::new(0));
                continue;
            }
            let opened = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .and_then(|f| {
                    // set_len makes a sparse file of the final size; untouched gaps read as 0.
                    f.set_len(shard.file_len())?;
                    io.write_all_at(&f, &shard.header, 0)?;
                    Ok(f)
                });
            match opened {
                Ok(f) => {
                    files.push(Some(f));
                    temp_paths.push(path);
                    remaining.push(AtomicUsize::new(shard.tensors.len()));
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
        let hashes = (0..layout.specs.len()).map(|_| AtomicU64::new(0)).collect();
        let completed = files.iter().map(|f| AtomicBool::new(f.is_none())).collect();
        let direct = DirectWriter::open(&temp_paths, io);
        Ok(ShardWriter {
            dir,
            layout,
            index_metadata: index_metadata.to_vec(),
            files,
            completed,
            direct,
            temp_paths,
            slots,
            hashes,
            remaining,
            journal,
            state: Mutex::new(State::Open),
            io,
        })
    }

    /// fsync a shard whose every tensor is written, rename it into place and journal it.
    fn complete_shard(&self, shard: usize) -> Result<()> {
        let plan = &self.layout.shards[shard];
        let tmp = &self.temp_paths[shard];
        if self.completed[shard].swap(true, Ordering::AcqRel) {
            return Ok(()); // reused, or completed already
        }
        if let Some(file) = &self.files[shard] {
            file.sync_all().map_err(|e| Error::io(tmp, e))?;
        }
        let dest = self.dir.join(&plan.file_name);
        fs::rename(tmp, &dest).map_err(|e| Error::io(&dest, e))?;
        if let Some(journal) = &self.journal {
            platform::sync_dir(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
            let digest = shard_digest(
                &plan.header,
                plan.tensors
                    .iter()
                    .map(|&i| self.hashes[i].load(Ordering::Acquire)),
            );
            let line = serde_json::json!({
                "shard": plan.file_name,
                "size": plan.file_len(),
                "digest": format!("{digest:016x}"),
            });
            let mut f = journal.lock().unwrap_or_else(|p| p.into_inner());
            f.write_all(format!("{line}\n").as_bytes())
                .and_then(|()| f.sync_data())
                .map_err(|e| Error::io(&self.dir, e))?;
        }
        Ok(())
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

    pub fn is_written(&self, name: &str) -> Result<bool> {
        let i = self
            .layout
            .index_of(name)
            .ok_or_else(|| Error::UnknownTensor(name.to_owned()))?;
        Ok(self.slots[i].load(Ordering::Acquire) == DONE)
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
                if self.journal.is_some() {
                    // the digest is for the journal only: no journal, no pass over the bytes
                    self.hashes[i].store(xxh3_64(data), Ordering::Release);
                }
                self.slots[i].store(DONE, Ordering::Release);
                // with a journal a complete shard is put in place at once (for a rerun to
                // reuse); without one every shard waits for finalize
                if self.remaining[place.shard].fetch_sub(1, Ordering::AcqRel) == 1
                    && self.journal.is_some()
                {
                    self.complete_shard(place.shard)?;
                }
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
        let Some(file) = &self.files[shard] else {
            return Err(std::io::Error::other(
                "the shard is reused: nothing is written to it",
            ));
        };
        let end = offset + data.len() as u64;
        let (mid_start, mid_end) = (align_up(offset), align_down(end));
        if self.direct.enabled(shard) && mid_end > mid_start && mid_end - mid_start >= MIN_DIRECT {
            let (a, b) = ((mid_start - offset) as usize, (mid_end - offset) as usize);
            if self.direct.write(shard, &data[a..b], mid_start)? {
                // the partial first and last pages, shared with neighbours, go through the cache
                for (lo, part) in [(offset, &data[..a]), (mid_end, &data[b..])] {
                    self.io.write_all_at(file, part, lo)?;
                    self.io.start_writeback(file, lo, part.len() as u64);
                }
                return Ok(());
            }
        }
        self.io.write_all_at(file, data, offset)?;
        self.io.start_writeback(file, offset, data.len() as u64);
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
        let mut written = Vec::with_capacity(self.temp_paths.len() + 1);
        for (k, shard) in self.layout.shards.iter().enumerate() {
            self.complete_shard(k)?; // a shard without tensors was never completed by a write
            written.push(shard.file_name.clone());
        }
        if self.layout.shards.len() > 1 {
            let tmp = self.dir.join(temp_name(INDEX_FILE_NAME));
            let dest = self.dir.join(INDEX_FILE_NAME);
            let text = self.layout.index_json(&self.index_metadata);
            let result = File::create(&tmp)
                .and_then(|f| {
                    self.io.write_all_at(&f, text.as_bytes(), 0)?;
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
        platform::sync_dir(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        Ok(written)
    }

    fn remove_temps(&self) {
        for p in &self.temp_paths {
            let _ = fs::remove_file(p);
        }
    }

    /// Delete the temp files (shards already put in place for a journal stay, for a rerun to
    /// reuse). Idempotent; a no-op after a successful finalize.
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
    fn complete_shards_are_journaled_and_reused() {
        let dir = TempDir::new("writer");
        let journal = dir.0.join("journal");
        let specs = || vec![spec("a", 4), spec("b", 4), spec("c", 4)];
        let w = ShardWriter::create_resuming(&dir.0, specs(), 4, &[], &[], &[], Some(&journal))
            .unwrap();
        w.write("c", &[3; 4]).unwrap();
        w.write("a", &[1; 4]).unwrap();
        drop(w); // killed before "b"
        let lines: Vec<serde_json::Value> = fs::read_to_string(&journal)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["shard"], "model-00003-of-00003.safetensors");
        for line in &lines {
            let path = dir.0.join(line["shard"].as_str().unwrap());
            assert_eq!(
                fs::metadata(&path).unwrap().len(),
                line["size"].as_u64().unwrap()
            );
            let digest = format!("{:016x}", file_digest(&path).unwrap());
            assert_eq!(line["digest"].as_str().unwrap(), digest);
        }
        // a changed byte changes the digest
        let shard = dir.0.join("model-00001-of-00003.safetensors");
        let mut bytes = fs::read(&shard).unwrap();
        let before = file_digest(&shard).unwrap();
        *bytes.last_mut().unwrap() ^= 1;
        fs::write(&shard, &bytes).unwrap();
        assert_ne!(file_digest(&shard).unwrap(), before);
        *bytes.last_mut().unwrap() ^= 1;
        fs::write(&shard, &bytes).unwrap();

        // the rerun takes both as written and writes only "b"
        let reuse = [
            "model-00001-of-00003.safetensors".to_owned(),
            "model-00003-of-00003.safetensors".to_owned(),
        ];
        let w = ShardWriter::create_resuming(&dir.0, specs(), 4, &[], &[], &reuse, Some(&journal))
            .unwrap();
        assert!(matches!(
            w.write("a", &[1; 4]),
            Err(Error::AlreadyWritten(_))
        ));
        w.write("b", &[2; 4]).unwrap();
        assert_eq!(w.finalize().unwrap().len(), 4);
        for (name, byte) in [("a", 1u8), ("b", 2), ("c", 3)] {
            let idx: serde_json::Value =
                serde_json::from_str(&fs::read_to_string(dir.0.join(INDEX_FILE_NAME)).unwrap())
                    .unwrap();
            let f = SafetensorsFile::open(dir.0.join(idx["weight_map"][name].as_str().unwrap()))
                .unwrap();
            assert_eq!(f.bytes(name).unwrap().as_slice(), &[byte; 4]);
        }
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

    /// Every file the writer put in `dir`, by name.
    fn contents(dir: &Path) -> Vec<(String, Vec<u8>)> {
        listing(dir)
            .into_iter()
            .map(|n| {
                let bytes = fs::read(dir.join(&n)).unwrap();
                (n, bytes)
            })
            .collect()
    }

    #[test]
    fn native_and_portable_io_write_identical_files() {
        // Large unaligned tensors (direct interiors and buffered edges where the platform has
        // direct writes), small ones, an empty one, three shards, a journal and an index.
        let sizes = [3_000_001u64, 5, 0, 2_500_000, 4096 * 300, 1_048_577, 77];
        let data: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n).map(|j| ((j * 29 + i as u64) % 251) as u8).collect())
            .collect();
        let mut outputs = Vec::new();
        for io in [Io::Native, Io::Portable] {
            let dir = TempDir::new("writer-io");
            let out = dir.0.join("out");
            let specs = sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| spec(&format!("t{i}"), n))
                .collect();
            let journal = dir.0.join("journal");
            let w = ShardWriter::create_with_io(
                &out,
                specs,
                4_000_000,
                &[("k".into(), "v".into())],
                &[("m".into(), "1".into())],
                &[],
                Some(&journal),
                io,
            )
            .unwrap();
            for i in [3, 0, 6, 4, 1, 5, 2] {
                w.write(&format!("t{i}"), &data[i]).unwrap();
            }
            assert_eq!(w.finalize().unwrap().len(), 4);
            let files = contents(&out);
            // what was written is what was given
            let f = SafetensorsFile::open(out.join(w.shard_of("t4").unwrap())).unwrap();
            assert_eq!(f.bytes("t4").unwrap().as_slice(), &data[4][..]);
            outputs.push((files, fs::read_to_string(&journal).unwrap()));
        }
        assert_eq!(outputs[0].0.len(), 4);
        for ((name_a, a), (name_b, b)) in outputs[0].0.iter().zip(&outputs[1].0) {
            assert_eq!(name_a, name_b);
            assert!(a == b, "{name_a} differs between native and portable IO");
        }
        // the digests read back through each path agree with the journal's
        assert_eq!(outputs[0].1, outputs[1].1);
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
