//! The learning-rate schedule: linear warm-up, then cosine decay to zero.

/// Learning rate as a function of the 0-based step.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Schedule {
    /// Peak learning rate, reached at the end of warm-up.
    pub base: f64,
    /// Steps of linear warm-up from `base / warmup` to `base`.
    pub warmup: usize,
    /// Total steps of the run; the rate reaches zero after the last one.
    pub total: usize,
}

impl Schedule {
    /// Step `s` (0-based): `base * (s+1)/warmup` during warm-up, then
    /// `base * (1 + cos(pi * t)) / 2` with `t` going from 0 at the first step after warm-up
    /// towards 1 at `total`.
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.base * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let t = ((step - self.warmup) as f64 / span).min(1.0);
        self.base * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_linearly_then_follows_a_half_cosine() {
        let s = Schedule { base: 0.4, warmup: 4, total: 104 };
        assert!((s.lr(0) - 0.1).abs() < 1e-12);
        assert!((s.lr(3) - 0.4).abs() < 1e-12);
        assert!((s.lr(4) - 0.4).abs() < 1e-12, "first step after warm-up is the peak");
        assert!((s.lr(54) - 0.2).abs() < 1e-12, "half way through the decay is half the peak");
        assert!(s.lr(103) > 0.0 && s.lr(103) < 1e-3);
        for step in 4..103 {
            assert!(s.lr(step + 1) <= s.lr(step), "decay is monotone at step {step}");
        }
    }

    #[test]
    fn no_warmup_starts_at_the_peak() {
        let s = Schedule { base: 1.0, warmup: 0, total: 10 };
        assert_eq!(s.lr(0), 1.0);
        assert!((s.lr(5) - 0.5).abs() < 1e-12);
    }
}
