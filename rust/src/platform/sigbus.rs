//! Memory-mapped inputs that another process truncates while we read them.
//!
//! Reading a page of a file mapping that lies past the file's current end raises SIGBUS, whose
//! default action kills the process on the spot: no message, temp files left behind. Our reads
//! of the maps happen in places we cannot wrap: the native kernels on the crate's worker
//! threads, torch operators on torch's threads (tensors are views of the maps), and the shard
//! writer copying a mapped tensor. So instead of guarding each read, one process-wide SIGBUS
//! handler makes the fault survivable:
//!
//! - every map is registered here (start, length, a "faulted" flag) for as long as it exists;
//! - on a SIGBUS whose address lies in a registered map, the handler maps anonymous zero pages
//!   over the rest of that map from the faulting page on (`mmap(MAP_FIXED | MAP_ANONYMOUS)`, an
//!   async-signal-safe system call), sets the map's flag and returns; the faulting instruction
//!   runs again, reads zeros, and the computation finishes with garbage;
//! - the owner of the map checks the flag (and the file's size, inode and mtime, which also
//!   catches changes that never fault) before a result computed from it is used, and turns it
//!   into an error naming the file (`SafetensorsFile::check_intact`).
//!
//! Why not the alternatives: copying with `pread` instead of mapping gives up zero-copy reads
//! and doubles the memory traffic of a merge; a size check before each read narrows the window
//! but cannot close it (the truncation can land in the middle of a kernel); a `sigsetjmp` /
//! `siglongjmp` "fault-safe copy" only protects code that we run ourselves and would unwind
//! through Rust and torch frames, which is undefined behaviour.
//!
//! A SIGBUS anywhere else (not one of our maps, or sent with `kill`) goes to the handler that
//! was installed before ours, or gets the default action (the process dies with SIGBUS as it
//! would have without us). Our handler is installed once, when the first map is registered; a
//! SIGBUS handler that another library installs later without chaining to ours takes over.
//!
//! The registry is a fixed array of slots updated with atomics only, so the handler never
//! takes a lock or allocates. A slot is released before its map is unmapped; the map cannot be
//! unmapped while something reads it (readers hold the `Arc` that owns it), so a fault can
//! never be matched against a map that is being torn down.
//!
//! The handler exists on Linux only. Elsewhere maps are registered all the same (and never
//! flagged): on macOS a read past a truncated input's end still ends the process with SIGBUS;
//! Windows refuses to truncate a file while it is mapped, so the fault cannot happen there. On
//! both, `check_intact` still reports an input whose size, identity or mtime changed.

#[cfg(target_os = "linux")]
use std::ffi::{c_int, c_void};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
#[cfg(target_os = "linux")]
use std::sync::OnceLock;

/// How many maps can be registered at once: above the kernel's default limit on the number of
/// mappings a process may hold (vm.max_map_count, 65530), so the registry is never the limit.
const SLOTS: usize = 1 << 16;

const FREE: u8 = 0;
const BUSY: u8 = 1;
const LIVE: u8 = 2;

struct Slot {
    state: AtomicU8,
    start: AtomicUsize,
    len: AtomicUsize,
    faulted: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)] // the array initializer below needs a const
const EMPTY_SLOT: Slot = Slot {
    state: AtomicU8::new(FREE),
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    faulted: AtomicBool::new(false),
};

static REGISTRY: [Slot; SLOTS] = [EMPTY_SLOT; SLOTS];
/// One past the highest slot ever used: the handler scans no further.
static HIGH_WATER: AtomicUsize = AtomicUsize::new(0);
#[cfg(target_os = "linux")]
/// The page size, read outside the handler (`sysconf` is not async-signal-safe).
static PAGE_SIZE: AtomicUsize = AtomicUsize::new(0);
#[cfg(target_os = "linux")]
/// The SIGBUS disposition found when ours was installed, for faults that are not ours.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();
#[cfg(target_os = "linux")]
static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();

/// A registered map. Dropping it unregisters the map; drop it before unmapping.
pub struct Registration {
    slot: usize,
}

impl Registration {
    /// Whether a read of the map faulted (the file shrank under it) since it was registered.
    pub fn faulted(&self) -> bool {
        REGISTRY[self.slot].faulted.load(Ordering::Acquire)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let slot = &REGISTRY[self.slot];
        slot.state.store(BUSY, Ordering::Release);
        slot.len.store(0, Ordering::Relaxed);
        slot.state.store(FREE, Ordering::Release);
    }
}

/// Register the mapping `[start, start + len)` so that a SIGBUS inside it is survived and
/// recorded (see the module doc). Installs the handler on first use.
pub fn register(start: *const u8, len: usize) -> io::Result<Registration> {
    install()?;
    for (i, slot) in REGISTRY.iter().enumerate() {
        if slot
            .state
            .compare_exchange(FREE, BUSY, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            slot.start.store(start as usize, Ordering::Relaxed);
            slot.len.store(len, Ordering::Relaxed);
            slot.faulted.store(false, Ordering::Relaxed);
            HIGH_WATER.fetch_max(i + 1, Ordering::AcqRel);
            slot.state.store(LIVE, Ordering::Release);
            return Ok(Registration { slot: i });
        }
    }
    Err(io::Error::other(format!(
        "more than {SLOTS} files are mapped at once"
    )))
}

#[cfg(not(target_os = "linux"))]
fn install() -> io::Result<()> {
    Ok(()) // no handler: see the module doc
}

#[cfg(target_os = "linux")]
fn install() -> io::Result<()> {
    let result = INSTALLED.get_or_init(|| {
        // SAFETY: plain libc calls on zero-initialised structs we own; the handler only does
        // async-signal-safe things (atomics, mmap, sigaction, raise).
        unsafe {
            let page = libc::sysconf(libc::_SC_PAGESIZE);
            PAGE_SIZE.store(
                if page > 0 { page as usize } else { 4096 },
                Ordering::Relaxed,
            );
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) != 0 {
                return Err(last_errno());
            }
            let _ = PREVIOUS.set(old);
            let mut new: libc::sigaction = std::mem::zeroed();
            new.sa_sigaction = on_sigbus as *const () as libc::sighandler_t;
            new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut new.sa_mask);
            if libc::sigaction(libc::SIGBUS, &new, std::ptr::null_mut()) != 0 {
                return Err(last_errno());
            }
        }
        Ok(())
    });
    result.map_err(io::Error::from_raw_os_error)
}

#[cfg(target_os = "linux")]
fn last_errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EINVAL)
}

#[cfg(target_os = "linux")]
extern "C" fn on_sigbus(sig: c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    // SAFETY: `info` comes from the kernel (SA_SIGINFO); the rest is async-signal-safe.
    unsafe {
        let errno = *libc::__errno_location();
        // si_code > 0: raised by the kernel for a memory access, so si_addr is meaningful
        let handled = !info.is_null() && (*info).si_code > 0 && patch((*info).si_addr() as usize);
        *libc::__errno_location() = errno;
        if !handled {
            forward(sig, info, ctx);
        }
    }
}

#[cfg(target_os = "linux")]
/// If `addr` lies in a registered map, put zero pages over the map from `addr`'s page to its
/// end and flag it. Pages past a truncated file's end all fault, so one call covers the rest.
fn patch(addr: usize) -> bool {
    let page = PAGE_SIZE.load(Ordering::Relaxed);
    let high = HIGH_WATER.load(Ordering::Acquire);
    for slot in &REGISTRY[..high.min(SLOTS)] {
        if slot.state.load(Ordering::Acquire) != LIVE {
            continue;
        }
        let start = slot.start.load(Ordering::Relaxed);
        let len = slot.len.load(Ordering::Relaxed);
        if addr < start || addr - start >= len {
            continue;
        }
        let from = addr & !(page - 1);
        let to = (start + len).div_ceil(page) * page;
        // SAFETY: [from, to) lies inside a live map that we own, whose pages past the file's
        // end can only fault; replacing them with private zero pages changes nothing else.
        let mapped = unsafe {
            libc::mmap(
                from as *mut c_void,
                to - from,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if mapped == libc::MAP_FAILED {
            return false;
        }
        slot.faulted.store(true, Ordering::Release);
        return true;
    }
    false
}

#[cfg(target_os = "linux")]
/// Hand a SIGBUS that is not ours to the previous handler, or apply the default action.
unsafe fn forward(sig: c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    let previous = PREVIOUS.get();
    let handler = previous.map_or(libc::SIG_DFL, |p| p.sa_sigaction);
    // si_code <= 0: sent (kill, raise), not raised by a memory access
    // SAFETY: `info` comes from the kernel.
    let sent = info.is_null() || unsafe { (*info).si_code } <= 0;
    if handler == libc::SIG_IGN && sent {
        return; // ignored before we came, ignored now
    }
    if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
        // SAFETY: sigaction and raise are async-signal-safe.
        unsafe {
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(sig, &dfl, std::ptr::null_mut());
            // A fault re-executes the access and dies of it; a sent signal has to be sent
            // again (it stays pending until this handler returns).
            if sent {
                libc::raise(sig);
            }
        }
        return;
    }
    let siginfo = previous.is_some_and(|p| p.sa_flags & libc::SA_SIGINFO != 0);
    // SAFETY: `handler` is the function the previous owner installed, called the way its
    // flags say it expects.
    unsafe {
        if siginfo {
            let f: extern "C" fn(c_int, *mut libc::siginfo_t, *mut c_void) =
                std::mem::transmute(handler);
            f(sig, info, ctx);
        } else {
            let f: extern "C" fn(c_int) = std::mem::transmute(handler);
            f(sig);
        }
    }
}

#[cfg(all(test, target_os = "linux"))] // the handler is Linux's
mod tests {
    use super::*;
    use memmap2::Mmap;
    use std::io::Write;

    #[test]
    fn truncation_under_a_registered_map_is_survived_and_flagged() {
        let dir = crate::mmap_file::tests::TempDir::new("sigbus");
        let path = dir.0.join("f.bin");
        let page = 4096 * 4; // larger than any page size we run on
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&vec![7u8; 3 * page])
            .unwrap();
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: the test owns the file; it truncates it on purpose.
        let map = unsafe { Mmap::map(&file) }.unwrap();
        let guard = register(map.as_ptr(), map.len()).unwrap();
        assert_eq!(map[2 * page + 5], 7);
        assert!(!guard.faulted());

        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(page as u64)
            .unwrap();
        // Volatile reads: the compiler must not reuse the value read before the truncation.
        let read = |i: usize| unsafe { std::ptr::read_volatile(map.as_ptr().add(i)) };
        assert_eq!(read(10), 7); // still inside the file
        assert_eq!(read(2 * page + 5), 0); // past the new end: faulted, patched with zeros
        assert!(guard.faulted());
        assert_eq!(read(page + 1), 0); // the rest of the map was patched too
        assert_eq!(read(3 * page - 1), 0);
        assert_eq!(read(10), 7);
        drop(guard);
        drop(map); // unmaps the file pages and the patch alike
    }
}
