//! CPU kernels over contiguous little-endian buffers. Callers allocate every output; kernels
//! only read inputs and fill outputs, so they never own tensor memory.

pub mod arcee_fusion;
pub mod consensus;
mod exp_ln;
pub mod gram;
pub mod gta;
pub(crate) mod gta_simd;
pub mod gta_spec;
pub mod health;
pub mod nearswap;
pub mod random;
pub mod reduce;
pub mod sce;
pub mod sparsify;
pub mod task_vector_stats;

pub use health::{scan_tensor, Health, Stats};
pub use reduce::{convert, weighted_sum, weighted_sum_grouped, WeightedInput};

use crate::dtype::FloatDtype;
use crate::error::{Error, Result};
use gta::Tensor;

/// The element count of `out` (`out_dtype`), which every input must have too; an error
/// naming the first input (by `names`, e.g. "base") whose byte length disagrees.
pub(crate) fn common_length(
    inputs: &[Tensor],
    names: impl Fn(usize) -> String,
    out: &[u8],
    out_dtype: FloatDtype,
) -> Result<usize> {
    if !out.len().is_multiple_of(out_dtype.size()) {
        return Err(Error::RaggedOutput {
            len: out.len(),
            dtype: out_dtype.code(),
        });
    }
    let n = out.len() / out_dtype.size();
    for (i, t) in inputs.iter().enumerate() {
        let expected = n * t.dtype.size();
        if t.data.len() != expected {
            return Err(Error::BufferLength {
                what: format!("{} ({})", names(i), t.dtype.code()),
                expected,
                actual: t.data.len(),
            });
        }
    }
    Ok(n)
}

/// A float32 scratch tensor of `n` zeros in its own anonymous mapping, with transparent huge
/// pages asked for (Linux): the threads that first write it take 2 MiB page faults rather than
/// 4 KiB ones, half a million of which a 1 GB tensor's scratch would otherwise cost. An error,
/// not an abort, when the memory is not there.
pub(crate) struct ScratchF32 {
    map: memmap2::MmapMut,
    len: usize,
}

impl ScratchF32 {
    pub(crate) fn new(n: usize) -> Result<ScratchF32> {
        let fail = |detail: String| {
            Error::InvalidArgument(format!(
                "cannot allocate {} MiB of float32 scratch for {n} elements: {detail}",
                (n as u64 * 4) >> 20
            ))
        };
        let bytes = n.checked_mul(4).ok_or_else(|| fail("too large".into()))?;
        let map = memmap2::MmapMut::map_anon(bytes.max(1)).map_err(|e| fail(e.to_string()))?;
        #[cfg(target_os = "linux")]
        {
            // only a hint: without huge pages the mapping works as well
            let _ = map.advise(memmap2::Advice::HugePage);
        }
        Ok(ScratchF32 { map, len: n })
    }
}

impl std::ops::Deref for ScratchF32 {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        // SAFETY: the mapping is page-aligned, holds at least `len` f32s, and every bit
        // pattern is a valid f32; the slice borrows `self`.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().cast::<f32>(), self.len) }
    }
}

impl std::ops::DerefMut for ScratchF32 {
    fn deref_mut(&mut self) -> &mut [f32] {
        // SAFETY: as in `deref`, borrowed mutably through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.map.as_mut_ptr().cast::<f32>(), self.len) }
    }
}

/// Run `f` compiled with AVX2 enabled when the CPU has it (u32 multiplies for the generator,
/// wider compares and selects), otherwise as is.
///
/// The closure is only compiled with AVX2 when it is inlined into the `target_feature`
/// function, so pass it as `with_avx2(#[inline(always)] || ...)`: without the attribute a large
/// closure stays a separate function built for the baseline target (SSE2).
#[inline(always)]
pub(crate) fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        unsafe fn go<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { go(f) };
        }
    }
    f()
}

/// Run `f` compiled for the widest vectors this CPU has with FMA: AVX-512 (F, DQ, VL), else
/// AVX2 and FMA, else as is; for float64 math that calls `mul_add` (a library call without
/// hardware FMA). Every element gets the same IEEE operations on each path, so the results do
/// not depend on which one runs. Pass the closure as `with_simd_fma(#[inline(always)] || ..)`.
#[inline(always)]
pub(crate) fn with_simd_fma<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        #[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2,fma")]
        unsafe fn wide<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn narrow<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if has!("avx512f") && has!("avx512dq") && has!("avx512vl") && has!("fma") {
            // SAFETY: the CPU has these features (checked just above).
            return unsafe { wide(f) };
        }
        if has!("avx2") && has!("fma") {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            return unsafe { narrow(f) };
        }
    }
    f()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::FloatDtype;

    #[test]
    fn reexports_work() {
        let x = 1.5f32.to_le_bytes();
        let mut out = [0u8; 2];
        convert(&x, FloatDtype::F32, &mut out, FloatDtype::BF16, 1).unwrap();
        assert_eq!(u16::from_le_bytes(out), 0x3fc0);
        let inputs = [WeightedInput {
            data: &x,
            dtype: FloatDtype::F32,
            weight: 2.0,
        }];
        weighted_sum(&inputs, &mut out, FloatDtype::BF16, 1).unwrap();
        assert_eq!(u16::from_le_bytes(out), 0x4040);
    }
}
