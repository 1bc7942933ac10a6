//! CPU kernels over contiguous little-endian buffers. Callers allocate every output; kernels
//! only read inputs and fill outputs, so they never own tensor memory.

pub mod consensus;
pub mod gram;
pub mod gta;
pub(crate) mod gta_simd;
pub mod gta_spec;
pub mod health;
pub mod random;
pub mod reduce;
pub mod sparsify;
pub mod task_vector_stats;

pub use health::{scan_tensor, Health, Stats};
pub use reduce::{convert, weighted_sum, weighted_sum_grouped, WeightedInput};

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
