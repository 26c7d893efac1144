//! `ternlab bench`: times training steps of one run's exact configuration (by default the
//! seed's recipe on the `qwen3-0.6b` random-init preset, so nothing is downloaded) after a
//! warm-up, and reports median step time, tokens/s, achieved TFLOP/s, share of the card's
//! peak and device memory.

use crate::model::{Ops, Qwen3Config};
use crate::optim::AdamW;
use crate::run::PreparedRun;
use crate::schedule::lr_at;
use crate::spec::ComputeDtype;
use crate::trainer::{Graphs, Trainer};
use anyhow::Result;
use candle_core::Device;
use serde::Serialize;
use std::time::Instant;

/// The default benchmark spec: the baseline recipe on the qwen3-0.6b preset.
pub const DEFAULT_SPEC: &str = r#"
name = "bench"
[model]
preset = "qwen3-0.6b"
[eval]
max_new_tokens = 0
"#;

#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub run_id: String,
    pub device: String,
    pub device_name: String,
    pub dtype: ComputeDtype,
    /// "cuda-step" or "autograd" (see `Qwen3::trainer`).
    pub trainer: String,
    pub batch_size: usize,
    pub seq_len: usize,
    pub timed_steps: usize,
    pub warmup_steps: usize,
    pub median_step_s: f64,
    /// Whether the timed steps replayed from CUDA graphs (`trainer::Graphs`).
    pub cuda_graph: bool,
    /// Medians of the forward (loss included), backward and optimizer phases, each timed with
    /// a device sync at its end (so they add up to a little more than a step), over steps run
    /// launch by launch (a graph's replay is not split into phases).
    pub median_forward_s: f64,
    pub median_backward_s: f64,
    pub median_optimizer_s: f64,
    pub mean_step_s: f64,
    pub min_step_s: f64,
    pub tokens_per_s: f64,
    pub model_tflop_per_step: f64,
    pub achieved_tflops: f64,
    /// The card whose datasheet peak `share_of_peak` divides by (`card_peak`), if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_card: Option<String>,
    pub peak_tflops: Option<f64>,
    pub share_of_peak: Option<f64>,
    /// The most device memory in use at once over the steps, weights and optimizer state
    /// included (the memory pool's high watermark, like torch's max_memory_allocated). None on
    /// CPU and Metal.
    pub peak_memory_gib: Option<f64>,
    pub last_loss: f64,
    pub ternlab: String,
    /// The source of the build that ran (`report::source`).
    pub source: String,
}

/// Training FLOPs of one step: 6 per matmul parameter per token (forward + backward, the
/// output head included), plus attention's QK^T and PV over the full L x L square.
pub fn flops_per_step(cfg: &Qwen3Config, batch: usize, seq: usize) -> f64 {
    let (e, f, v) = (
        cfg.hidden_size as f64,
        cfg.intermediate_size as f64,
        cfg.vocab_size as f64,
    );
    let (h, k, d) = (
        cfg.num_attention_heads as f64,
        cfg.num_key_value_heads as f64,
        cfg.head_dim as f64,
    );
    let per_layer = e * h * d * 2.0 + e * k * d * 2.0 + 3.0 * e * f;
    let matmul_params = cfg.num_hidden_layers as f64 * per_layer + v * e;
    let tokens = (batch * seq) as f64;
    let attention = 12.0 * cfg.num_hidden_layers as f64 * h * d * seq as f64 * tokens;
    6.0 * matmul_params * tokens + attention
}

/// One card's dense peak TFLOP/s (no structured sparsity), from NVIDIA's datasheets: bf16
/// tensor cores, tf32 tensor cores, plain f32.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CardPeak {
    /// The card as the table names it (`H100 SXM`, `H100 PCIe`, ...).
    pub card: &'static str,
    pub bf16: f64,
    pub tf32: f64,
    pub f32: f64,
}

/// Known cards, by a part of the name the driver reports (`cuDeviceGetName`: "NVIDIA H100
/// 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL", ...). The first match counts, so the
/// specific forms come before the SXM parts they would also match, and H200 before H20.
const CARDS: &[(&str, CardPeak)] = &[
    (
        "H100 PCIe",
        CardPeak {
            card: "H100 PCIe",
            bf16: 756.5,
            tf32: 378.0,
            f32: 51.2,
        },
    ),
    (
        "H100 NVL",
        CardPeak {
            card: "H100 NVL",
            bf16: 835.5,
            tf32: 417.5,
            f32: 60.0,
        },
    ),
    (
        "H200 NVL",
        CardPeak {
            card: "H200 NVL",
            bf16: 835.5,
            tf32: 417.5,
            f32: 60.0,
        },
    ),
    (
        "H800 PCIe",
        CardPeak {
            card: "H800 PCIe",
            bf16: 756.5,
            tf32: 378.0,
            f32: 51.2,
        },
    ),
    (
        "GH200",
        CardPeak {
            card: "GH200",
            bf16: 989.4,
            tf32: 494.7,
            f32: 66.9,
        },
    ),
    (
        "H100",
        CardPeak {
            card: "H100 SXM",
            bf16: 989.4,
            tf32: 494.7,
            f32: 66.9,
        },
    ),
    (
        "H200",
        CardPeak {
            card: "H200 SXM",
            bf16: 989.4,
            tf32: 494.7,
            f32: 66.9,
        },
    ),
    (
        "H800",
        CardPeak {
            card: "H800 SXM",
            bf16: 989.4,
            tf32: 494.7,
            f32: 66.9,
        },
    ),
    (
        "H20",
        CardPeak {
            card: "H20",
            bf16: 148.0,
            tf32: 74.0,
            f32: 44.0,
        },
    ),
    (
        "A100",
        CardPeak {
            card: "A100",
            bf16: 312.0,
            tf32: 156.0,
            f32: 19.5,
        },
    ),
    (
        "L40S",
        CardPeak {
            card: "L40S",
            bf16: 362.05,
            tf32: 183.0,
            f32: 91.6,
        },
    ),
];

/// The peak figures of the card called `device_name`, if ternlab knows it.
pub fn card_peak(device_name: &str) -> Option<CardPeak> {
    CARDS
        .iter()
        .find(|(part, _)| device_name.contains(part))
        .map(|(_, peak)| *peak)
}

/// Dense peak TFLOP/s of the card called `device_name` at a precision, if ternlab knows it.
pub fn peak_tflops(device_name: &str, dtype: ComputeDtype) -> Option<f64> {
    card_peak(device_name).map(|c| match dtype {
        ComputeDtype::Bf16 => c.bf16,
        ComputeDtype::Tf32 => c.tf32,
        ComputeDtype::F32 => c.f32,
    })
}

fn device_name(device: &Device) -> String {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => d
            .cuda_stream()
            .context()
            .name()
            .unwrap_or_else(|_| "cuda".into()),
        Device::Cpu => format!("cpu ({} threads)", candle_core::utils::get_num_threads()),
        _ => "gpu".into(),
    }
}

/// The CUDA step's per-op times (`TERNLAB_PROFILE=1`), empty elsewhere.
fn take_profile() -> Vec<(String, f64, usize)> {
    #[cfg(feature = "cuda")]
    return crate::cuda::take_profile();
    #[cfg(not(feature = "cuda"))]
    Vec::new()
}

/// Prints the profile to stderr: ms per step by op, largest first.
fn print_profile(mut ops: Vec<(String, f64, usize)>, steps: usize) {
    if ops.is_empty() {
        return;
    }
    ops.sort_by(|a, b| b.1.total_cmp(&a.1));
    let total: f64 = ops.iter().map(|o| o.1).sum();
    eprintln!(
        "profile (TERNLAB_PROFILE=1, each op timed alone): {:.2} ms per step in {} kinds of op",
        total * 1e3 / steps as f64,
        ops.len()
    );
    for (name, secs, calls) in ops {
        eprintln!(
            "{:>9.3} ms {:>5.1}% {:>6} calls/step  {name}",
            secs * 1e3 / steps as f64,
            100.0 * secs / total,
            calls / steps
        );
    }
}

fn sync_time(device: &Device, start: Instant) -> Result<f64> {
    device.synchronize()?;
    Ok(start.elapsed().as_secs_f64())
}

pub fn bench(p: &PreparedRun, steps: usize, warmup: usize) -> Result<BenchResult> {
    let (device, device_label) = crate::device::open(p.spec.run.device)?;
    let (model, params, _) = p.build_model(&device)?;
    let (t, d) = (&p.spec.train, &p.spec.data);
    let trainer = Trainer::for_model(&model);
    let mut opt = AdamW::for_params(&params, t, model.ops() == Ops::Fused)?;
    let mut batcher = p.batcher()?;
    let mut graphs = Graphs::for_trainer(&trainer, &model, d.batch_size, d.seq_len)?;
    let mut times = Vec::with_capacity(steps);
    let mut phases: [Vec<f64>; 3] = Default::default();
    let mut last_loss = f64::NAN;
    let mut peak_memory = None;
    let mut replayed = 0;
    // The timed steps first, as the training loop runs them (replayed from CUDA graphs where
    // it can; one sync per step), then the same number launch by launch with a sync after each
    // phase.
    for step in 0..warmup + 2 * steps {
        if step == warmup {
            take_profile();
            // From here on, as torch.cuda.reset_peak_memory_stats before the reference's timed
            // steps: the weights and optimizer state count, as they are in use.
            crate::device::reset_peak_memory(&device);
        }
        let (x, y) = batcher.next_batch(&device)?;
        device.synchronize()?;
        let by_phase = step >= warmup + steps;
        let start = Instant::now();
        opt.set_learning_rate(lr_at(t, step));
        let cache = graphs.param_cache();
        let replay = if by_phase {
            None
        } else {
            graphs.step(&model, &x, &y, &mut opt)?
        };
        if let Some([loss, _]) = replay {
            last_loss = loss as f64;
            replayed += usize::from(step >= warmup);
        } else {
            let fwd = trainer.forward(&model, &x, &y)?;
            let loss = fwd.loss.clone();
            let t_fwd = by_phase.then(|| sync_time(&device, start)).transpose()?;
            let grads = fwd.backward(&model)?;
            let t_bwd = by_phase.then(|| sync_time(&device, start)).transpose()?;
            opt.step(&grads)?;
            last_loss = loss.to_scalar::<f32>()? as f64;
            if let (Some(f), Some(b)) = (t_fwd, t_bwd) {
                device.synchronize()?;
                let total = start.elapsed().as_secs_f64();
                phases[0].push(f);
                phases[1].push(b - f);
                phases[2].push(total - b);
                continue;
            }
        }
        device.synchronize()?;
        drop(cache);
        if step >= warmup {
            times.push(start.elapsed().as_secs_f64());
        }
        if step + 1 == warmup + steps {
            // (before the phase steps: their memory is the eager step's, and the graphs' memory
            // is handed back for them)
            // (the pool's peak and the graph's, which allocates from memory of its own: the
            // weights and optimizer state in the one, the step's activations in the other)
            peak_memory = crate::device::peak_memory_bytes(&device)
                .map(|b| b + crate::device::graph_memory_bytes(&device).unwrap_or(0));
            graphs = Graphs::off();
            crate::device::trim_memory_pool(&device);
        }
    }
    let median_of = |xs: &[f64]| {
        let mut v = xs.to_vec();
        v.sort_by(|a, b| a.partial_cmp(b).expect("finite times"));
        v[v.len() / 2]
    };
    print_profile(take_profile(), 2 * steps);
    let median = median_of(&times);
    let flops = flops_per_step(&p.model_cfg, d.batch_size, d.seq_len);
    let name = device_name(&device);
    let achieved = flops / median / 1e12;
    let dtype = t.dtype.resolve(&device);
    let peak = peak_tflops(&name, dtype);
    let peak_card = card_peak(&name).map(|c| c.card.to_string());
    Ok(BenchResult {
        run_id: p.run_id.clone(),
        device: device_label,
        device_name: name,
        dtype,
        trainer: trainer.name().into(),
        batch_size: d.batch_size,
        seq_len: d.seq_len,
        timed_steps: steps,
        warmup_steps: warmup,
        median_step_s: median,
        cuda_graph: replayed == steps,
        median_forward_s: median_of(&phases[0]),
        median_backward_s: median_of(&phases[1]),
        median_optimizer_s: median_of(&phases[2]),
        mean_step_s: times.iter().sum::<f64>() / times.len() as f64,
        min_step_s: times.iter().copied().fold(f64::INFINITY, f64::min),
        tokens_per_s: (d.batch_size * d.seq_len) as f64 / median,
        model_tflop_per_step: flops / 1e12,
        achieved_tflops: achieved,
        peak_card,
        peak_tflops: peak,
        share_of_peak: peak.map(|pk| achieved / pk),
        peak_memory_gib: peak_memory.map(|b| b as f64 / (1u64 << 30) as f64),
        last_loss,
        ternlab: env!("CARGO_PKG_VERSION").into(),
        source: crate::report::source().into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_hopper_form_factor_has_its_own_peak() {
        let bf16 = |n: &str| peak_tflops(n, ComputeDtype::Bf16);
        // What the driver reports for each card.
        assert_eq!(bf16("NVIDIA H100 80GB HBM3"), Some(989.4));
        assert_eq!(bf16("NVIDIA H100 PCIe"), Some(756.5));
        assert_eq!(bf16("NVIDIA H100 NVL"), Some(835.5));
        assert_eq!(bf16("NVIDIA H200"), Some(989.4));
        assert_eq!(bf16("NVIDIA H200 NVL"), Some(835.5));
        assert_eq!(bf16("NVIDIA H20"), Some(148.0));
        assert_eq!(bf16("NVIDIA GH200 480GB"), Some(989.4));
        assert_eq!(card_peak("NVIDIA H100 PCIe").unwrap().card, "H100 PCIe");
        assert_eq!(
            peak_tflops("NVIDIA A100-SXM4-80GB", ComputeDtype::Tf32),
            Some(156.0)
        );
        assert_eq!(bf16("cpu (2 threads)"), None);
    }
}
