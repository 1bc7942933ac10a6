//! Every call that differs between operating systems, behind small portable functions. No other
//! module of the crate names `std::os`, `libc` or a `cfg(target_os)`.
//!
//! | | Linux | macOS | Windows |
//! |---|---|---|---|
//! | positioned writes and reads | `pwrite`/`pread` | `pwrite`/`pread` | `seek_write`/`seek_read`, looped |
//! | page-cache bypass for large writes | `O_DIRECT` | none | none |
//! | early writeback | `sync_file_range` | none | none |
//! | prefetch / drop mapped pages | `madvise` | `madvise` | none |
//! | fsync of the output directory | yes | yes | none (a directory is not a file there) |
//! | SIGBUS guard ([`sigbus`]) | yes | none | not needed |
//!
//! Where a platform has no early writeback the data is made durable by the fsync each shard
//! gets when it is complete, as on Linux. Without advice the kernel reads mapped pages on first
//! touch and reclaims them under memory pressure by itself. On macOS a read of a mapped input
//! that another process truncates still ends the process with SIGBUS, as it would without the
//! guard; Windows refuses to truncate a file while it is mapped, so the fault cannot happen.
//!
//! `MERGEKITTY_PORTABLE_IO=1` (any value but empty or `0`) makes [`Io::from_env`] answer
//! [`Io::Portable`]: on any platform, positioned writes and reads go through the same loop as on
//! Windows, and there is no advice, no `O_DIRECT` and no early writeback. The output bytes are
//! the same either way; the switch exists so that the fallbacks are exercised on Linux. It is
//! read once per process. It leaves alone what is not an IO path: the SIGBUS guard, the fsync
//! of the output directory and how a changed input file is recognised.

use std::ffi::OsStr;
use std::fs::{File, Metadata};
use std::io;
use std::path::Path;
use std::sync::OnceLock;

use memmap2::Mmap;

pub mod sigbus;

#[cfg(unix)]
mod unix;
#[cfg(unix)]
use unix as sys;

#[cfg(windows)]
mod windows;
#[cfg(windows)]
use windows as sys;

#[cfg(not(any(unix, windows)))]
compile_error!("mergekitty's native core builds for unix and Windows targets only");

/// The environment variable that selects [`Io::Portable`].
pub const PORTABLE_IO_ENV: &str = "MERGEKITTY_PORTABLE_IO";

/// Which implementation of the IO calls to use: the platform's fast paths, or the portable
/// fallbacks (the only implementation on platforms that have no fast paths).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Io {
    Native,
    Portable,
}

static FROM_ENV: OnceLock<Io> = OnceLock::new();

/// Whether a value of [`PORTABLE_IO_ENV`] turns the switch on.
fn switch_on(value: Option<&OsStr>) -> bool {
    value.is_some_and(|v| !v.is_empty() && v != "0")
}

impl Io {
    /// The process's choice: [`Io::Portable`] when `MERGEKITTY_PORTABLE_IO` is set, read once.
    pub fn from_env() -> Io {
        *FROM_ENV.get_or_init(|| {
            if switch_on(std::env::var_os(PORTABLE_IO_ENV).as_deref()) {
                Io::Portable
            } else {
                Io::Native
            }
        })
    }

    /// Write all of `buf` at `offset` of `file`, without moving through the file's cursor in
    /// any way the other calls depend on. Safe to call from several threads on one file.
    pub fn write_all_at(self, file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
        match self {
            Io::Native => sys::write_all_at(file, buf, offset),
            Io::Portable => write_all_with(buf, offset, |b, o| sys::write_at(file, b, o)),
        }
    }

    /// Fill `buf` from `offset` of `file`; reaching the end of the file first is an error.
    pub fn read_exact_at(self, file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self {
            Io::Native => sys::read_exact_at(file, buf, offset),
            Io::Portable => read_exact_with(buf, offset, |b, o| sys::read_at(file, b, o)),
        }
    }

    /// Ask the kernel to start writing `len` bytes at `offset` to disk now, without waiting, so
    /// that the final fsync has little left to do. Advisory: errors are ignored (the fsync
    /// reports real ones). A no-op where the platform has no such call.
    pub fn start_writeback(self, file: &File, offset: u64, len: u64) {
        if self == Io::Native {
            sys::start_writeback(file, offset, len);
        }
    }

    /// Ask the kernel to start reading `len` bytes of `map` from `start` in the background.
    pub fn advise_willneed(self, map: &Mmap, start: usize, len: usize) -> io::Result<()> {
        match self {
            Io::Native => sys::advise_willneed(map, start, len),
            Io::Portable => Ok(()),
        }
    }

    /// Drop `len` bytes of `map` from `start` (rounded out to whole pages) from this process's
    /// resident memory; they stay in the page cache and a later read faults them back in.
    ///
    /// # Safety
    ///
    /// `map` must be a read-only file mapping that nothing has written through, so that the
    /// dropped pages are clean and read back identical.
    pub unsafe fn advise_dontneed(self, map: &Mmap, start: usize, len: usize) -> io::Result<()> {
        match self {
            // SAFETY: passed on from the caller.
            Io::Native => unsafe { sys::advise_dontneed(map, start, len) },
            Io::Portable => Ok(()),
        }
    }

    /// `path` (an existing file) opened for writes that bypass the page cache, or None where
    /// the platform or the file system has no such writes.
    pub fn open_direct(self, path: &Path) -> Option<File> {
        match self {
            Io::Native => sys::open_direct(path),
            Io::Portable => None,
        }
    }
}

/// One positioned write of `buf` at `offset`, which may write less than all of it.
pub fn write_at(file: &File, buf: &[u8], offset: u64) -> io::Result<usize> {
    sys::write_at(file, buf, offset)
}

/// Bytes an unprivileged writer may still use on `file`'s file system, where the platform says.
pub fn free_bytes(file: &File) -> Option<u64> {
    sys::free_bytes(file)
}

/// The platform's "no space left on the device" error.
pub fn no_space_error() -> io::Error {
    sys::no_space_error()
}

/// Whether `e` is the platform's "invalid argument" (how a file system refuses direct writes).
pub fn is_invalid_argument(e: &io::Error) -> bool {
    sys::is_invalid_argument(e)
}

/// Make the renames inside directory `dir` durable (fsync the directory). Windows cannot open a
/// directory as a file: there it does nothing, and a rename is as durable as NTFS makes it.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    sys::sync_dir(dir)
}

/// What tells one version of a file from another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileIdentity {
    /// Which file: (device, inode) on unix. Windows: (0, creation time), since std has no
    /// stable file index there; a replacing file was created at another time.
    pub file: (u64, u64),
    pub len: u64,
    /// Modification time as (seconds, nanoseconds) on unix; (100 ns ticks, 0) on Windows.
    pub mtime: (i64, i64),
}

/// The [`FileIdentity`] of the file `meta` describes.
pub fn file_identity(meta: &Metadata) -> FileIdentity {
    sys::file_identity(meta)
}

/// How an OS error is given to Python's `OSError`: `errno` (its first argument) and, on
/// Windows, `winerror` (its fourth, from which Python derives the errno and the subclass).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OsErrorCode {
    pub errno: i32,
    pub winerror: Option<i32>,
}

/// The OS error code of `e`, if it came from the OS.
pub fn os_error_code(e: &io::Error) -> Option<OsErrorCode> {
    sys::os_error_code(e)
}

/// Write all of `buf` at `offset` through `write_at`, one positioned write that may be short:
/// loop on short counts and interruptions until everything is written.
fn write_all_with(
    mut buf: &[u8],
    mut offset: u64,
    mut write_at: impl FnMut(&[u8], u64) -> io::Result<usize>,
) -> io::Result<()> {
    while !buf.is_empty() {
        match write_at(buf, offset) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "failed to write whole buffer",
                ))
            }
            Ok(n) => {
                buf = &buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Fill `buf` from `offset` through `read_at`, one positioned read that may be short; a read of
/// 0 bytes (the end of the file) before `buf` is full is an error.
fn read_exact_with(
    mut buf: &mut [u8],
    mut offset: u64,
    mut read_at: impl FnMut(&mut [u8], u64) -> io::Result<usize>,
) -> io::Result<()> {
    while !buf.is_empty() {
        match read_at(buf, offset) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "failed to fill whole buffer",
                ))
            }
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mmap_file::tests::TempDir;

    #[test]
    fn the_switch_takes_any_value_but_empty_or_zero() {
        assert!(!switch_on(None));
        assert!(!switch_on(Some(OsStr::new(""))));
        assert!(!switch_on(Some(OsStr::new("0"))));
        assert!(switch_on(Some(OsStr::new("1"))));
        assert!(switch_on(Some(OsStr::new("yes"))));
    }

    /// A positioned "file" in memory whose writes and reads stop short and get interrupted,
    /// as a platform's single positioned call may.
    struct Choppy {
        bytes: Vec<u8>,
        calls: usize,
    }

    impl Choppy {
        fn step(&mut self) -> io::Result<usize> {
            self.calls += 1;
            if self.calls.is_multiple_of(3) {
                return Err(io::Error::from(io::ErrorKind::Interrupted));
            }
            Ok(self.calls % 5 + 1) // 1 to 5 bytes per call
        }
    }

    #[test]
    fn the_write_loop_finishes_short_and_interrupted_writes() {
        let mut f = Choppy {
            bytes: vec![0; 64],
            calls: 0,
        };
        let data: Vec<u8> = (1..=50).collect();
        write_all_with(&data, 7, |b, o| {
            let n = f.step()?.min(b.len());
            f.bytes[o as usize..o as usize + n].copy_from_slice(&b[..n]);
            Ok(n)
        })
        .unwrap();
        assert!(f.calls > 10);
        assert_eq!(&f.bytes[7..57], &data[..]);
        assert!(f.bytes[..7].iter().chain(&f.bytes[57..]).all(|&b| b == 0));

        let e = write_all_with(&data, 0, |_, _| Ok(0)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WriteZero);
        let e = write_all_with(&data, 0, |_, _| Err(io::Error::other("disk gone"))).unwrap_err();
        assert_eq!(e.to_string(), "disk gone");
    }

    #[test]
    fn the_read_loop_finishes_short_reads_and_reports_the_end() {
        let src: Vec<u8> = (0..100).collect();
        let mut f = Choppy {
            bytes: Vec::new(),
            calls: 0,
        };
        let mut read = |b: &mut [u8], o: u64| -> io::Result<usize> {
            let n = f
                .step()?
                .min(b.len())
                .min(src.len().saturating_sub(o as usize));
            b[..n].copy_from_slice(&src[o as usize..o as usize + n]);
            Ok(n)
        };
        let mut buf = [0u8; 40];
        read_exact_with(&mut buf, 30, &mut read).unwrap();
        assert_eq!(&buf[..], &src[30..70]);
        let e = read_exact_with(&mut buf, 80, &mut read).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn both_implementations_write_and_read_the_same_bytes() {
        let dir = TempDir::new("platform");
        let data: Vec<u8> = (0..3 * 4096 + 17).map(|i| (i % 251) as u8).collect();
        let mut files = Vec::new();
        for io in [Io::Native, Io::Portable] {
            let path = dir.0.join(format!("{io:?}"));
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .unwrap();
            io.write_all_at(&f, &data[1000..], 1000).unwrap();
            io.write_all_at(&f, &data[..1000], 0).unwrap();
            io.start_writeback(&f, 0, data.len() as u64);
            f.sync_all().unwrap();
            let mut back = vec![0u8; data.len() - 5];
            io.read_exact_at(&f, &mut back, 5).unwrap();
            assert_eq!(back, &data[5..]);
            let mut past = [0u8; 8];
            let e = io.read_exact_at(&f, &mut past, data.len() as u64 - 4);
            assert_eq!(e.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
            files.push(std::fs::read(&path).unwrap());
        }
        assert_eq!(files[0], data);
        assert_eq!(files[1], data);
    }

    #[test]
    fn the_portable_implementation_gives_no_advice_and_no_direct_writes() {
        let dir = TempDir::new("platform");
        let path = dir.0.join("f");
        std::fs::write(&path, vec![3u8; 3 * 4096]).unwrap();
        assert!(Io::Portable.open_direct(&path).is_none());
        let file = File::open(&path).unwrap();
        // SAFETY: a read-only map of a file this test owns.
        let map = unsafe { Mmap::map(&file) }.unwrap();
        for io in [Io::Native, Io::Portable] {
            io.advise_willneed(&map, 5, 4096).unwrap();
            // SAFETY: read-only map, never written through.
            unsafe { io.advise_dontneed(&map, 4096, 4096) }.unwrap();
            assert!(map.iter().all(|&b| b == 3));
        }
    }

    #[test]
    fn file_identity_follows_size_and_replacement() {
        let dir = TempDir::new("platform");
        let a = dir.0.join("a");
        std::fs::write(&a, b"abc").unwrap();
        let first = file_identity(&std::fs::metadata(&a).unwrap());
        assert_eq!(first.len, 3);
        assert_eq!(file_identity(&std::fs::metadata(&a).unwrap()), first);
        let b = dir.0.join("b");
        std::fs::write(&b, b"abcd").unwrap();
        std::fs::rename(&b, &a).unwrap();
        let now = file_identity(&std::fs::metadata(&a).unwrap());
        assert_ne!(now.file, first.file);
        assert_eq!(now.len, 4);
    }

    #[test]
    fn os_errors_keep_their_code() {
        let e = File::open("/no/such/dir/file").unwrap_err();
        let code = os_error_code(&e).unwrap();
        assert_eq!(Some(code.errno), e.raw_os_error());
        assert_eq!(code.winerror.is_some(), cfg!(windows));
        assert!(os_error_code(&io::Error::other("not from the OS")).is_none());
        assert!(is_invalid_argument(&invalid_argument()));
        assert!(!is_invalid_argument(&no_space_error()));
    }

    fn invalid_argument() -> io::Error {
        sys::invalid_argument_error()
    }
}
