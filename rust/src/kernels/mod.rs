//! CPU kernels over contiguous little-endian buffers. Callers allocate every output; kernels
//! only read inputs and fill outputs, so they never own tensor memory.

pub mod consensus;
pub mod gta;
pub mod random;
pub mod reduce;
pub mod sparsify;

pub use reduce::{convert, weighted_sum, WeightedInput};

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
