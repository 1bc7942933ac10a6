//! Weighted sums and dtype casts over raw little-endian buffers.
//!
//! `out[j] = sum_i w_i * f32(in_i[j])`, accumulated in f32 in input order (so it matches torch's
//! `w0*a.float() + w1*b.float() + ...` bit for bit: no FMA contraction), then rounded to the
//! output dtype (RNE). One pass over memory: each block of elements is accumulated in a small
//! f32 buffer that stays in L1, so the loop runs at memory bandwidth. Inputs are read as bytes,
//! so any alignment works.

use crate::dtype::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16, FloatDtype};
use crate::error::{Error, Result};
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

/// Fused weighted sum. `threads`: 0 = all cores, 1 = the calling thread only.
pub fn weighted_sum(
    inputs: &[WeightedInput],
    out: &mut [u8],
    out_dtype: FloatDtype,
    threads: usize,
) -> Result<()> {
    let n = element_count(inputs, out, out_dtype)?;
    let ranges = threads::chunk_ranges(n, threads::resolve(threads), BLOCK);
    let osz = out_dtype.size();
    let mut tasks = Vec::with_capacity(ranges.len());
    let mut rest = out;
    for r in ranges {
        let (head, tail) = rest.split_at_mut(r.len() * osz);
        tasks.push((r.start, head));
        rest = tail;
    }
    threads::run_all(tasks, |(start, out)| {
        sum_range(inputs, start, out, out_dtype)
    });
    Ok(())
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
    weighted_sum(&inputs, out, out_dtype, threads)
}

/// Process elements `start..start + out.len()/osz`, dispatching to a wider-vector build of the
/// same code (plus hardware f16 conversion) when the CPU has AVX2 and F16C.
fn sum_range(inputs: &[WeightedInput], start: usize, out: &mut [u8], out_dtype: FloatDtype) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            // SAFETY: the CPU supports AVX2 and F16C (checked just above).
            unsafe { sum_range_avx2(inputs, start, out, out_dtype) };
            return;
        }
    }
    sum_range_generic(inputs, start, out, out_dtype, false)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn sum_range_avx2(
    inputs: &[WeightedInput],
    start: usize,
    out: &mut [u8],
    out_dtype: FloatDtype,
) {
    sum_range_generic(inputs, start, out, out_dtype, true)
}

/// `f16c`: only true when the caller verified the CPU has F16C; f16 blocks then go through
/// the hardware converters (the bit-twiddling versions cost ~2x in throughput).
#[inline(always)]
fn sum_range_generic(
    inputs: &[WeightedInput],
    start: usize,
    out: &mut [u8],
    out_dtype: FloatDtype,
    f16c: bool,
) {
    let osz = out_dtype.size();
    let n = out.len() / osz;
    let mut acc = [0f32; BLOCK];
    let mut tmp = [0f32; BLOCK];
    let mut b = 0;
    while b < n {
        let len = BLOCK.min(n - b);
        let acc = &mut acc[..len];
        if inputs.is_empty() {
            acc.fill(0.0);
        }
        for (k, inp) in inputs.iter().enumerate() {
            let sz = inp.dtype.size();
            let lo = (start + b) * sz;
            let src = &inp.data[lo..lo + len * sz];
            if f16c && inp.dtype == FloatDtype::F16 {
                let tmp = &mut tmp[..len];
                hw_f16::decode(src, tmp);
                let w = inp.weight;
                if k == 0 {
                    acc.iter_mut()
                        .zip(tmp.iter())
                        .for_each(|(a, &x)| *a = w * x);
                } else {
                    acc.iter_mut()
                        .zip(tmp.iter())
                        .for_each(|(a, &x)| *a += w * x);
                }
            } else {
                accumulate(inp.dtype, src, inp.weight, acc, k == 0);
            }
        }
        let dst = &mut out[b * osz..(b + len) * osz];
        if f16c && out_dtype == FloatDtype::F16 {
            hw_f16::encode(acc, dst);
        } else {
            store(out_dtype, acc, dst);
        }
        b += len;
    }
}

/// Block conversions with the F16C instructions. Called once per block (not inlined into the
/// element loop), so the runtime dispatch costs nothing measurable.
mod hw_f16 {
    #[cfg(target_arch = "x86_64")]
    pub fn decode(src: &[u8], dst: &mut [f32]) {
        // SAFETY: only reached from `sum_range_avx2`, whose caller checked for F16C.
        unsafe { imp::decode(src, dst) }
    }

    #[cfg(target_arch = "x86_64")]
    pub fn encode(src: &[f32], dst: &mut [u8]) {
        // SAFETY: as above.
        unsafe { imp::encode(src, dst) }
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub fn decode(_: &[u8], _: &mut [f32]) {
        unreachable!("F16C path is x86_64-only")
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub fn encode(_: &[f32], _: &mut [u8]) {
        unreachable!("F16C path is x86_64-only")
    }

    #[cfg(target_arch = "x86_64")]
    mod imp {
        use crate::dtype::{f16_to_f32, f32_to_f16};
        use std::arch::x86_64::*;

        #[target_feature(enable = "avx,f16c")]
        pub unsafe fn decode(src: &[u8], dst: &mut [f32]) {
            let n = dst.len().min(src.len() / 2);
            let mut i = 0;
            while i + 8 <= n {
                // SAFETY: i + 8 <= n keeps the 16-byte load and 32-byte store in bounds;
                // both are unaligned-tolerant.
                unsafe {
                    let h = _mm_loadu_si128(src.as_ptr().add(2 * i).cast::<__m128i>());
                    _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
                }
                i += 8;
            }
            for j in i..n {
                dst[j] = f16_to_f32(u16::from_le_bytes([src[2 * j], src[2 * j + 1]]));
            }
        }

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

    fn encode(vals: &[f32], d: FloatDtype) -> Vec<u8> {
        let mut out = Vec::with_capacity(vals.len() * d.size());
        for &v in vals {
            match d {
                FloatDtype::F32 => out.extend_from_slice(&v.to_le_bytes()),
                FloatDtype::F16 => out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()),
                FloatDtype::BF16 => out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
            }
        }
        out
    }

    fn decode(bytes: &[u8], d: FloatDtype) -> Vec<f32> {
        bytes
            .chunks_exact(d.size())
            .map(|c| match d {
                FloatDtype::F32 => f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                FloatDtype::F16 => half::f16::from_le_bytes([c[0], c[1]]).to_f32(),
                FloatDtype::BF16 => half::bf16::from_le_bytes([c[0], c[1]]).to_f32(),
            })
            .collect()
    }

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
        sum_range_generic(&inputs, 0, &mut og, FloatDtype::BF16, false);
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
            sum_range_generic(&inputs, 0, &mut sw, out_dtype, false);
            sum_range(&inputs, 0, &mut hw, out_dtype);
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
        sum_range_generic(&inputs, 0, &mut sw, FloatDtype::F16, false);
        sum_range(&inputs, 0, &mut hw, FloatDtype::F16);
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
