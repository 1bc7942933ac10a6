//! Float64 `exp` and `ln` written branch-free (selects, integer bit operations, polynomials with
//! `mul_add`) so that loops over them vectorize: the libm functions are scalar calls, several
//! times slower than the rest of a softmax. Call them under [`super::with_simd_fma`] (without
//! hardware FMA, `mul_add` is a library call). Both are within 2 ulp of the correctly rounded
//! result (checked against the standard library below), as accurate as the vectorized
//! functions torch uses.

/// 1.5 * 2^52: adding it rounds a float64 below 2^51 in magnitude to an integer (nearest, ties
/// to even), which then sits in the low mantissa bits.
const ROUND_MAGIC: f64 = 6755399441055744.0;
const LOG2_E: f64 = std::f64::consts::LOG2_E;
/// ln 2 split so that `n * LN2_HI` is exact for |n| < 2^11 (Cody and Waite).
const LN2_HI: f64 = 6.931_471_803_691_238e-1;
const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;

/// e^x for x <= 709 (the softmax evaluates it at x - max <= 0). Below -708 (where e^x is
/// under the smallest normal float64) the result is 0, above 709 +inf; NaN gives NaN.
#[inline(always)]
pub(crate) fn exp(x: f64) -> f64 {
    // Clamp into the range where 2^n is a normal float64; the selects below fix the ends.
    let xc = x.clamp(-708.0, 709.0);
    let k = xc * LOG2_E + ROUND_MAGIC;
    let n = k - ROUND_MAGIC;
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, xc));
    // e^r for |r| <= ln2/2: Taylor to degree 13 (the next term is below 2^-58).
    let mut p: f64 = 1.0 / 6_227_020_800.0;
    p = p.mul_add(r, 1.0 / 479_001_600.0);
    p = p.mul_add(r, 1.0 / 39_916_800.0);
    p = p.mul_add(r, 1.0 / 3_628_800.0);
    p = p.mul_add(r, 1.0 / 362_880.0);
    p = p.mul_add(r, 1.0 / 40_320.0);
    p = p.mul_add(r, 1.0 / 5_040.0);
    p = p.mul_add(r, 1.0 / 720.0);
    p = p.mul_add(r, 1.0 / 120.0);
    p = p.mul_add(r, 1.0 / 24.0);
    p = p.mul_add(r, 1.0 / 6.0);
    p = p.mul_add(r, 0.5);
    p = p.mul_add(r, 1.0);
    p = p.mul_add(r, 1.0);
    // 2^n from the integer in k's low bits: (2^51 + n + 1023) << 52 keeps n + 1023.
    let scale = f64::from_bits(k.to_bits().wrapping_add(1023) << 52);
    let y = p * scale;
    if x < -708.0 {
        0.0
    } else if x > 709.0 {
        f64::INFINITY
    } else {
        y
    }
}

/// ln x: -inf at 0, NaN below 0 and for NaN, +inf at +inf. Subnormal x is scaled up first.
#[inline(always)]
pub(crate) fn ln(x: f64) -> f64 {
    const TINY: f64 = f64::MIN_POSITIVE;
    let sub = x < TINY;
    // 2^54 brings a subnormal into the normal range.
    let xs = if sub { x * 18014398509481984.0 } else { x };
    let bits = xs.to_bits();
    // The unbiased exponent and the mantissa in [1, 2).
    let e_bits = (bits >> 52) & 0x7ff;
    let m1 = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
    let big = m1 > std::f64::consts::SQRT_2;
    let m = if big { m1 * 0.5 } else { m1 };
    // e = e_bits - 1023 (+1 when halved, -54 when scaled), as a float64 without an int
    // conversion instruction: 2^52 + e_bits read as a float is exact.
    let ef = f64::from_bits(0x4330_0000_0000_0000 | e_bits) - 4503599627370496.0;
    let e = ef - 1023.0 + if big { 1.0 } else { 0.0 } - if sub { 54.0 } else { 0.0 };
    let ln_m = two_atanh((m - 1.0) / (m + 1.0));
    let y = e.mul_add(LN2_HI, e.mul_add(LN2_LO, ln_m));
    if x == 0.0 {
        f64::NEG_INFINITY
    } else if x < 0.0 || x.is_nan() {
        f64::NAN
    } else if x == f64::INFINITY {
        f64::INFINITY
    } else {
        y
    }
}

/// The largest |f| [`two_atanh`] takes: (sqrt 2 - 1) / (sqrt 2 + 1), f of m in [1/sqrt 2, sqrt 2].
pub(crate) const ATANH_MAX: f64 = 0.171_572_875_253_809_9;

/// `2 atanh(f) = ln((1 + f) / (1 - f))` for |f| <= [`ATANH_MAX`]: the odd series to f^23 (the
/// next term is below 2^-60 of the result). So `ln(p / q) = two_atanh((p - q) / (p + q))` when
/// p / q is within a factor sqrt 2 of 1, with one division fewer than `ln(p / q)`.
#[inline(always)]
pub(crate) fn two_atanh(f: f64) -> f64 {
    let s = f * f;
    let mut p: f64 = 1.0 / 23.0;
    p = p.mul_add(s, 1.0 / 21.0);
    p = p.mul_add(s, 1.0 / 19.0);
    p = p.mul_add(s, 1.0 / 17.0);
    p = p.mul_add(s, 1.0 / 15.0);
    p = p.mul_add(s, 1.0 / 13.0);
    p = p.mul_add(s, 1.0 / 11.0);
    p = p.mul_add(s, 1.0 / 9.0);
    p = p.mul_add(s, 1.0 / 7.0);
    p = p.mul_add(s, 1.0 / 5.0);
    p = p.mul_add(s, 1.0 / 3.0);
    let two_f = f + f;
    (two_f * s).mul_add(p, two_f)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units in the last place.
    fn ulps(a: f64, b: f64) -> u64 {
        let key = |v: f64| {
            let b = v.to_bits() as i64;
            if b < 0 {
                i64::MIN - b
            } else {
                b
            }
        };
        key(a).abs_diff(key(b))
    }

    #[test]
    fn exp_within_two_ulp() {
        let mut rng = crate::test_rng::Lcg(1);
        let mut worst = 0;
        for i in 0..2_000_000 {
            let u = (rng.step() >> 11) as f64 / (1u64 << 53) as f64;
            // most of them where softmax evaluates it (x - max <= 0), the rest anywhere
            let x = if i % 4 == 0 {
                u * 1400.0 - 700.0
            } else {
                -u * u * 40.0
            };
            worst = worst.max(ulps(exp(x), x.exp()));
        }
        assert!(worst <= 2, "{worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f64::NEG_INFINITY), 0.0);
        assert_eq!(exp(-1000.0), 0.0);
        assert_eq!(exp(1000.0), f64::INFINITY);
        assert!(exp(f64::NAN).is_nan());
        assert!(ulps(exp(709.0), 709f64.exp()) <= 2);
        assert!(ulps(exp(-707.9), (-707.9f64).exp()) <= 2);
    }

    #[test]
    fn ln_within_two_ulp() {
        let mut rng = crate::test_rng::Lcg(2);
        let mut worst = 0;
        for i in 0..2_000_000 {
            let u = (rng.step() >> 11) as f64 / (1u64 << 53) as f64;
            let x = match i % 3 {
                // ratios of nearby probabilities: where the KL's accuracy matters
                0 => 1.0 + (u - 0.5) * 1e-3,
                1 => (u * 40.0 - 20.0).exp(),
                _ => f64::from_bits(rng.step() >> 2), // any positive float, subnormals too
            };
            if x > 0.0 && x.is_finite() {
                worst = worst.max(ulps(ln(x), x.ln()));
            }
        }
        assert!(worst <= 2, "{worst} ulp");
        assert_eq!(ln(1.0), 0.0);
        assert_eq!(ln(0.0), f64::NEG_INFINITY);
        assert_eq!(ln(f64::INFINITY), f64::INFINITY);
        assert!(ln(-1.0).is_nan() && ln(f64::NAN).is_nan());
        assert!(ulps(ln(f64::from_bits(1)), f64::from_bits(1).ln()) <= 2);
        assert!(ulps(ln(f64::MAX), f64::MAX.ln()) <= 2);
    }

    #[test]
    fn two_atanh_is_the_log_ratio() {
        let mut rng = crate::test_rng::Lcg(3);
        let mut worst = 0;
        for _ in 0..1_000_000 {
            let q = (rng.step() >> 11) as f64 / (1u64 << 53) as f64 + 1e-3;
            let u = (rng.step() >> 11) as f64 / (1u64 << 53) as f64;
            // p / q anywhere in [1/sqrt 2, sqrt 2], most of them close to 1
            let r = if u < 0.5 {
                1.0 + (u - 0.25) * 1e-4
            } else {
                0.7072 + (u - 0.5) * 1.4
            };
            let p = q * r;
            let f = (p - q) / (p + q);
            assert!(f.abs() <= ATANH_MAX, "{r}");
            // ln(1 + (p - q) / q): p - q is exact, so this is accurate to an ulp or two of
            // the (small) result, unlike the log of the rounded ratio p / q
            worst = worst.max(ulps(two_atanh(f), ((p - q) / q).ln_1p()));
        }
        assert!(worst <= 4, "{worst} ulp");
    }
}
