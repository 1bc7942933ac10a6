//! NearSwap of two tensors over raw little-endian buffers (the torch reference is
//! `python/mergekitty/methods/nearswap.py`):
//!
//! ```text
//! diff = |b - x|
//! w    = clamp((1 / diff) * t, 0, 1) where diff > 0, else 1
//! out  = w * x + (1 - w) * b
//! ```
//!
//! in float32, each operation rounded as torch rounds it (`t / diff` is torch's
//! `reciprocal(diff) * float32(t)`; the clamp keeps NaN; no FMA), then rounded to the output
//! dtype: the result is bit-identical to the reference, NaN and Inf included. One pass, a
//! block at a time, with each input and output block scanned for the call's [`Health`] while
//! in L1.

use crate::dtype::FloatDtype;
use crate::error::{Error, Result};
use crate::kernels::common_length;
use crate::kernels::consensus::{load, store};
use crate::kernels::gta::Tensor;
use crate::kernels::health::{per_range, scan, Health};
use crate::kernels::with_avx2;
use crate::threads;

/// Elements per block: three float32 blocks stay in L1.
const BLOCK: usize = 2048;

/// `out = nearswap(base, other, t)` as `out_dtype`. `threads`: 0 = all cores. Returns the
/// figures of `base`, `other` and the output as written.
pub fn nearswap(
    base: Tensor,
    other: Tensor,
    t: f64,
    out: &mut [u8],
    out_dtype: FloatDtype,
    threads: usize,
) -> Result<Health> {
    if t.is_nan() {
        return Err(Error::InvalidArgument("nearswap: t is NaN".into()));
    }
    let names = |i: usize| if i == 0 { "base" } else { "other" }.to_string();
    let n = common_length(&[base, other], names, out, out_dtype)?;
    let t = t as f32; // torch multiplies a float32 tensor by the scalar rounded to float32
    let ranges = threads::chunk_ranges(n, threads::resolve(threads), BLOCK);
    Ok(per_range(
        out,
        out_dtype.size(),
        &ranges,
        2,
        |start, out, h| {
            with_avx2(
                #[inline(always)]
                || *h = range(base, other, t, start, out, out_dtype),
            )
        },
    ))
}

/// Elements `start..start + out.len() / osz`.
#[inline(always)]
fn range(
    base: Tensor,
    other: Tensor,
    t: f32,
    start: usize,
    out: &mut [u8],
    out_dtype: FloatDtype,
) -> Health {
    let mut h = Health::new(2);
    let osz = out_dtype.size();
    let n = out.len() / osz;
    let (mut bv, mut xv, mut ov) = ([0f32; BLOCK], [0f32; BLOCK], [0f32; BLOCK]);
    let mut b = 0;
    while b < n {
        let len = BLOCK.min(n - b);
        let j = start + b;
        let (bsrc, xsrc) = (base.elements(j, len), other.elements(j, len));
        load(base.dtype, bsrc, &mut bv[..len]);
        load(other.dtype, xsrc, &mut xv[..len]);
        h.inputs[0].add(scan(base.dtype, bsrc));
        h.inputs[1].add(scan(other.dtype, xsrc));
        for ((o, &bb), &x) in ov[..len].iter_mut().zip(&bv[..len]).zip(&xv[..len]) {
            *o = element(bb, x, t);
        }
        let dst = &mut out[b * osz..(b + len) * osz];
        store(out_dtype, &ov[..len], dst);
        h.output.add(scan(out_dtype, dst));
        b += len;
    }
    h
}

/// One element, in the reference's float32 operations (selects, so the loop vectorizes).
#[inline(always)]
fn element(b: f32, x: f32, t: f32) -> f32 {
    let diff = (b - x).abs();
    let pos = diff > 0.0;
    let r = (1.0 / if pos { diff } else { 1.0 }) * t;
    let w = if pos { r.clamp(0.0, 1.0) } else { 1.0 }; // NaN passes through
    w * x + (1.0 - w) * b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::health::tests::{close, decode, encode, reference};

    fn run(b: &[f32], x: &[f32], t: f64, d: FloatDtype, threads: usize) -> (Vec<f32>, Health) {
        let (bb, xb) = (encode(b, d), encode(x, d));
        let mut out = vec![0u8; b.len() * d.size()];
        let h = nearswap(
            Tensor {
                data: &bb,
                dtype: d,
            },
            Tensor {
                data: &xb,
                dtype: d,
            },
            t,
            &mut out,
            d,
            threads,
        )
        .unwrap();
        (decode(&out, d), h)
    }

    fn same(a: f32, b: f32) -> bool {
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
    }

    #[test]
    fn takes_close_values_and_interpolates_far_ones() {
        let b = [0.0, 1.0, 2.0, -1.0, 3.0];
        let x = [0.05, 1.0, 4.0, -1.5, 3.0];
        let (got, _) = run(&b, &x, 0.1, FloatDtype::F32, 1);
        // |d| <= t: x; |d| = 2: w = 0.05; |d| = 0.5: w = 0.2; equal: x (== b)
        let w2 = (1.0f32 / 2.0) * 0.1f32;
        let w5 = (1.0f32 / 0.5) * 0.1f32;
        let want = [
            0.05,
            1.0,
            w2 * 4.0 + (1.0 - w2) * 2.0,
            w5 * -1.5 - (1.0 - w5),
            3.0,
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn t_zero_returns_the_base() {
        let mut rng = crate::test_rng::Lcg(4);
        let b: Vec<f32> = (0..5000).map(|_| rng.unit()).collect();
        let x: Vec<f32> = (0..5000).map(|_| rng.unit()).collect();
        let (got, _) = run(&b, &x, 0.0, FloatDtype::F32, 1);
        assert_eq!(got, b);
    }

    #[test]
    fn nan_and_inf_pass_through_like_the_reference() {
        let inf = f32::INFINITY;
        let b = [f32::NAN, 1.0, inf, 1.0, inf, -inf, 0.0];
        let x = [1.0, f32::NAN, 1.0, inf, inf, inf, 0.0];
        let (got, h) = run(&b, &x, 0.5, FloatDtype::F32, 1);
        for (j, (&g, (&bb, &xx))) in got.iter().zip(b.iter().zip(&x)).enumerate() {
            assert!(same(g, element(bb, xx, 0.5)), "{j}: {g}");
        }
        // diff NaN: w = 1, out = x + 0 * b (NaN); diff inf: w = 0, out = 0 * x + b
        assert!(got[0].is_nan() && got[1].is_nan());
        assert_eq!(got[2], inf);
        assert!(got[3].is_nan()); // 0 * inf
        assert!(got[4].is_nan()); // diff NaN (inf - inf): x + 0 * inf
        assert_eq!(got[6], 0.0);
        assert!(got[5].is_nan()); // diff inf: 0 * inf + -inf
        assert_eq!(h.inputs[0].nonfinite, 4);
        assert_eq!(h.inputs[1].nonfinite, 4);
        assert_eq!(h.output.nonfinite, 6);
    }

    #[test]
    fn ragged_tails_threads_and_dtypes_agree_with_the_definition() {
        let mut rng = crate::test_rng::Lcg(9);
        for n in [0usize, 1, 7, 2049, 200_003] {
            let b: Vec<f32> = (0..n).map(|_| rng.unit()).collect();
            let x: Vec<f32> = b.iter().map(|&v| v + rng.unit() * 0.01).collect();
            for d in [FloatDtype::F32, FloatDtype::F16, FloatDtype::BF16] {
                let (bd, xd) = (decode(&encode(&b, d), d), decode(&encode(&x, d), d));
                let (one, h1) = run(&b, &x, 0.004, d, 1);
                let (many, h3) = run(&b, &x, 0.004, d, 3);
                assert_eq!(h1, h3);
                assert!(close(h1.inputs[0], reference(&encode(&b, d), d)));
                assert!(close(h1.output, reference(&encode(&one, d), d)));
                for j in 0..n {
                    let want = element(bd[j], xd[j], 0.004f64 as f32);
                    let want = decode(&encode(&[want], d), d)[0];
                    assert!(
                        same(one[j], want) && same(many[j], want),
                        "n={n} {d:?} j={j}"
                    );
                }
            }
        }
    }

    #[test]
    fn mixed_dtypes_and_bad_sizes() {
        let b = encode(&[1.0, 2.0, 3.0], FloatDtype::BF16);
        let x = encode(&[1.5, 2.0, 2.0], FloatDtype::F32);
        let mut out = vec![0u8; 3 * 4];
        let bt = Tensor {
            data: &b,
            dtype: FloatDtype::BF16,
        };
        let xt = Tensor {
            data: &x,
            dtype: FloatDtype::F32,
        };
        nearswap(bt, xt, 1.0, &mut out, FloatDtype::F32, 0).unwrap();
        assert_eq!(decode(&out, FloatDtype::F32), [1.5, 2.0, 2.0]);
        let e = nearswap(bt, xt, 1.0, &mut out[..8], FloatDtype::F32, 0).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("base (BF16) has 6 bytes, expected 4"),
            "{e}"
        );
        let e = nearswap(bt, xt, 1.0, &mut out[..7], FloatDtype::F32, 0).unwrap_err();
        assert!(matches!(e, Error::RaggedOutput { .. }));
        let e = nearswap(bt, xt, f64::NAN, &mut out, FloatDtype::F32, 0).unwrap_err();
        assert!(e.to_string().contains("t is NaN"));
    }
}
