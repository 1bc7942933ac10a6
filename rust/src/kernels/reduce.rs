//! Weighted sums and dtype casts over raw little-endian buffers.
//!
//! `out[j] = sum_i w_i * f32(in_i[j])`, accumulated in f32 in input order (so it matches torch's
//! `w0*a.float() + w1*b.float() + ...` bit for bit: no FMA contraction), then rounded to the
//! output dtype (RNE). One pass over memory: each block of elements is accumulated in a small
//! f32 buffer that stays in L1, so the loop runs at memory bandwidth. Inputs are read as bytes,
//! so any alignment works. Each input block and each written output block is also scanned while
//! in L1 for the call's [`Health`] (non-finite counts, sums of squares).

use crate::dtype::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16, FloatDtype};
use crate::error::{Error, Result};
use crate::kernels::gram::{Groups, Input};
use crate::kernels::health::{block_stats, out_squares_stand_in, per_range, scan, Health};
use crate::threads;

/// Elements per block: 8 KiB of f32 accumulator, comfortably inside L1 next to the inputs.
const BLOCK: usize = 2048;

#[derive(Clone, Copy, Debug)]
pub struct WeightedInput<'a> {
    pub data: &'a [u8],
    pub dtype: FloatDtype,
    pub weight: f32,
}

/// Check sizes and return the element count.
fn element_count(inputs: &[WeightedInput], out: &[u8], out_dtype: FloatDtype) -> Result<usize> {
    if !out.len().is_multiple_of(out_dtype.size()) {
        return Err(Error::RaggedOutput {
            len: out.len(),
            dtype: out_dtype.code(),
        });
    }
    let n = out.len() / out_dtype.size();
    for (i, inp) in inputs.iter().enumerate() {
        let expected = n * inp.dtype.size();
        if inp.data.len() != expected {
            return Err(Error::BufferLength {
                what: format!("input {i} ({})", inp.dtype.code()),
                expected,
                actual: inp.data.len(),
            });
        }
    }
    Ok(n)
}

/// Fused weighted sum. `threads`: 0 = all cores, 1 = the calling thread only. Returns the
/// figures of every input (in order) and of the output as written.
pub fn weighted_sum(
    inputs: &[WeightedInput],
    out: &mut [u8],
    out_dtype: FloatDtype,
    threads: usize,
) -> Result<Health> {
    let n = element_count(inputs, out, out_dtype)?;
    let ranges = threads::chunk_ranges(n, threads::resolve(threads), BLOCK);
    Ok(per_range(
        out,
        out_dtype.size(),
        &ranges,
        inputs.len(),
        |start, out, h| sum_range(inputs, start, out, out_dtype, h),
    ))
}

/// Cast between F32, F16 and BF16 (a weighted sum of one input with weight 1, which is exact).
pub fn convert(
    input: &[u8],
    in_dtype: FloatDtype,
    out: &mut [u8],
    out_dtype: FloatDtype,
    threads: usize,
) -> Result<()> {
    let inputs = [WeightedInput {
        data: input,
        dtype: in_dtype,
        weight: 1.0,
    }];
    if in_dtype == out_dtype {
        element_count(&inputs, out, out_dtype)?;
        out.copy_from_slice(input);
        return Ok(());
    }
    weighted_sum(&inputs, out, out_dtype, threads).map(drop)
}

/// The elements of `src` (`dtype`) as f32 in `dst` (one per `dst` element).
#[inline]
pub(crate) fn decode(dtype: FloatDtype, src: &[u8], dst: &mut [f32]) {
    accumulate(dtype, src, 1.0, dst, true);
}

/// `out[e] = sum_i c[g(e)][i] * in_i[e]`: a weighted sum whose weights change from one vector
/// group to the next (the second pass of the geometric methods, see `kernels::gram`). `coefs`
/// holds `count * k` weights, group by group. The same f32 operations in the same order as
/// [`weighted_sum`] with the group's weights, so a single group gives its bits exactly.
pub fn weighted_sum_grouped(
    inputs: &[Input],
    coefs: &[f32],
    groups: Groups,
    out: &mut [u8],
    out_dtype: FloatDtype,
    threads: usize,
) -> Result<Health> {
    let k = inputs.len();
    let weighted = |w: &[f32]| -> Vec<WeightedInput> {
        inputs
            .iter()
            .zip(w)
            .map(|(i, &weight)| WeightedInput {
                data: i.data,
                dtype: i.dtype,
                weight,
            })
            .collect()
    };
    let n = element_count(&weighted(&vec![0.0; k]), out, out_dtype)?;
    let count = groups.count(n)?;
    if coefs.len() != count * k {
        return Err(Error::BufferLength {
            what: "coefs (f32)".into(),
            expected: count * k,
            actual: coefs.len(),
        });
    }
    let (len, rows) = match groups {
        Groups::Whole => return weighted_sum(&weighted(coefs), out, out_dtype, threads),
        Groups::Rows { len } => (len, count),
        Groups::Columns { inner } => (inner, n / inner),
    };
    if n == 0 {
        return Ok(Health::new(k));
    }
    let osz = out_dtype.size();
    let per = rows.div_ceil(threads::resolve(threads).clamp(1, rows));
    let mut parts: Vec<Health> = (0..rows.div_ceil(per)).map(|_| Health::new(k)).collect();
    let tasks: Vec<_> = out
        .chunks_mut(per * len * osz)
        .zip(parts.iter_mut())
        .enumerate()
        .map(|(t, (o, h))| (t * per, o, h))
        .collect();
    threads::run_all(tasks, |(first, out, h)| {
        let mut local = Health::new(k);
        for (i, row) in out.chunks_exact_mut(len * osz).enumerate() {
            let r = first + i;
            match groups {
                Groups::Rows { .. } => {
                    let w = weighted(&coefs[r * k..(r + 1) * k]);
                    sum_range(&w, r * len, row, out_dtype, &mut local);
                }
                _ => columns_row(inputs, coefs, r * len, row, out_dtype, &mut local),
            }
        }
        *h = local;
    });
    Ok(Health::sum(k, &parts))
}

/// One outer row of a column-grouped sum: element `j` of the row takes the weights of group `j`.
fn columns_row(
    inputs: &[Input],
    coefs: &[f32],
    start: usize,
    out: &mut [u8],
    out_dtype: FloatDtype,
    health: &mut Health,
) {
    let k = inputs.len();
    let osz = out_dtype.size();
    let n = out.len() / osz;
    let mut acc = [0f32; BLOCK];
    let mut x = [0f32; BLOCK];
    let mut b = 0;
    while b < n {
        let len = BLOCK.min(n - b);
        let acc = &mut acc[..len];
        acc.fill(0.0);
        for (i, inp) in inputs.iter().enumerate() {
            let sz = inp.dtype.size();
            let src = &inp.data[(start + b) * sz..(start + b + len) * sz];
            decode(inp.dtype, src, &mut x[..len]);
            for (e, (a, v)) in acc.iter_mut().zip(&x[..len]).enumerate() {
                let w = coefs[(b + e) * k + i] * v;
                *a = if i == 0 { w } else { *a + w };
            }
            health.inputs[i].add(scan(inp.dtype, src));
        }
        let dst = &mut out[b * osz..(b + len) * osz];
        store(out_dtype, acc, dst);
        health.output.add(scan(out_dtype, dst));
        b += len;
    }
}

/// Process elements `start..start + out.len()/osz`, dispatching to a wider-vector build of the
/// same code (plus hardware f16 conversion, and the inputs' squares summed in the accumulation
/// loop) when the CPU has AVX2, F16C and FMA.
fn sum_range(
    inputs: &[WeightedInput],
    start: usize,
    out: &mut [u8],
    out_dtype: FloatDtype,
    health: &mut Health,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("f16c")
            && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2, F16C and FMA (checked just above).
            unsafe { sum_range_avx2(inputs, start, out, out_dtype, health) };
            return;
        }
    }
    sum_range_generic(inputs, start, out, out_dtype, false, health)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c,fma")]
unsafe fn sum_range_avx2(
    inputs: &[WeightedInput],
    start: usize,
    out: &mut [u8],
    out_dtype: FloatDtype,
    health: &mut Health,
) {
    sum_range_generic(inputs, start, out, out_dtype, true, health)
}

/// `simd`: only true when the caller verified the CPU has AVX2, F16C and FMA; the inputs are
/// then accumulated by [`simd::accumulate`] (which sums the squares of the inputs and of the
/// result on the way, and converts f16 in hardware: the bit-twiddling version costs ~2x in
/// throughput) and f16 outputs encoded by the F16C instructions.
#[inline(always)]
fn sum_range_generic(
    inputs: &[WeightedInput],
    start: usize,
    out: &mut [u8],
    out_dtype: FloatDtype,
    simd: bool,
    health: &mut Health,
) {
    let osz = out_dtype.size();
    let n = out.len() / osz;
    let mut acc = [0f32; BLOCK];
    let mut b = 0;
    // the squares of the f32 sums for the written output's (health::out_squares_stand_in)
    let fused_out = simd && !inputs.is_empty() && out_squares_stand_in(out_dtype);
    while b < n {
        let len = BLOCK.min(n - b);
        let acc = &mut acc[..len];
        if inputs.is_empty() {
            acc.fill(0.0);
        }
        let mut out_sumsq = 0.0;
        for (k, inp) in inputs.iter().enumerate() {
            let sz = inp.dtype.size();
            let lo = (start + b) * sz;
            let src = &inp.data[lo..lo + len * sz];
            let (first, last) = (k == 0, k + 1 == inputs.len());
            let stats = if simd {
                // SAFETY: `simd` says the CPU has AVX2, F16C and FMA.
                let (sumsq, result_sumsq) =
                    unsafe { simd::accumulate(inp.dtype, src, inp.weight, acc, first, last) };
                out_sumsq = result_sumsq;
                block_stats(sumsq, inp.dtype, src)
            } else {
                accumulate(inp.dtype, src, inp.weight, acc, first);
                scan(inp.dtype, src)
            };
            health.inputs[k].add(stats);
        }
        let dst = &mut out[b * osz..(b + len) * osz];
        if simd && out_dtype == FloatDtype::F16 {
            hw_f16::encode(acc, dst);
        } else {
            store(out_dtype, acc, dst);
        }
        health.output.add(if fused_out {
            block_stats(out_sumsq, out_dtype, dst)
        } else {
            scan(out_dtype, dst)
        });
        b += len;
    }
}

/// The accumulation with AVX2 intrinsics, fused with the sums of squares.
#[cfg(target_arch = "x86_64")]
mod simd {
    use crate::dtype::FloatDtype;
    use crate::kernels::health::x86::{hsum, load1, load8};
    use std::arch::x86_64::*;

    /// `acc = w*x` (`first`) or `acc += w*x` over the elements of `src` (`dtype`, one per `acc`
    /// element), the same float32 operations as the portable loop (a multiply, then an add:
    /// no FMA in the sum). Returns the sum of the squares of `x`, and with `last` that of the
    /// resulting `acc` (0 otherwise); a sum is non-finite when an element is.
    ///
    /// SAFETY: the CPU must have AVX2, F16C and FMA; `src` holds `acc.len()` elements.
    #[target_feature(enable = "avx2,f16c,fma")]
    pub unsafe fn accumulate(
        dtype: FloatDtype,
        src: &[u8],
        w: f32,
        acc: &mut [f32],
        first: bool,
        last: bool,
    ) -> (f64, f64) {
        macro_rules! go {
            ($d:literal) => {
                match (first, last) {
                    (true, true) => run::<$d, true, true>(src, w, acc),
                    (true, false) => run::<$d, true, false>(src, w, acc),
                    (false, true) => run::<$d, false, true>(src, w, acc),
                    (false, false) => run::<$d, false, false>(src, w, acc),
                }
            };
        }
        // SAFETY: forwarded.
        unsafe {
            match dtype {
                FloatDtype::F32 => go!(0),
                FloatDtype::BF16 => go!(1),
                FloatDtype::F16 => go!(2),
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,f16c,fma")]
    unsafe fn run<const D: u8, const FIRST: bool, const LAST: bool>(
        src: &[u8],
        w: f32,
        acc: &mut [f32],
    ) -> (f64, f64) {
        let sz = if D == 0 { 4 } else { 2 };
        let n = acc.len().min(src.len() / sz);
        let (p, a) = (src.as_ptr(), acc.as_mut_ptr());
        let wv = _mm256_set1_ps(w);
        // four independent chains: one FMA chain per vector would wait on the FMA latency
        let mut sq = [_mm256_setzero_ps(); 4];
        let mut osq = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        // SAFETY: i + 32 <= n keeps every load and store in bounds.
        unsafe {
            while i + 32 <= n {
                for j in 0..4 {
                    let at = i + 8 * j;
                    let v = load8::<D>(p.add(at * sz));
                    sq[j] = _mm256_fmadd_ps(v, v, sq[j]);
                    let x = _mm256_mul_ps(wv, v);
                    let r = if FIRST {
                        x
                    } else {
                        _mm256_add_ps(_mm256_loadu_ps(a.add(at)), x)
                    };
                    if LAST {
                        osq[j] = _mm256_fmadd_ps(r, r, osq[j]);
                    }
                    _mm256_storeu_ps(a.add(at), r);
                }
                i += 32;
            }
        }
        let (mut total, mut out_total) = (hsum(&sq), hsum(&osq));
        for (j, a) in acc.iter_mut().enumerate().take(n).skip(i) {
            let v = load1::<D>(src, j);
            total += v * v;
            let x = w * v;
            *a = if FIRST { x } else { *a + x };
            if LAST {
                out_total += *a * *a;
            }
        }
        (total as f64, out_total as f64)
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod simd {
    use crate::dtype::FloatDtype;

    pub unsafe fn accumulate(
        _: FloatDtype,
        _: &[u8],
        _: f32,
        _: &mut [f32],
        _: bool,
        _: bool,
    ) -> (f64, f64) {
        unreachable!("the SIMD accumulation is x86_64-only")
    }
}

/// Block conversions with the F16C instructions. Called once per block (not inlined into the
/// element loop), so the runtime dispatch costs nothing measurable.
mod hw_f16 {
    #[cfg(target_arch = "x86_64")]
    pub fn encode(src: &[f32], dst: &mut [u8]) {
        // SAFETY: only reached from `sum_range_avx2`, whose caller checked for F16C.
        unsafe { imp::encode(src, dst) }
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub fn encode(_: &[f32], _: &mut [u8]) {
        unreachable!("F16C path is x86_64-only")
    }

    #[cfg(target_arch = "x86_64")]
    mod imp {
        use crate::dtype::f32_to_f16;
        use std::arch::x86_64::*;

        #[target_feature(enable = "avx,f16c")]
        pub unsafe fn encode(src: &[f32], dst: &mut [u8]) {
            let n = src.len().min(dst.len() / 2);
            let mut i = 0;
            while i + 8 <= n {
                // SAFETY: bounds as in `decode`.
                unsafe {
                    let v = _mm256_loadu_ps(src.as_ptr().add(i));
                    let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
                    _mm_storeu_si128(dst.as_mut_ptr().add(2 * i).cast::<__m128i>(), h);
                }
                i += 8;
            }
            for j in i..n {
                dst[2 * j..2 * j + 2].copy_from_slice(&f32_to_f16(src[j]).to_le_bytes());
            }
        }
    }
}

#[inline(always)]
fn accumulate(dtype: FloatDtype, src: &[u8], w: f32, acc: &mut [f32], first: bool) {
    match (dtype, first) {
        (FloatDtype::BF16, true) => {
            acc_block::<true, 2>(src, w, acc, |b| bf16_to_f32(u16::from_le_bytes(b)))
        }
        (FloatDtype::BF16, false) => {
            acc_block::<false, 2>(src, w, acc, |b| bf16_to_f32(u16::from_le_bytes(b)))
        }
        (FloatDtype::F16, true) => {
            acc_block::<true, 2>(src, w, acc, |b| f16_to_f32(u16::from_le_bytes(b)))
        }
        (FloatDtype::F16, false) => {
            acc_block::<false, 2>(src, w, acc, |b| f16_to_f32(u16::from_le_bytes(b)))
        }
        (FloatDtype::F32, true) => acc_block::<true, 4>(src, w, acc, f32::from_le_bytes),
        (FloatDtype::F32, false) => acc_block::<false, 4>(src, w, acc, f32::from_le_bytes),
    }
}

/// `acc = w*x` (first input) or `acc += w*x`, one element per `SZ` source bytes.
#[inline(always)]
fn acc_block<const FIRST: bool, const SZ: usize>(
    src: &[u8],
    w: f32,
    acc: &mut [f32],
    load: impl Fn([u8; SZ]) -> f32,
) {
    for (a, c) in acc.iter_mut().zip(src.chunks_exact(SZ)) {
        let mut bytes = [0u8; SZ];
        bytes.copy_from_slice(c);
        let x = w * load(bytes);
        *a = if FIRST { x } else { *a + x };
    }
}

#[inline(always)]
fn store(dtype: FloatDtype, acc: &[f32], out: &mut [u8]) {
    match dtype {
        FloatDtype::BF16 => store_block::<2>(acc, out, |x| f32_to_bf16(x).to_le_bytes()),
        FloatDtype::F16 => store_block::<2>(acc, out, |x| f32_to_f16(x).to_le_bytes()),
        FloatDtype::F32 => store_block::<4>(acc, out, f32::to_le_bytes),
    }
}

#[inline(always)]
fn store_block<const SZ: usize>(acc: &[f32], out: &mut [u8], enc: impl Fn(f32) -> [u8; SZ]) {
    for (&a, c) in acc.iter().zip(out.chunks_exact_mut(SZ)) {
        c.copy_from_slice(&enc(a));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Lcg(u64);
    impl Lcg {
        fn f32(&mut self) -> f32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 8.0 - 4.0
        }
    }

    use crate::kernels::health::tests::{decode, encode};

    const ALL: [FloatDtype; 3] = [FloatDtype::F32, FloatDtype::F16, FloatDtype::BF16];

    /// Compare against an f64 reference; the kernel may differ only by f32 accumulation error
    /// plus one rounding to the output dtype.
    fn check(
        n: usize,
        dtypes: &[FloatDtype],
        out_dtype: FloatDtype,
        threads: usize,
        offset: usize,
    ) {
        let mut rng = Lcg(n as u64 + 17);
        let weights: Vec<f32> = (0..dtypes.len()).map(|i| 0.3 + 0.25 * i as f32).collect();
        let bufs: Vec<Vec<u8>> = dtypes
            .iter()
            .map(|&d| {
                let vals: Vec<f32> = (0..n).map(|_| rng.f32()).collect();
                // Prefix with `offset` junk bytes to exercise unaligned reads.
                let mut b = vec![0xAB; offset];
                b.extend(encode(&vals, d));
                b
            })
            .collect();
        let inputs: Vec<WeightedInput> = bufs
            .iter()
            .zip(dtypes)
            .zip(&weights)
            .map(|((b, &dtype), &weight)| WeightedInput {
                data: &b[offset..],
                dtype,
                weight,
            })
            .collect();
        let mut out = vec![0u8; n * out_dtype.size()];
        weighted_sum(&inputs, &mut out, out_dtype, threads).unwrap();
        let got = decode(&out, out_dtype);
        let decoded: Vec<Vec<f32>> = inputs.iter().map(|i| decode(i.data, i.dtype)).collect();
        let ulp = match out_dtype {
            FloatDtype::F32 => 1e-6,
            FloatDtype::F16 => 1e-3,
            FloatDtype::BF16 => 8e-3,
        };
        for j in 0..n {
            let exact: f64 = decoded
                .iter()
                .zip(&weights)
                .map(|(v, &w)| w as f64 * v[j] as f64)
                .sum();
            let tol = ulp * exact.abs().max(1.0) * 1.01 + 1e-5;
            assert!(
                (got[j] as f64 - exact).abs() <= tol,
                "n={n} j={j} got={} want={exact} {dtypes:?}->{out_dtype:?}",
                got[j]
            );
        }
    }

    /// Each group's elements are bit-identical to a plain weighted sum with that group's weights.
    #[test]
    fn grouped_sums_take_each_groups_weights() {
        let (outer, inner) = (5usize, 2100usize);
        let n = outer * inner;
        let mut rng = Lcg(11);
        let vals: Vec<Vec<f32>> = (0..3)
            .map(|_| (0..n).map(|_| rng.f32()).collect())
            .collect();
        for d in ALL {
            let enc: Vec<Vec<u8>> = vals.iter().map(|v| encode(v, d)).collect();
            let inputs: Vec<Input> = enc.iter().map(|b| Input { data: b, dtype: d }).collect();
            for (groups, count) in [
                (Groups::Whole, 1),
                (Groups::Rows { len: inner }, outer),
                (Groups::Columns { inner }, inner),
            ] {
                let coefs: Vec<f32> = (0..count * 3).map(|_| rng.f32()).collect();
                for threads in [1, 3] {
                    let mut out = vec![0u8; n * d.size()];
                    let h = weighted_sum_grouped(&inputs, &coefs, groups, &mut out, d, threads)
                        .unwrap();
                    for e in (0..n).step_by(97) {
                        let g = match groups {
                            Groups::Whole => 0,
                            Groups::Rows { len } => e / len,
                            Groups::Columns { inner } => e % inner,
                        };
                        let one: Vec<Vec<u8>> = enc
                            .iter()
                            .map(|b| b[e * d.size()..(e + 1) * d.size()].to_vec())
                            .collect();
                        let w: Vec<WeightedInput> = one
                            .iter()
                            .zip(&coefs[g * 3..g * 3 + 3])
                            .map(|(b, &weight)| WeightedInput {
                                data: b,
                                dtype: d,
                                weight,
                            })
                            .collect();
                        let mut want = vec![0u8; d.size()];
                        weighted_sum(&w, &mut want, d, 1).unwrap();
                        assert_eq!(
                            &out[e * d.size()..(e + 1) * d.size()],
                            &want[..],
                            "{d:?} {groups:?} element {e}"
                        );
                    }
                    let plain = weighted_sum(
                        &inputs
                            .iter()
                            .map(|i| WeightedInput {
                                data: i.data,
                                dtype: d,
                                weight: 1.0,
                            })
                            .collect::<Vec<_>>(),
                        &mut vec![0u8; n * d.size()],
                        d,
                        1,
                    )
                    .unwrap();
                    for (a, b) in h.inputs.iter().zip(&plain.inputs) {
                        assert!((a.sumsq - b.sumsq).abs() <= 1e-6 * b.sumsq, "{groups:?}");
                    }
                }
            }
            assert!(weighted_sum_grouped(
                &inputs,
                &[1.0; 2],
                Groups::Whole,
                &mut vec![0u8; n * d.size()],
                d,
                1
            )
            .is_err());
        }
    }

    #[test]
    fn matches_f64_reference_on_odd_sizes() {
        for &n in &[0usize, 1, 7, 4097, 100_003] {
            for out_dtype in ALL {
                for d in ALL {
                    check(n, &[d, d, d], out_dtype, 0, 0);
                }
                check(
                    n,
                    &[FloatDtype::BF16, FloatDtype::F16, FloatDtype::F32],
                    out_dtype,
                    1,
                    1,
                );
            }
        }
    }

    #[test]
    fn threaded_matches_single_thread_exactly() {
        let n = 300_001;
        let mut rng = Lcg(5);
        let a = encode(
            &(0..n).map(|_| rng.f32()).collect::<Vec<_>>(),
            FloatDtype::BF16,
        );
        let b = encode(
            &(0..n).map(|_| rng.f32()).collect::<Vec<_>>(),
            FloatDtype::F32,
        );
        let inputs = [
            WeightedInput {
                data: &a,
                dtype: FloatDtype::BF16,
                weight: 0.7,
            },
            WeightedInput {
                data: &b,
                dtype: FloatDtype::F32,
                weight: -0.2,
            },
        ];
        let mut o1 = vec![0u8; n * 2];
        let mut o4 = vec![0u8; n * 2];
        weighted_sum(&inputs, &mut o1, FloatDtype::BF16, 1).unwrap();
        weighted_sum(&inputs, &mut o4, FloatDtype::BF16, 4).unwrap();
        assert_eq!(o1, o4);
        // Generic and AVX2 builds agree too.
        let mut og = vec![0u8; n * 2];
        sum_range_generic(
            &inputs,
            0,
            &mut og,
            FloatDtype::BF16,
            false,
            &mut Health::new(2),
        );
        assert_eq!(o1, og);
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn hardware_f16_matches_software() {
        if !(std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("f16c"))
        {
            return;
        }
        // Every f16 bit pattern as input (NaNs compared as NaN), odd length for the tail.
        let a: Vec<u8> = (0..=u16::MAX)
            .chain(0..5)
            .flat_map(|h| h.to_le_bytes())
            .collect();
        let n = a.len() / 2;
        let inputs = [WeightedInput {
            data: &a,
            dtype: FloatDtype::F16,
            weight: 0.75,
        }];
        for out_dtype in ALL {
            let mut sw = vec![0u8; n * out_dtype.size()];
            let mut hw = sw.clone();
            let (mut hs, mut hh) = (Health::new(1), Health::new(1));
            sum_range_generic(&inputs, 0, &mut sw, out_dtype, false, &mut hs);
            sum_range(&inputs, 0, &mut hw, out_dtype, &mut hh);
            assert_eq!(hs.output.nonfinite, hh.output.nonfinite);
            assert_eq!(hs.inputs[0].nonfinite, 2 * 1024); // every f16 NaN and both Infs
            for (x, y) in decode(&sw, out_dtype).iter().zip(decode(&hw, out_dtype)) {
                assert!(
                    x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()),
                    "{x} {y}"
                );
            }
        }
        // f32 -> f16 rounding, including ties, subnormals and overflow.
        let vals: Vec<f32> = (0..200_000u32)
            .map(|i| f32::from_bits(0x3300_0000u32.wrapping_add(i.wrapping_mul(5_003))))
            .chain([
                65519.0,
                65520.0,
                -65520.0,
                1.0 + f32::powi(2.0, -11),
                f32::NAN,
            ])
            .collect();
        let b = encode(&vals, FloatDtype::F32);
        let inputs = [WeightedInput {
            data: &b,
            dtype: FloatDtype::F32,
            weight: 1.0,
        }];
        let mut sw = vec![0u8; vals.len() * 2];
        let mut hw = sw.clone();
        sum_range_generic(
            &inputs,
            0,
            &mut sw,
            FloatDtype::F16,
            false,
            &mut Health::new(1),
        );
        sum_range(&inputs, 0, &mut hw, FloatDtype::F16, &mut Health::new(1));
        for (x, y) in decode(&sw, FloatDtype::F16)
            .iter()
            .zip(decode(&hw, FloatDtype::F16))
        {
            assert!(
                x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()),
                "{x} {y}"
            );
        }
    }

    #[test]
    fn order_matches_sequential_f32() {
        // Exactly (w0*a + w1*b) + w2*c in f32, as torch computes it.
        let (a, b, c) = (1.0f32, 1e-8f32, -1.0f32);
        let bytes: Vec<Vec<u8>> = [a, b, c].iter().map(|v| v.to_le_bytes().to_vec()).collect();
        let inputs: Vec<_> = bytes
            .iter()
            .map(|d| WeightedInput {
                data: d,
                dtype: FloatDtype::F32,
                weight: 1.0,
            })
            .collect();
        let mut out = [0u8; 4];
        weighted_sum(&inputs, &mut out, FloatDtype::F32, 1).unwrap();
        assert_eq!(f32::from_le_bytes(out), (a + b) + c);
    }

    #[test]
    fn nan_and_inf_propagate() {
        let a = encode(&[f32::NAN, f32::INFINITY, 1.0], FloatDtype::F32);
        let inputs = [WeightedInput {
            data: &a,
            dtype: FloatDtype::F32,
            weight: 2.0,
        }];
        for d in ALL {
            let mut out = vec![0u8; 3 * d.size()];
            weighted_sum(&inputs, &mut out, d, 1).unwrap();
            let v = decode(&out, d);
            assert!(v[0].is_nan());
            assert_eq!(v[1], f32::INFINITY);
            assert_eq!(v[2], 2.0);
        }
    }

    #[test]
    fn health_counts_inputs_and_the_rounded_output() {
        use crate::kernels::health::tests::{close, reference};
        let n = 10_007;
        let mut rng = Lcg(3);
        let mut a: Vec<f32> = (0..n).map(|_| rng.f32()).collect();
        let mut b: Vec<f32> = (0..n).map(|_| rng.f32()).collect();
        a[5] = f32::NAN;
        a[9000] = f32::INFINITY;
        b[77] = 3e38; // finite in f32 and bf16, but 2 * 3e38 overflows
        for (da, db, dout) in [
            (FloatDtype::BF16, FloatDtype::F32, FloatDtype::BF16),
            (FloatDtype::F16, FloatDtype::F16, FloatDtype::F16),
            (FloatDtype::F32, FloatDtype::F32, FloatDtype::F32),
        ] {
            let (ab, bb) = (encode(&a, da), encode(&b, db));
            let inputs = [
                WeightedInput {
                    data: &ab,
                    dtype: da,
                    weight: 0.5,
                },
                WeightedInput {
                    data: &bb,
                    dtype: db,
                    weight: 2.0,
                },
            ];
            let mut out = vec![0u8; n * dout.size()];
            for threads in [1, 3] {
                let h = weighted_sum(&inputs, &mut out, dout, threads).unwrap();
                assert!(
                    close(h.inputs[0], reference(&ab, da)),
                    "{da:?} {:?}",
                    h.inputs[0]
                );
                assert!(
                    close(h.inputs[1], reference(&bb, db)),
                    "{db:?} {:?}",
                    h.inputs[1]
                );
                // the squares of the f32 sums (within 2^-8 of the rounded values' squares)
                let want = reference(&out, dout);
                let rel = (h.output.sumsq - want.sumsq).abs() / want.sumsq;
                assert!(rel < 1e-3, "{dout:?} {:?} {want:?}", h.output);
                // the NaN, the Inf and the overflow (f16 inputs: 3e38 is already Inf)
                assert_eq!(h.output.nonfinite, 3, "{dout:?}");
            }
        }
        // finite f32 inputs whose sum rounds past the largest bf16
        let big = encode(&[3.4e38, 1.0], FloatDtype::F32);
        let inputs = [WeightedInput {
            data: &big,
            dtype: FloatDtype::F32,
            weight: 1.0,
        }];
        let mut out = [0u8; 4];
        let h = weighted_sum(&inputs, &mut out, FloatDtype::BF16, 1).unwrap();
        assert_eq!((h.inputs[0].nonfinite, h.output.nonfinite), (0, 1));
    }

    #[test]
    fn no_inputs_gives_zeros() {
        let mut out = vec![1u8; 12];
        weighted_sum(&[], &mut out, FloatDtype::F32, 1).unwrap();
        assert!(out.iter().all(|&b| b == 0));
    }

    #[test]
    fn size_errors_name_the_input() {
        let a = [0u8; 8];
        let b = [0u8; 6];
        let inputs = [
            WeightedInput {
                data: &a,
                dtype: FloatDtype::BF16,
                weight: 1.0,
            },
            WeightedInput {
                data: &b,
                dtype: FloatDtype::BF16,
                weight: 1.0,
            },
        ];
        let mut out = [0u8; 16];
        let e = weighted_sum(&inputs, &mut out, FloatDtype::F32, 1).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("input 1 (BF16) has 6 bytes, expected 8"),
            "{e}"
        );
        let mut ragged = [0u8; 3];
        assert!(matches!(
            weighted_sum(&inputs, &mut ragged, FloatDtype::F16, 1),
            Err(Error::RaggedOutput { .. })
        ));
    }

    #[test]
    fn convert_round_trips() {
        let vals: Vec<f32> = (0..5000).map(|i| (i as f32 - 2500.0) * 0.37).collect();
        let f32s = encode(&vals, FloatDtype::F32);
        for d in ALL {
            let mut o = vec![0u8; vals.len() * d.size()];
            convert(&f32s, FloatDtype::F32, &mut o, d, 0).unwrap();
            assert_eq!(o, encode(&vals, d), "{d:?}");
            let mut back = vec![0u8; f32s.len()];
            convert(&o, d, &mut back, FloatDtype::F32, 0).unwrap();
            assert_eq!(decode(&back, FloatDtype::F32), decode(&o, d));
        }
        let mut wrong = vec![0u8; 10];
        assert!(convert(&f32s, FloatDtype::F32, &mut wrong, FloatDtype::F32, 1).is_err());
    }
}
