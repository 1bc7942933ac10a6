//! Output writes that bypass the page cache (Linux `O_DIRECT`; other platforms have none, see
//! [`crate::platform`]).
//!
//! A buffered write copies every output byte into freshly allocated page-cache pages (evicting
//! the inputs' pages on a machine short of RAM) and the final fsync then waits for all of it;
//! on a 2-core machine that costs about as much CPU as the merge arithmetic. With `O_DIRECT` the
//! device reads the bytes straight from an aligned staging buffer, so the only CPU cost is one
//! memcpy into that buffer.
//!
//! Direct writes need the file offset, the length and the memory address aligned to the
//! device's block size; [`BLOCK`] (4096) satisfies every common device. The caller writes
//! each tensor's whole aligned interior pages here and its partial first and last pages
//! through the ordinary buffered descriptor: a page is therefore written by one path only,
//! which keeps the two paths coherent (a direct write only invalidates its own range of the
//! page cache).
//!
//! `MERGEKITTY_NO_DIRECT_IO=1` turns it off; a file system that refuses `O_DIRECT` (open or
//! first write fails with EINVAL) falls back to buffered writes by itself.

use std::alloc::{alloc, dealloc, Layout};
use std::fs::File;
use std::io;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::platform::{self, Io};

/// Alignment of offsets, lengths and buffer addresses for direct writes.
pub const BLOCK: u64 = 4096;
/// Size of one staging buffer (a multiple of [`BLOCK`]).
const STAGE: usize = 16 << 20;
/// Interiors shorter than this go through the page cache: not worth a staging copy.
pub const MIN_DIRECT: u64 = 1 << 20;

pub fn align_up(x: u64) -> u64 {
    x.div_ceil(BLOCK) * BLOCK
}

pub fn align_down(x: u64) -> u64 {
    x / BLOCK * BLOCK
}

/// A heap buffer aligned to [`BLOCK`].
struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer is plain owned memory; it is used by one thread at a time (taken from
// and returned to a Mutex-guarded pool).
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    fn new(len: usize) -> Option<AlignedBuf> {
        let layout = Layout::from_size_align(len, BLOCK as usize).ok()?;
        // SAFETY: layout has a non-zero size (STAGE).
        let ptr = NonNull::new(unsafe { alloc(layout) })?;
        Some(AlignedBuf { ptr, len })
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr points to len bytes owned by self; &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if let Ok(layout) = Layout::from_size_align(self.len, BLOCK as usize) {
            // SAFETY: allocated in `new` with this same layout.
            unsafe { dealloc(self.ptr.as_ptr(), layout) };
        }
    }
}

/// Direct-write descriptors for the shard files, with their staging buffers.
pub struct DirectWriter {
    files: Vec<Option<File>>,
    enabled: Vec<AtomicBool>,
    pool: Mutex<Vec<AlignedBuf>>,
}

impl DirectWriter {
    /// Open `paths` (already created) for direct writes; shards whose platform or file system
    /// refuses get none (and write through the page cache).
    pub fn open(paths: &[impl AsRef<Path>], io: Io) -> DirectWriter {
        let wanted =
            std::env::var_os("MERGEKITTY_NO_DIRECT_IO").is_none_or(|v| v.is_empty() || v == "0");
        let files: Vec<Option<File>> = paths
            .iter()
            .map(|p| {
                if wanted {
                    io.open_direct(p.as_ref())
                } else {
                    None
                }
            })
            .collect();
        let enabled = files.iter().map(|f| AtomicBool::new(f.is_some())).collect();
        DirectWriter {
            files,
            enabled,
            pool: Mutex::new(Vec::new()),
        }
    }

    /// Whether shard `shard` takes direct writes.
    pub fn enabled(&self, shard: usize) -> bool {
        self.enabled
            .get(shard)
            .is_some_and(|e| e.load(Ordering::Relaxed))
    }

    /// Write `data` at `offset` of shard `shard` with direct I/O. `offset` and `data.len()`
    /// must be multiples of [`BLOCK`]. `Ok(false)`: the file system refused direct I/O (now
    /// off for this shard) and nothing was written; the caller writes through the page cache.
    pub fn write(&self, shard: usize, data: &[u8], offset: u64) -> io::Result<bool> {
        let Some(file) = self.files.get(shard).and_then(|f| f.as_ref()) else {
            return Ok(false);
        };
        if !offset.is_multiple_of(BLOCK) || !(data.len() as u64).is_multiple_of(BLOCK) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "direct write not aligned to 4096 bytes",
            ));
        }
        let Some(mut buf) = self.take() else {
            return Ok(false); // no memory for a staging buffer: the page cache path needs none
        };
        let mut done = 0usize;
        let mut result = Ok(true);
        while done < data.len() {
            let n = (data.len() - done).min(STAGE);
            let stage = &mut buf.as_mut_slice()[..n];
            stage.copy_from_slice(&data[done..done + n]);
            if let Err(e) = write_all_at(file, stage, offset + done as u64) {
                if platform::is_invalid_argument(&e) && done == 0 {
                    // the file system takes O_DIRECT opens but not these writes
                    if let Some(flag) = self.enabled.get(shard) {
                        flag.store(false, Ordering::Relaxed);
                    }
                    result = Ok(false);
                } else {
                    result = Err(e);
                }
                break;
            }
            done += n;
        }
        self.give(buf);
        result
    }

    fn take(&self) -> Option<AlignedBuf> {
        let popped = self.pool.lock().unwrap_or_else(|p| p.into_inner()).pop();
        popped.or_else(|| AlignedBuf::new(STAGE))
    }

    fn give(&self, buf: AlignedBuf) {
        self.pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(buf);
    }
}

/// One positioned write of everything; a short direct write would leave the rest unaligned,
/// so it is an error. A file system that runs out of space mid-write returns a short count
/// rather than ENOSPC: that case is reported as the ENOSPC it is.
fn write_all_at(file: &File, data: &[u8], offset: u64) -> io::Result<()> {
    let n = platform::write_at(file, data, offset)?;
    if n != data.len() {
        if platform::free_bytes(file).is_some_and(|free| free < (data.len() - n) as u64) {
            return Err(platform::no_space_error());
        }
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("short direct write ({n} of {} bytes)", data.len()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_helpers() {
        assert_eq!(align_up(0), 0);
        assert_eq!(align_up(1), 4096);
        assert_eq!(align_up(4096), 4096);
        assert_eq!(align_down(4095), 0);
        assert_eq!(align_down(8193), 8192);
    }

    #[test]
    fn unaligned_direct_writes_are_refused() {
        let dir = crate::mmap_file::tests::TempDir::new("direct");
        let p = dir.0.join("f");
        std::fs::write(&p, vec![0u8; 3 * 4096]).unwrap();
        let w = DirectWriter::open(&[&p], Io::Native);
        assert!(w.write(0, &[1u8; 100], 0).is_err());
        assert!(w.write(0, &[1u8; 4096], 10).is_err());
        // aligned: written directly where supported, else reported as not taken
        let data: Vec<u8> = (0..2 * 4096).map(|i| (i % 251) as u8).collect();
        if w.write(0, &data, 4096).unwrap() {
            let back = std::fs::read(&p).unwrap();
            assert_eq!(&back[4096..3 * 4096], &data[..]);
            assert!(back[..4096].iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn portable_io_takes_no_direct_writes() {
        let dir = crate::mmap_file::tests::TempDir::new("direct");
        let p = dir.0.join("f");
        std::fs::write(&p, vec![0u8; 2 * 4096]).unwrap();
        let w = DirectWriter::open(&[&p], Io::Portable);
        assert!(!w.enabled(0));
        assert!(!w.write(0, &[1u8; 4096], 0).unwrap());
        assert!(std::fs::read(&p).unwrap().iter().all(|&b| b == 0));
    }
}
