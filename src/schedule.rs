//! The learning-rate schedule of a run, the seed's `lr_at`: linear warm-up, then cosine decay.
//! Its own module because both the training loop (which sets the lr of every step) and the
//! optimizer (which starts at step 0's lr) read it.

use crate::spec::TrainSpec;

/// Learning rate at `step` (0-based), as the seed's `lr_at`:
/// 1. linear warm-up to `lr` over `warmup_steps` (step 0 already gets lr / warmup);
/// 2. cosine decay from `lr` to `min_lr_ratio * lr` over the remaining steps, then flat.
pub fn lr_at(t: &TrainSpec, step: usize) -> f64 {
    if step < t.warmup_steps {
        return t.lr * (step + 1) as f64 / t.warmup_steps as f64;
    }
    let span = t.steps.saturating_sub(t.warmup_steps).max(1);
    let progress = ((step - t.warmup_steps) as f64 / span as f64).min(1.0);
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    t.lr * (t.min_lr_ratio + (1.0 - t.min_lr_ratio) * cosine)
}
