//! CPU kernels over contiguous little-endian buffers. Callers allocate every output; kernels
//! only read inputs and fill outputs, so they never own tensor memory.

pub mod arcee_fusion;
pub mod consensus;
mod exp_ln;
pub mod gta;
pub(crate) mod gta_simd;
pub mod gta_spec;
pub mod health;
pub mod nearswap;
pub mod random;
pub mod reduce;
pub mod sce;
pub mod sparsify;

pub use health::{scan_tensor, Health, Stats};
pub use reduce::{convert, weighted_sum, WeightedInput};

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

/// A float32 scratch tensor of `n` elements (zeros); an error rather than an abort when the
/// memory is not there.
pub(crate) fn scratch_f32(n: usize) -> Result<Vec<f32>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| {
        Error::InvalidArgument(format!(
            "cannot allocate {} MiB of float32 scratch for {n} elements",
            (n as u64 * 4) >> 20
        ))
    })?;
    v.resize(n, 0.0);
    Ok(v)
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
