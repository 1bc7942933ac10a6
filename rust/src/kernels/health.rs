//! Finiteness and size of tensors, gathered on the passes the kernels already make.
//!
//! For each input and the output of a kernel call: how many elements are NaN or +-Inf, and the
//! sum of squares of the finite ones (the squared L2 norm, non-finite elements left out). The
//! figures cost a little arithmetic and no memory traffic: the fused weighted sum and the GTA
//! combine pass sum the squares of the values they load and compute while those are in
//! registers, and other kernels [`scan`] each block right after processing it, while it is in
//! L1. Outputs are counted as written, after rounding to their dtype: an f32 result that
//! overflows BF16 or F16 counts as non-finite.
//!
//! The common case costs one multiply-add per element: squares are summed in float32 (eight
//! lanes of a few AVX registers on x86-64 with AVX2 and FMA; sixteen lanes otherwise) over a
//! block of at most a few thousand elements, so the relative error stays below 1e-5, and the
//! block sums in float64. A NaN or Inf element makes its block's sum non-finite; only such a
//! block (or one whose float32 sum overflowed: finite elements above ~1.8e19) is scanned again
//! element by element, counting the non-finite elements and summing the others' squares in
//! float64.

use crate::dtype::{bf16_to_f32, f16_to_f32, FloatDtype};
use crate::error::{Error, Result};
use crate::threads;

/// Elements per block of [`scan_tensor`].
const BLOCK: usize = 4096;

/// The figures of one tensor.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Stats {
    /// Elements that are NaN or +-Inf.
    pub nonfinite: u64,
    /// Sum of the squares of the finite elements.
    pub sumsq: f64,
}

impl Stats {
    pub fn add(&mut self, other: Stats) {
        self.nonfinite += other.nonfinite;
        self.sumsq += other.sumsq;
    }
}

/// The figures of one kernel call: each input's, in the order the call takes its inputs, and the
/// output's.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Health {
    pub inputs: Vec<Stats>,
    pub output: Stats,
}

impl Health {
    pub fn new(inputs: usize) -> Health {
        Health {
            inputs: vec![Stats::default(); inputs],
            output: Stats::default(),
        }
    }

    /// Add another part of the same call (another thread's range).
    pub fn add(&mut self, other: &Health) {
        for (a, b) in self.inputs.iter_mut().zip(&other.inputs) {
            a.add(*b);
        }
        self.output.add(other.output);
    }

    /// The parts of a call split across threads, added in order.
    pub fn sum(inputs: usize, parts: &[Health]) -> Health {
        let mut h = Health::new(inputs);
        for p in parts {
            h.add(p);
        }
        h
    }
}

/// Split `out` (elements of `osz` bytes) along `ranges`, run `f(first element, its bytes, its
/// figures)` for each range on its own thread, and sum the figures (of `inputs` inputs). Each
/// thread fills a `Health` of its own stack: the parts would share cache lines.
pub(crate) fn per_range(
    out: &mut [u8],
    osz: usize,
    ranges: &[std::ops::Range<usize>],
    inputs: usize,
    f: impl Fn(usize, &mut [u8], &mut Health) + Sync,
) -> Health {
    let mut parts: Vec<Health> = ranges.iter().map(|_| Health::new(inputs)).collect();
    let mut tasks = Vec::with_capacity(ranges.len());
    let mut rest = out;
    for (r, h) in ranges.iter().zip(parts.iter_mut()) {
        let (head, tail) = rest.split_at_mut(r.len() * osz);
        tasks.push((r.start, head, h));
        rest = tail;
    }
    crate::threads::run_all(tasks, |(start, out, h)| {
        let mut local = Health::new(inputs);
        f(start, out, &mut local);
        *h = local;
    });
    Health::sum(inputs, &parts)
}

/// The figures of a block of little-endian elements of `dtype` (a few thousand: the float32
/// lanes' error grows with the block).
#[inline]
pub fn scan(dtype: FloatDtype, src: &[u8]) -> Stats {
    block_stats(squares(dtype, src), dtype, src)
}

/// The figures of a block from the sum of its elements' squares, taken on another pass: that
/// sum when it is finite, else a rescan of the block.
#[inline]
pub(crate) fn block_stats(sumsq: f64, dtype: FloatDtype, src: &[u8]) -> Stats {
    if sumsq.is_finite() {
        Stats {
            nonfinite: 0,
            sumsq,
        }
    } else {
        exact(dtype, src)
    }
}

/// The sum of the squares of float32 values (non-finite when one is).
#[inline]
pub(crate) fn squares_f32(vals: &[f32]) -> f64 {
    // SAFETY: the bytes of `vals`, borrowed as long as `vals`.
    let bytes = unsafe { std::slice::from_raw_parts(vals.as_ptr().cast::<u8>(), vals.len() * 4) };
    squares(FloatDtype::F32, bytes)
}

/// Whether the squares of a block's unrounded float32 results can stand for those of the
/// written `dtype` values: they differ by the rounding (2^-8 relative at most), and a result that
/// rounds to Inf in BF16 (or is Inf or NaN) squares to Inf in float32 and gets the block
/// rescanned; one that rounds past the largest F16 (65504) does not.
pub(crate) fn out_squares_stand_in(dtype: FloatDtype) -> bool {
    dtype != FloatDtype::F16
}

/// The sum of the squares of every element (non-finite when one is).
#[inline]
pub(crate) fn squares(dtype: FloatDtype, src: &[u8]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            // SAFETY: the CPU has AVX2, FMA and F16C (checked just above).
            return unsafe { x86::squares(dtype, src) };
        }
    }
    match dtype {
        FloatDtype::BF16 => lanes::<2>(src, |b| bf16_to_f32(u16::from_le_bytes(b))),
        FloatDtype::F16 => lanes::<2>(src, |b| f16_to_f32(u16::from_le_bytes(b))),
        FloatDtype::F32 => lanes::<4>(src, f32::from_le_bytes),
    }
}

/// Portable [`squares`]: sixteen float32 lanes.
#[inline(always)]
fn lanes<const SZ: usize>(src: &[u8], ld: impl Fn([u8; SZ]) -> f32) -> f64 {
    const LANES: usize = 16;
    let mut sq = [0f32; LANES];
    let (elems, _) = src.as_chunks::<SZ>();
    let (groups, rest) = elems.as_chunks::<LANES>();
    for g in groups {
        for l in 0..LANES {
            let v = ld(g[l]);
            sq[l] += v * v;
        }
    }
    for (l, &e) in rest.iter().enumerate() {
        let v = ld(e);
        sq[l] += v * v;
    }
    sq.iter().map(|&s| s as f64).sum()
}

/// The AVX2 building blocks, shared with the fused weighted sum.
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use crate::dtype::{bf16_to_f32, f16_to_f32, FloatDtype};
    use std::arch::x86_64::*;

    /// Eight elements of dtype `D` (0: F32, 1: BF16, 2: F16) at `p`, as float32.
    ///
    /// SAFETY: the 32 (F32) or 16 bytes at `p` must be readable (any alignment).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn load8<const D: u8>(p: *const u8) -> __m256 {
        // SAFETY: as the caller promised.
        unsafe {
            match D {
                0 => _mm256_loadu_ps(p.cast::<f32>()),
                1 => {
                    let h = _mm_loadu_si128(p.cast::<__m128i>());
                    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
                }
                _ => _mm256_cvtph_ps(_mm_loadu_si128(p.cast::<__m128i>())),
            }
        }
    }

    /// Element `j` of dtype `D` in `src`.
    #[inline(always)]
    pub fn load1<const D: u8>(src: &[u8], j: usize) -> f32 {
        match D {
            0 => f32::from_le_bytes([src[4 * j], src[4 * j + 1], src[4 * j + 2], src[4 * j + 3]]),
            1 => bf16_to_f32(u16::from_le_bytes([src[2 * j], src[2 * j + 1]])),
            _ => f16_to_f32(u16::from_le_bytes([src[2 * j], src[2 * j + 1]])),
        }
    }

    /// The sum of the lanes of `acc` (in float32: each lane holds a partial sum of a block).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub fn hsum(acc: &[__m256]) -> f32 {
        let mut v = acc[0];
        for &a in &acc[1..] {
            v = _mm256_add_ps(v, a);
        }
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// [`super::squares`] with four independent 8-lane FMA accumulators.
    ///
    /// SAFETY: the CPU must have AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn squares(dtype: FloatDtype, src: &[u8]) -> f64 {
        // SAFETY: forwarded.
        unsafe {
            match dtype {
                FloatDtype::F32 => squares_of::<0>(src),
                FloatDtype::BF16 => squares_of::<1>(src),
                FloatDtype::F16 => squares_of::<2>(src),
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn squares_of<const D: u8>(src: &[u8]) -> f64 {
        let sz = if D == 0 { 4 } else { 2 };
        let n = src.len() / sz;
        let p = src.as_ptr();
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        if D == 1 {
            // BF16, sixteen at a time: in each 32-bit lane the high half is an odd element
            // already in f32 position (mask the low half off), the low half an even one (shift).
            let high = _mm256_set1_epi32(0xffff_0000u32 as i32);
            while i + 32 <= n {
                for (j, pair) in acc.chunks_exact_mut(2).enumerate() {
                    // SAFETY: i + 32 <= n: the sixteen elements are in bounds.
                    let raw =
                        unsafe { _mm256_loadu_si256(p.add((i + 16 * j) * 2).cast::<__m256i>()) };
                    let even = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(raw));
                    let odd = _mm256_castsi256_ps(_mm256_and_si256(raw, high));
                    pair[0] = _mm256_fmadd_ps(even, even, pair[0]);
                    pair[1] = _mm256_fmadd_ps(odd, odd, pair[1]);
                }
                i += 32;
            }
        }
        while i + 32 <= n {
            for (j, a) in acc.iter_mut().enumerate() {
                // SAFETY: i + 32 <= n: the eight elements are in bounds.
                let v = unsafe { load8::<D>(p.add((i + 8 * j) * sz)) };
                *a = _mm256_fmadd_ps(v, v, *a);
            }
            i += 32;
        }
        let mut total = hsum(&acc);
        for j in i..n {
            let v = load1::<D>(src, j);
            total += v * v;
        }
        total as f64
    }
}

/// Element by element: count the non-finite, sum the others' squares in float64.
#[cold]
#[inline(never)]
fn exact(dtype: FloatDtype, src: &[u8]) -> Stats {
    let mut s = Stats::default();
    for c in src.chunks_exact(dtype.size()) {
        let v = match dtype {
            FloatDtype::BF16 => bf16_to_f32(u16::from_le_bytes([c[0], c[1]])),
            FloatDtype::F16 => f16_to_f32(u16::from_le_bytes([c[0], c[1]])),
            FloatDtype::F32 => f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
        };
        if v.is_finite() {
            s.sumsq += v as f64 * v as f64;
        } else {
            s.nonfinite += 1;
        }
    }
    s
}

/// The figures of a whole tensor (a copied tensor: one pass over it, on `threads` threads; 0 =
/// all cores).
pub fn scan_tensor(data: &[u8], dtype: FloatDtype, threads: usize) -> Result<Stats> {
    let sz = dtype.size();
    if !data.len().is_multiple_of(sz) {
        return Err(Error::RaggedOutput {
            len: data.len(),
            dtype: dtype.code(),
        });
    }
    let n = data.len() / sz;
    let ranges = threads::chunk_ranges(n, threads::resolve(threads), BLOCK);
    let mut parts = vec![Stats::default(); ranges.len()];
    let tasks: Vec<_> = ranges.into_iter().zip(parts.iter_mut()).collect();
    threads::run_all(tasks, |(r, total)| {
        let mut b = r.start;
        while b < r.end {
            let len = BLOCK.min(r.end - b);
            total.add(scan(dtype, &data[b * sz..(b + len) * sz]));
            b += len;
        }
    });
    let mut total = Stats::default();
    for p in parts {
        total.add(p);
    }
    Ok(total)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn encode(vals: &[f32], d: FloatDtype) -> Vec<u8> {
        vals.iter()
            .flat_map(|&v| match d {
                FloatDtype::F32 => v.to_le_bytes().to_vec(),
                FloatDtype::F16 => half::f16::from_f32(v).to_le_bytes().to_vec(),
                FloatDtype::BF16 => half::bf16::from_f32(v).to_le_bytes().to_vec(),
            })
            .collect()
    }

    /// The values of little-endian `bytes` of dtype `d`, as float32.
    pub(crate) fn decode(bytes: &[u8], d: FloatDtype) -> Vec<f32> {
        bytes
            .chunks_exact(d.size())
            .map(|c| match d {
                FloatDtype::F32 => f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                FloatDtype::F16 => half::f16::from_le_bytes([c[0], c[1]]).to_f32(),
                FloatDtype::BF16 => half::bf16::from_le_bytes([c[0], c[1]]).to_f32(),
            })
            .collect()
    }

    /// The definition, in float64, of the values as `d` holds them.
    pub(crate) fn reference(bytes: &[u8], d: FloatDtype) -> Stats {
        let mut s = Stats::default();
        for c in bytes.chunks_exact(d.size()) {
            let v = match d {
                FloatDtype::F32 => f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                FloatDtype::F16 => half::f16::from_le_bytes([c[0], c[1]]).to_f32(),
                FloatDtype::BF16 => half::bf16::from_le_bytes([c[0], c[1]]).to_f32(),
            };
            if v.is_finite() {
                s.sumsq += v as f64 * v as f64;
            } else {
                s.nonfinite += 1;
            }
        }
        s
    }

    /// Whether two float vectors hold the same bits, any NaN matching any NaN.
    pub(crate) fn same_bits(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(p, q)| p.to_bits() == q.to_bits() || (p.is_nan() && q.is_nan()))
    }

    pub(crate) fn close(a: Stats, b: Stats) -> bool {
        a.nonfinite == b.nonfinite && (a.sumsq - b.sumsq).abs() <= 1e-5 * b.sumsq.abs() + 1e-30
    }

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::test_rng::Lcg(seed);
        (0..n)
            .map(|i| {
                let v = rng.unit();
                match i % 997 {
                    3 => f32::NAN,
                    5 => f32::INFINITY,
                    7 => f32::NEG_INFINITY,
                    _ => v,
                }
            })
            .collect()
    }

    #[test]
    fn counts_and_squares_match_the_definition() {
        for n in [0usize, 1, 15, 17, 4095, 4097, 300_001] {
            let vals = values(n, n as u64);
            for d in [FloatDtype::F32, FloatDtype::F16, FloatDtype::BF16] {
                let bytes = encode(&vals, d);
                let want = reference(&bytes, d);
                assert_eq!(
                    want.nonfinite,
                    (0..n).filter(|i| [3, 5, 7].contains(&(i % 997))).count() as u64
                );
                for threads in [1, 3] {
                    let got = scan_tensor(&bytes, d, threads).unwrap();
                    assert!(
                        close(got, want),
                        "n={n} {d:?} threads={threads}: {got:?} {want:?}"
                    );
                }
                // without the NaN/Inf: the vector path's sums, not the rescans
                let clean: Vec<f32> = vals
                    .iter()
                    .map(|&v| if v.is_finite() { v } else { 0.25 })
                    .collect();
                let clean = encode(&clean, d);
                let got = scan_tensor(&clean, d, 2).unwrap();
                assert!(close(got, reference(&clean, d)), "clean n={n} {d:?}");
                let blocks: Stats =
                    bytes
                        .chunks(2048 * d.size())
                        .fold(Stats::default(), |mut s, c| {
                            s.add(scan(d, c));
                            s
                        });
                assert!(close(blocks, want), "{d:?}");
            }
            for d in [FloatDtype::F32, FloatDtype::F16, FloatDtype::BF16] {
                // the portable lanes agree with the vector path
                let head = encode(&vals[..n.min(4096)], d);
                let clean: Vec<u8> = encode(
                    &vals[..n.min(4096)]
                        .iter()
                        .map(|v| if v.is_finite() { *v } else { 0.5 })
                        .collect::<Vec<_>>(),
                    d,
                );
                let portable = match d {
                    FloatDtype::BF16 => lanes::<2>(&clean, |b| bf16_to_f32(u16::from_le_bytes(b))),
                    FloatDtype::F16 => lanes::<2>(&clean, |b| f16_to_f32(u16::from_le_bytes(b))),
                    FloatDtype::F32 => lanes::<4>(&clean, f32::from_le_bytes),
                };
                let want = reference(&clean, d).sumsq;
                assert!((portable - want).abs() <= 1e-5 * want + 1e-30, "{d:?}");
                assert!(close(scan(d, &head), reference(&head, d)), "{d:?}");
            }
        }
    }

    #[test]
    fn large_finite_values_do_not_overflow_the_sum() {
        // 1e30^2 overflows float32; the sum is taken again in float64.
        let vals = vec![1e30f32, -2e30, 3.0, f32::NAN];
        let want = reference(&encode(&vals, FloatDtype::F32), FloatDtype::F32);
        assert!(want.sumsq > 4.9e60 && want.sumsq < 5.1e60);
        let got = scan_tensor(&encode(&vals, FloatDtype::F32), FloatDtype::F32, 1).unwrap();
        assert_eq!(got, want);
        assert_eq!(scan(FloatDtype::F32, &encode(&vals, FloatDtype::F32)), want);
    }

    #[test]
    fn ragged_buffers_are_errors() {
        assert!(scan_tensor(&[0u8; 3], FloatDtype::BF16, 1).is_err());
        assert_eq!(
            scan_tensor(&[], FloatDtype::F32, 1).unwrap(),
            Stats::default()
        );
    }
}
