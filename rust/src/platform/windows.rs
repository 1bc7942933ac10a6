//! Windows: positioned IO through `seek_write`/`seek_read` (which move the handle's cursor, which
//! nothing here uses; concurrent calls on one handle are serialised by the OS and each lands at
//! its own offset). No advice, no page-cache bypass, no early writeback, no directory fsync.

use std::fs::{File, Metadata};
use std::io;
use std::os::windows::fs::{FileExt, MetadataExt};
use std::path::Path;

use memmap2::Mmap;

use super::{read_exact_with, write_all_with, FileIdentity, OsErrorCode};

/// ERROR_DISK_FULL
const DISK_FULL: i32 = 112;
/// ERROR_INVALID_PARAMETER
const INVALID_PARAMETER: i32 = 87;

/// `seek_write` may write less than asked (at most 4 GiB per call): looped.
pub(super) fn write_all_at(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    write_all_with(buf, offset, |b, o| file.seek_write(b, o))
}

pub(super) fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    read_exact_with(buf, offset, |b, o| file.seek_read(b, o))
}

pub(super) fn write_at(file: &File, buf: &[u8], offset: u64) -> io::Result<usize> {
    file.seek_write(buf, offset)
}

pub(super) fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    file.seek_read(buf, offset)
}

pub(super) fn start_writeback(_file: &File, _offset: u64, _len: u64) {}

pub(super) fn advise_willneed(_map: &Mmap, _start: usize, _len: usize) -> io::Result<()> {
    Ok(())
}

/// # Safety
///
/// Nothing to uphold here: it does nothing.
pub(super) unsafe fn advise_dontneed(_map: &Mmap, _start: usize, _len: usize) -> io::Result<()> {
    Ok(())
}

pub(super) fn open_direct(_path: &Path) -> Option<File> {
    None
}

pub(super) fn free_bytes(_file: &File) -> Option<u64> {
    None
}

pub(super) fn no_space_error() -> io::Error {
    io::Error::from_raw_os_error(DISK_FULL)
}

pub(super) fn is_invalid_argument(e: &io::Error) -> bool {
    e.raw_os_error() == Some(INVALID_PARAMETER)
}

#[cfg(test)]
pub(super) fn invalid_argument_error() -> io::Error {
    io::Error::from_raw_os_error(INVALID_PARAMETER)
}

/// A directory cannot be opened as a file (nor fsynced) through std on Windows.
pub(super) fn sync_dir(_dir: &Path) -> io::Result<()> {
    Ok(())
}

pub(super) fn file_identity(meta: &Metadata) -> FileIdentity {
    FileIdentity {
        file: (0, meta.creation_time()),
        len: meta.len(),
        mtime: (meta.last_write_time() as i64, 0),
    }
}

pub(super) fn os_error_code(e: &io::Error) -> Option<OsErrorCode> {
    e.raw_os_error().map(|code| OsErrorCode {
        errno: code,
        winerror: Some(code),
    })
}
