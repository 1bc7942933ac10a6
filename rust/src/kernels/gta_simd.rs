//! The element-wise loops of the GTA combine pass ([`super::gta`]) written with AVX2 and FMA,
//! so that each loop also sums the squares of the values it loads or computes (the health
//! figures, [`super::health`]) while they are in registers: the compiler does not vectorize a
//! float32 sum it is not allowed to reorder, and a separate scan of each block costs several
//! percent of a TIES merge.
//!
//! Each function handles the whole groups of eight elements at the front of its slices and
//! returns how many elements it did, with the sum of squares of those; the caller does the
//! rest with its portable loop. Every stored value is the same float32 operation, in the same
//! order, as the portable loop: the outputs are bit-identical to it. Only the squares' sums
//! (a health figure, summed in another order) differ in their last bits.

use crate::dtype::FloatDtype;

/// How one model's task vector is kept, for the SIMD pass (`gta::Sparsify` without DELLA).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Keep {
    All,
    /// `lo <= key(|d|) < hi`; `outliers`: Breadcrumbs' keys (NaN as +inf, +inf as f32::MAX).
    Band {
        lo: u32,
        hi: u32,
        outliers: bool,
    },
    /// `u < p` (`u` the block's uniforms); `inverse` divides the kept values by `p`.
    Random {
        p: f32,
        inverse: bool,
    },
}

/// Whether this CPU runs the loops here (x86-64 with AVX2, FMA and F16C).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // only the x86-64 paths ask
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `dst = f32(src)` for the front of `dst`; returns (elements done, their sum of squares).
/// Does nothing unless [`available`].
pub(crate) fn load_squares(dtype: FloatDtype, src: &[u8], dst: &mut [f32]) -> (usize, f64) {
    #[cfg(target_arch = "x86_64")]
    if available() {
        let n = (src.len() / dtype.size()).min(dst.len());
        // SAFETY: the CPU has AVX2, FMA and F16C (checked just above); n elements are in
        // both slices.
        return unsafe {
            match dtype {
                FloatDtype::F32 => x86::load_squares::<0>(src, dst, n),
                FloatDtype::BF16 => x86::load_squares::<1>(src, dst, n),
                FloatDtype::F16 => x86::load_squares::<2>(src, dst, n),
            }
        };
    }
    let _ = (dtype, src, dst);
    (0, 0.0)
}

/// One model's pass over the front of a block: `x = keep(f32(bytes) - b, u) * w`, `v = x`,
/// `s = x` (first model) or `s += x`; returns (elements done, sum of squares of `f32(bytes)`).
/// Does nothing unless [`available`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn model_pass(
    dtype: FloatDtype,
    bytes: &[u8],
    bv: &[f32],
    u: &[f32],
    keep: Keep,
    w: f32,
    v: &mut [f32],
    s: &mut [f32],
    first: bool,
) -> (usize, f64) {
    #[cfg(target_arch = "x86_64")]
    if available() {
        let n = (bytes.len() / dtype.size())
            .min(bv.len())
            .min(u.len())
            .min(v.len())
            .min(s.len());
        macro_rules! go {
            ($d:literal) => {
                if first {
                    x86::model_pass::<$d, true>(bytes, bv, u, keep, w, v, s, n)
                } else {
                    x86::model_pass::<$d, false>(bytes, bv, u, keep, w, v, s, n)
                }
            };
        }
        // SAFETY: the CPU has AVX2, FMA and F16C (checked just above); n elements are in
        // every slice.
        return unsafe {
            match dtype {
                FloatDtype::F32 => go!(0),
                FloatDtype::BF16 => go!(1),
                FloatDtype::F16 => go!(2),
            }
        };
    }
    let _ = (dtype, bytes, bv, u, keep, w, v, s, first);
    (0, 0.0)
}

/// `m = b + lambda * m` for the front of `m`; returns (elements done, sum of squares of the new
/// `m`). Does nothing unless [`available`].
pub(crate) fn rebase_squares(m: &mut [f32], bv: &[f32], lambda: f32) -> (usize, f64) {
    #[cfg(target_arch = "x86_64")]
    if available() {
        let n = m.len().min(bv.len());
        // SAFETY: the CPU has AVX2, FMA and F16C (checked just above); n elements are in both.
        return unsafe { x86::rebase_squares(m, bv, lambda, n) };
    }
    let _ = (m, bv, lambda);
    (0, 0.0)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Keep;
    use crate::kernels::health::x86::{hsum, load8};
    use crate::kernels::sparsify::{INF_KEY, NAN_KEY};
    use std::arch::x86_64::*;

    /// Keys are below 2^31 (`NAN_KEY` is the largest), so signed compares order them; a bound
    /// at or above 2^31 acts as 2^31 - 1 ("above every key").
    #[inline]
    fn signed_bound(b: u32) -> i32 {
        b.min(i32::MAX as u32) as i32
    }

    /// SAFETY: AVX2, FMA and F16C; `n` elements of dtype `D` in `src`, `n` in `dst`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn load_squares<const D: u8>(src: &[u8], dst: &mut [f32], n: usize) -> (usize, f64) {
        let sz = if D == 0 { 4 } else { 2 };
        let (p, q) = (src.as_ptr(), dst.as_mut_ptr());
        let mut acc = [_mm256_setzero_ps(); 2];
        let mut i = 0;
        while i + 16 <= n {
            for (j, a) in acc.iter_mut().enumerate() {
                // SAFETY: i + 16 <= n: the eight elements are in both slices.
                unsafe {
                    let x = load8::<D>(p.add((i + 8 * j) * sz));
                    _mm256_storeu_ps(q.add(i + 8 * j), x);
                    *a = _mm256_fmadd_ps(x, x, *a);
                }
            }
            i += 16;
        }
        (i, hsum(&acc) as f64)
    }

    /// SAFETY: AVX2, FMA and F16C; `n` elements of dtype `D` in `bytes`, `n` in each slice.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn model_pass<const D: u8, const FIRST: bool>(
        bytes: &[u8],
        bv: &[f32],
        u: &[f32],
        keep: Keep,
        w: f32,
        v: &mut [f32],
        s: &mut [f32],
        n: usize,
    ) -> (usize, f64) {
        // one loop per kind of keep, each with its constants in registers
        // SAFETY: forwarded.
        unsafe {
            match keep {
                Keep::All => pass::<D, FIRST>(bytes, bv, u, w, v, s, n, |d, _| d),
                Keep::Band { lo, hi, outliers } => {
                    let lo = _mm256_set1_epi32(signed_bound(lo));
                    let hi = _mm256_set1_epi32(signed_bound(hi));
                    let abs = _mm256_set1_epi32(0x7fff_ffff);
                    let nan = _mm256_set1_epi32(NAN_KEY as i32);
                    let below_inf = _mm256_set1_epi32(INF_KEY as i32 - 1);
                    pass::<D, FIRST>(bytes, bv, u, w, v, s, n, move |d, _| {
                        let bits = _mm256_castps_si256(d);
                        let mut key = _mm256_min_epu32(_mm256_and_si256(bits, abs), nan);
                        if outliers {
                            // inf -> f32::MAX's key, NaN -> inf's: minus one at or above inf
                            key = _mm256_add_epi32(key, _mm256_cmpgt_epi32(key, below_inf));
                        }
                        // lo <= key < hi
                        let kept = _mm256_andnot_si256(
                            _mm256_cmpgt_epi32(lo, key),
                            _mm256_cmpgt_epi32(hi, key),
                        );
                        _mm256_and_ps(d, _mm256_castsi256_ps(kept))
                    })
                }
                Keep::Random { p, inverse } => {
                    let p = _mm256_set1_ps(p);
                    if inverse {
                        pass::<D, FIRST>(bytes, bv, u, w, v, s, n, move |d, r| {
                            let kept = _mm256_cmp_ps::<_CMP_LT_OQ>(r, p);
                            _mm256_and_ps(_mm256_div_ps(d, p), kept)
                        })
                    } else {
                        pass::<D, FIRST>(bytes, bv, u, w, v, s, n, move |d, r| {
                            _mm256_and_ps(d, _mm256_cmp_ps::<_CMP_LT_OQ>(r, p))
                        })
                    }
                }
            }
        }
    }

    /// SAFETY: as [`model_pass`].
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn pass<const D: u8, const FIRST: bool>(
        bytes: &[u8],
        bv: &[f32],
        u: &[f32],
        w: f32,
        v: &mut [f32],
        s: &mut [f32],
        n: usize,
        keep: impl Fn(__m256, __m256) -> __m256,
    ) -> (usize, f64) {
        let sz = if D == 0 { 4 } else { 2 };
        let (p, b, r) = (bytes.as_ptr(), bv.as_ptr(), u.as_ptr());
        let (vp, sp) = (v.as_mut_ptr(), s.as_mut_ptr());
        let w = _mm256_set1_ps(w);
        let mut acc = [_mm256_setzero_ps(); 2];
        let mut i = 0;
        while i + 16 <= n {
            for (j, a) in acc.iter_mut().enumerate() {
                let e = i + 8 * j;
                // SAFETY: e + 8 <= n: the eight elements are in every slice.
                unsafe {
                    let x = load8::<D>(p.add(e * sz));
                    *a = _mm256_fmadd_ps(x, x, *a);
                    let d = _mm256_sub_ps(x, _mm256_loadu_ps(b.add(e)));
                    let y = _mm256_mul_ps(keep(d, _mm256_loadu_ps(r.add(e))), w);
                    _mm256_storeu_ps(vp.add(e), y);
                    let t = if FIRST {
                        y
                    } else {
                        _mm256_add_ps(_mm256_loadu_ps(sp.add(e)), y)
                    };
                    _mm256_storeu_ps(sp.add(e), t);
                }
            }
            i += 16;
        }
        (i, hsum(&acc) as f64)
    }

    /// SAFETY: AVX2, FMA and F16C; `n` elements in `m` and `bv`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn rebase_squares(m: &mut [f32], bv: &[f32], lambda: f32, n: usize) -> (usize, f64) {
        let (q, b) = (m.as_mut_ptr(), bv.as_ptr());
        let l = _mm256_set1_ps(lambda);
        let mut acc = [_mm256_setzero_ps(); 2];
        let mut i = 0;
        while i + 16 <= n {
            for (j, a) in acc.iter_mut().enumerate() {
                let e = i + 8 * j;
                // SAFETY: e + 8 <= n: the eight elements are in both slices.
                unsafe {
                    // b + lambda * m, rounded twice as the portable loop does (no FMA)
                    let y = _mm256_add_ps(
                        _mm256_loadu_ps(b.add(e)),
                        _mm256_mul_ps(l, _mm256_loadu_ps(q.add(e))),
                    );
                    _mm256_storeu_ps(q.add(e), y);
                    *a = _mm256_fmadd_ps(y, y, *a);
                }
            }
            i += 16;
        }
        (i, hsum(&acc) as f64)
    }
}
