//! Linux and macOS. `O_DIRECT` and `sync_file_range` are Linux's; macOS has neither.

use std::fs::{File, Metadata};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

use memmap2::{Advice, Mmap, UncheckedAdvice};

use super::{FileIdentity, OsErrorCode};

pub(super) fn write_all_at(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    file.write_all_at(buf, offset)
}

pub(super) fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    file.read_exact_at(buf, offset)
}

/// One `pwrite`.
pub(super) fn write_at(file: &File, buf: &[u8], offset: u64) -> io::Result<usize> {
    file.write_at(buf, offset)
}

/// One `pread`.
pub(super) fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    file.read_at(buf, offset)
}

#[cfg(target_os = "linux")]
pub(super) fn start_writeback(file: &File, offset: u64, len: u64) {
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
pub(super) fn start_writeback(_file: &File, _offset: u64, _len: u64) {}

pub(super) fn advise_willneed(map: &Mmap, start: usize, len: usize) -> io::Result<()> {
    // memmap2 rounds the start down to a page; the kernel rounds the length up.
    map.advise_range(Advice::WillNeed, start, len)
}

/// # Safety
///
/// As [`super::Io::advise_dontneed`].
pub(super) unsafe fn advise_dontneed(map: &Mmap, start: usize, len: usize) -> io::Result<()> {
    // SAFETY: the caller guarantees a read-only mapping never written through, so
    // MADV_DONTNEED only discards clean pages; any later access (including through a live view
    // of a neighbouring range sharing an edge page) re-faults identical bytes from the file.
    // Rounding the range outward to whole pages is therefore harmless.
    unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, start, len) }
}

#[cfg(target_os = "linux")]
pub(super) fn open_direct(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

#[cfg(not(target_os = "linux"))]
pub(super) fn open_direct(_path: &Path) -> Option<File> {
    None
}

pub(super) fn free_bytes(file: &File) -> Option<u64> {
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: fstatvfs fills the struct on success; it is read only then.
    let rc = unsafe { libc::fstatvfs(file.as_raw_fd(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: rc == 0, so the kernel initialised it.
    let st = unsafe { st.assume_init() };
    #[allow(clippy::unnecessary_cast)] // the field types differ between targets
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

pub(super) fn no_space_error() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOSPC)
}

pub(super) fn is_invalid_argument(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINVAL)
}

#[cfg(test)]
pub(super) fn invalid_argument_error() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir).and_then(|d| d.sync_all())
}

pub(super) fn file_identity(meta: &Metadata) -> FileIdentity {
    FileIdentity {
        file: (meta.dev(), meta.ino()),
        len: meta.len(),
        mtime: (meta.mtime(), meta.mtime_nsec()),
    }
}

pub(super) fn os_error_code(e: &io::Error) -> Option<OsErrorCode> {
    e.raw_os_error().map(|errno| OsErrorCode {
        errno,
        winerror: None,
    })
}
