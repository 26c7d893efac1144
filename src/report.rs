//! What a run leaves behind: `loss.csv`, streamed and flushed as training goes, and
//! `report.json`, which keeps every key of the seed's report (same meaning) and adds what
//! comparing runs needs; and `RunStatus`, how a run ended, which both report.json and the
//! runner's status.json record.

use crate::choice::{serde_by_name, Choice};
use crate::train::StepRecord;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::path::Path;

/// Streams the loss curve: one flushed row per step, so a crash keeps the curve so far.
pub struct LossCurveWriter {
    csv: csv::Writer<File>,
}

pub const LOSS_CSV_HEADER: [&str; 6] =
    ["step", "lr", "loss", "tokens_seen", "elapsed_s", "val_loss"];

impl LossCurveWriter {
    pub fn create(path: &Path) -> Result<Self> {
        let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let mut csv = csv::Writer::from_writer(file);
        csv.write_record(LOSS_CSV_HEADER)?;
        csv.flush()?;
        Ok(Self { csv })
    }

    /// Continues the curve of a run resumed at `step`: the rows of earlier steps are kept as
    /// written, later ones (trained after the checkpoint, before the run stopped) dropped.
    pub fn resume(path: &Path, step: usize) -> Result<Self> {
        let mut kept = csv::Writer::from_writer(Vec::new());
        kept.write_record(LOSS_CSV_HEADER)?;
        if path.is_file() {
            let mut rd = csv::Reader::from_path(path)
                .with_context(|| format!("reading {}", path.display()))?;
            for row in rd.records() {
                // (a row cut short by the stop that does not parse is dropped too)
                let Ok(row) = row else { continue };
                match row.get(0).and_then(|s| s.parse::<usize>().ok()) {
                    Some(s) if s < step && row.len() == LOSS_CSV_HEADER.len() => {
                        kept.write_record(&row)?
                    }
                    _ => {}
                }
            }
        }
        let kept = kept.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?;
        write_atomic(path, &kept)?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self {
            csv: csv::Writer::from_writer(file),
        })
    }

    pub fn write(&mut self, r: &StepRecord) -> Result<()> {
        self.csv.write_record([
            r.step.to_string(),
            format!("{:e}", r.lr),
            format!("{}", r.loss),
            r.tokens_seen.to_string(),
            format!("{:.3}", r.elapsed_s),
            r.val_loss.map(|v| v.to_string()).unwrap_or_default(),
        ])?;
        self.csv.flush()?;
        Ok(())
    }
}

/// How a run stands or ended: status.json's `status` (all five) and report.json's (completed,
/// diverged or interrupted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    /// Training now, or the process died while training (no process holds its lock).
    Running,
    Completed,
    /// The loss became NaN or infinite; a result, not retried without --force.
    Diverged,
    /// An error or a panic, recorded with its message.
    Failed,
    /// Ctrl-C stopped it.
    Interrupted,
}

impl Choice for RunStatus {
    const ALL: &'static [Self] = &[
        RunStatus::Running,
        RunStatus::Completed,
        RunStatus::Diverged,
        RunStatus::Failed,
        RunStatus::Interrupted,
    ];
    fn name(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Completed => "completed",
            RunStatus::Diverged => "diverged",
            RunStatus::Failed => "failed",
            RunStatus::Interrupted => "interrupted",
        }
    }
}

serde_by_name!(RunStatus);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub prompt: String,
    pub generation: String,
}

/// `report.json`. The first block is the seed's report, key for key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    #[serde(deserialize_with = "f64_or_nan")]
    pub first_5_loss_avg: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub last_20_loss_avg: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub final_loss: f64,
    pub ternary_ok: bool,
    #[serde(deserialize_with = "f64_or_nan")]
    pub ternary_max_err: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub val_nll: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub val_ppl: f64,
    pub num_steps: usize,
    pub batch_size: usize,
    pub seq_len: usize,
    pub lr_peak: f64,
    pub group_size: crate::spec::GroupSize,
    /// The quantizer's granularity in effect, scale rule and scale dtype, and the layers kept
    /// dense (`[quant]`; reports written before these keys read the seed's values).
    #[serde(default)]
    pub granularity: crate::quant::Granularity,
    #[serde(default)]
    pub scale: crate::quant::ScaleRule,
    #[serde(default)]
    pub scale_dtype: crate::quant::ScaleDtype,
    #[serde(default)]
    pub exclude_layers: Vec<usize>,
    #[serde(default)]
    pub lambda_warmup_steps: usize,
    #[serde(default)]
    pub activation_bits: u32,
    /// What training recovered of the gap that rounding opened (a completed run's; reports
    /// written before it have none).
    #[serde(default)]
    pub recovery: Option<crate::recovery::Recovery>,
    /// Under `[distill]`: its weight and temperature and the loss's two terms (the loss curve
    /// is their weighted sum).
    #[serde(default)]
    pub distill: Option<DistillReport>,
    /// With `train.save = "ternary"`: the largest absolute difference between the trained
    /// model's logits and those of the saved packed file, unpacked (`export::check_packed`, on
    /// a window of held-out tokens), and whether it is 0: a check of what was saved, which
    /// the seed's `ternary_ok` (which divides W_t by the scale it was made with) is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packed_max_err: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packed_ok: Option<bool>,
    pub n_ternary_layers: usize,
    pub n_ternary_params: usize,
    pub samples: Vec<Sample>,
    pub loss_curve: Vec<f64>,

    /// Completed, diverged or interrupted (a run that fails leaves no report).
    pub status: RunStatus,
    pub error: Option<String>,
    pub run_id: String,
    pub experiment: String,
    pub config_hash: String,
    pub config: serde_json::Value,
    pub seed: u64,
    pub device: String,
    pub dtype: crate::spec::ComputeDtype,
    /// How gradients were computed: "cuda-step" (the hand-written CUDA step) or "autograd"
    /// (the composed graph and candle's autograd; CPU, Metal, or CUDA with `run.fused = false`).
    #[serde(default)]
    pub trainer: String,
    /// Whose optimizer and parameter precision ran: "seed" (MLX's AdamW without bias
    /// correction, dense parameters in the checkpoint's dtype), "pytorch" (bias correction, all
    /// parameters f32), or "mixed" (any other combination of the two keys).
    #[serde(default)]
    pub semantics: String,
    /// The dtype the dense (not ternarized) parameters trained in: "bf16" for a Qwen3
    /// checkpoint or a preset under `train.dense_dtype = "checkpoint"`, else "f32".
    #[serde(default)]
    pub dense_dtype: String,
    pub model_origin: String,
    pub n_params: usize,
    pub ternary_bad: usize,
    pub train_tokens: usize,
    pub val_tokens: usize,
    /// The step a killed or interrupted run went on from (its newest latent checkpoint); the
    /// times then cover this process only, but `train_time_s` the whole training.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_from_step: Option<usize>,
    /// What saving checkpoints and `latent/` cost (absent when nothing was saved).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saves: Option<crate::checkpoint::SaveStats>,
    #[serde(deserialize_with = "f64_or_nan")]
    pub wall_time_s: f64,
    /// Where `wall_time_s` went, phase by phase (absent in reports of older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phases: Option<PhaseTimes>,
    #[serde(deserialize_with = "f64_or_nan")]
    pub train_time_s: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub tokens_per_s: f64,
    pub peak_memory_bytes: Option<u64>,
    /// The most memory the training step's CUDA graph allocated at once (its own memory, not
    /// in `peak_memory_bytes`; absent when no step replayed from a graph).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graph_memory_bytes: Option<u64>,
    pub versions: Versions,
}

/// Seconds of a run's phases (each ends with a device sync): opening the device and building
/// the model (loading a checkpoint), the held-out NLL of the starting model (dense and
/// rounded), training, the final held-out NLL (after checking the ternary weights), the
/// samples, and the rest (the recovery numbers, writing `ternary/` when saved).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseTimes {
    pub build_s: f64,
    pub start_nll_s: f64,
    pub train_s: f64,
    pub final_nll_s: f64,
    pub samples_s: f64,
    pub save_s: f64,
}

/// A stopwatch for `PhaseTimes`: each lap syncs the device, then reads and restarts the clock.
pub struct Laps(std::time::Instant);

impl Laps {
    pub fn start() -> Self {
        Self(std::time::Instant::now())
    }

    pub fn lap(&mut self, device: &candle_core::Device) -> f64 {
        let _ = device.synchronize();
        let t = self.0.elapsed().as_secs_f64();
        self.0 = std::time::Instant::now();
        t
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Versions {
    pub ternlab: String,
    pub candle: String,
    /// The source the build was made from: `source()` (reports written before it existed read
    /// as "unknown").
    #[serde(default = "unknown_source")]
    pub source: String,
}

fn unknown_source() -> String {
    "unknown".into()
}

impl Versions {
    pub fn current() -> Self {
        Self {
            ternlab: env!("CARGO_PKG_VERSION").to_string(),
            candle: CANDLE_VERSION.to_string(),
            source: source().to_string(),
        }
    }
}

/// The source marked so that a script can find it in the binary without running it
/// (bench/pack_device.sh checks that a build names the checkout it packs).
static SOURCE_MARK: &str = concat!("ternlab-source=", env!("TERNLAB_SOURCE"), ";");

/// The git commit this build was made from (12 hex digits), `+dirty` where its sources
/// differed from it, or "unknown" (built outside a git checkout): build.rs works it out. Read
/// through `SOURCE_MARK`, which keeps the marked string in the binary.
pub fn source() -> &'static str {
    // (black_box: the optimizer would otherwise fold the mark away)
    let mark = std::hint::black_box(SOURCE_MARK);
    &mark["ternlab-source=".len()..mark.len() - 1]
}

/// `ternlab --version`: the release and the source.
pub const VERSION_LINE: &str =
    concat!(env!("CARGO_PKG_VERSION"), " (", env!("TERNLAB_SOURCE"), ")");

/// The candle release this build is pinned to (Cargo.toml).
pub const CANDLE_VERSION: &str = "0.11.1";

/// The two terms of a distilled run's loss: the cross-entropy and the KL (times T^2, before
/// the weight), the mean of their last 20 steps and their last step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DistillReport {
    pub weight: f64,
    pub temperature: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub last_20_ce_avg: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub last_20_kl_avg: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub final_ce: f64,
    #[serde(deserialize_with = "f64_or_nan")]
    pub final_kl: f64,
}

/// JSON has no NaN: serde_json writes it as `null` (a diverged run's held-out loss); read
/// `null` back as NaN.
pub(crate) fn f64_or_nan<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Mean of the first `n` values (fewer if the curve is shorter); NaN when empty.
pub fn head_mean(xs: &[f64], n: usize) -> f64 {
    let h = &xs[..n.min(xs.len())];
    h.iter().sum::<f64>() / h.len() as f64
}

/// Mean of the last `n` values (fewer if the curve is shorter); NaN when empty.
pub fn tail_mean(xs: &[f64], n: usize) -> f64 {
    let t = &xs[xs.len().saturating_sub(n)..];
    t.iter().sum::<f64>() / t.len() as f64
}

/// Writes a file through a temporary file and a rename, so a reader (or a crash) never
/// leaves half a file.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, contents).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    write_atomic(path, serde_json::to_string_pretty(value)?.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reports written before `source` existed still read (compare, diff), as "unknown"; this
    /// build's is a commit or "unknown", and `--version` names it.
    #[test]
    fn versions_read_without_a_source_and_name_this_build() {
        let old: Versions = serde_json::from_str(r#"{"ternlab": "0.1.0", "candle": "0.11.1"}"#)
            .expect("a report's versions without a source");
        assert_eq!(old.source, "unknown");
        let now = Versions::current();
        let commit = now.source.strip_suffix("+dirty").unwrap_or(&now.source);
        let hex = commit.len() == 12 && commit.bytes().all(|b| b.is_ascii_hexdigit());
        assert!(hex || now.source == "unknown", "source {:?}", now.source);
        assert!(VERSION_LINE.ends_with(&format!("({})", now.source)));
    }
}
