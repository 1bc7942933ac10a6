//! The tests' deterministic numbers: one 64-bit linear congruential generator (Knuth's MMIX
//! constants), so every test's data is reproducible without a dependency.

pub struct Lcg(pub u64);

impl Lcg {
    /// The next state.
    pub fn step(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0
    }

    /// A uniform value in [-1, 1) from the state's high 24 bits.
    pub fn unit(&mut self) -> f32 {
        ((self.step() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}
