//! Latent checkpoints: what a run needs to go on training exactly as if it had not stopped.
//!
//! A checkpoint is a folder of two files:
//! - `latent.safetensors`: every parameter under its checkpoint name in its training dtype
//!   (the ternary latents in f32, learned scales as `...weight_scale`, dense tensors as
//!   trained); the AdamW moments as `adamw.m.<name>` and `adamw.v.<name>`; and the loss curve so
//!   far as f64 (`curve.loss`, and `curve.ce` / `curve.kl` under distillation), exact, because
//!   the report's averages are taken over the whole run;
//! - `state.json`: the format, the run's config hash, the steps trained, AdamW's update count
//!   (the `t` of bias correction), the sampler's state (`data::SamplerState`), the quantizer's
//!   `lambda` at the next step (it follows from the step; recorded for readers) and the
//!   training seconds so far.
//!
//! `train.checkpoint_every = N` writes `<run>/checkpoints/step-<k>/` every N steps (and when
//! the run is interrupted), keeping the newest two; `train.save = "latent"` writes `<run>/latent/`
//! when the run completes. Each folder is written under a `.tmp` name and renamed, so a folder
//! without that suffix is complete.

use crate::data::SamplerState;
use crate::model::Params;
use crate::optim::AdamW;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const FORMAT: &str = "ternlab-latent-v1";

/// `state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub format: String,
    pub config_hash: String,
    /// Training steps done: the resumed run starts at this step.
    pub step: usize,
    pub optimizer_steps: usize,
    pub sampler: SamplerState,
    /// The quantizer's lambda at step `step` (`quant.lambda_warmup_steps`).
    pub lambda: f64,
    pub train_seconds: f64,
}

/// The training loop's state after `step` steps, as `train::train` hands it out.
pub struct Snapshot<'a> {
    pub step: usize,
    pub params: &'a Params,
    pub optimizer: &'a AdamW,
    pub sampler: SamplerState,
    pub lambda: f64,
    pub losses: &'a [f64],
    pub ce_terms: &'a [f64],
    pub kl_terms: &'a [f64],
    pub train_seconds: f64,
}

/// What `train::train` continues from.
pub struct Resume {
    pub step: usize,
    pub optimizer_steps: usize,
    /// (m, v) of every parameter, in `Params::named` order.
    pub moments: Vec<(Tensor, Tensor)>,
    pub sampler: SamplerState,
    pub losses: Vec<f64>,
    pub ce_terms: Vec<f64>,
    pub kl_terms: Vec<f64>,
    pub train_seconds: f64,
}

const CURVES: [&str; 3] = ["curve.loss", "curve.ce", "curve.kl"];

/// When the training loop saves its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotAt {
    /// Every `train.checkpoint_every` steps: `checkpoints/step-<k>/`.
    Checkpoint,
    /// Stopped by Ctrl-C (with checkpoints on): `checkpoints/step-<k>/` too.
    Interrupted,
    /// After the last step (with `train.save = "latent"` or `"both"`): `latent/`.
    End,
}

/// A snapshot copied to the host, ready to be written.
struct Host {
    tensors: HashMap<String, Tensor>,
    state: State,
}

impl Host {
    fn of(snap: &Snapshot, config_hash: &str) -> Result<Self> {
        let cpu = |t: &Tensor| t.to_device(&Device::Cpu);
        let mut tensors = HashMap::new();
        let moments = snap.optimizer.all_moments();
        anyhow::ensure!(
            moments.len() == snap.params.named.len(),
            "the optimizer holds {} parameters, the model {}",
            moments.len(),
            snap.params.named.len()
        );
        for ((name, var), (m, v)) in snap.params.named.iter().zip(moments) {
            tensors.insert(name.clone(), cpu(var.as_tensor())?);
            tensors.insert(format!("adamw.m.{name}"), cpu(m)?);
            tensors.insert(format!("adamw.v.{name}"), cpu(v)?);
        }
        for (key, curve) in CURVES
            .iter()
            .zip([snap.losses, snap.ce_terms, snap.kl_terms])
        {
            if !curve.is_empty() {
                tensors.insert(key.to_string(), Tensor::new(curve, &Device::Cpu)?);
            }
        }
        let state = State {
            format: FORMAT.into(),
            config_hash: config_hash.into(),
            step: snap.step,
            optimizer_steps: snap.optimizer.steps_taken(),
            sampler: snap.sampler.clone(),
            lambda: snap.lambda,
            train_seconds: snap.train_seconds,
        };
        Ok(Self { tensors, state })
    }

    /// Writes the checkpoint folder `dir` (replacing one that is there), atomically.
    fn write(&self, dir: &Path) -> Result<()> {
        let tmp = crate::export::sibling(dir, ".tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
        }
        std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let file = tmp.join("latent.safetensors");
        candle_core::safetensors::save(&self.tensors, &file)
            .with_context(|| format!("writing {}", file.display()))?;
        std::fs::write(
            tmp.join("state.json"),
            serde_json::to_string_pretty(&self.state)?,
        )?;
        crate::export::replace_dir(&tmp, dir)
    }
}

/// What saving cost a run (report.json's `saves`): training stalls for the copy to the host
/// and for waiting on a write still in flight, not for the write itself.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SaveStats {
    /// Snapshots saved (checkpoints and `latent/`).
    pub count: usize,
    /// Bytes of tensors in each.
    pub bytes: usize,
    /// Seconds copying the state to the host, all saves.
    pub host_copy_s: f64,
    /// Seconds writing the files (in the background), all saves.
    pub write_s: f64,
    /// Seconds training waited for a write to finish.
    pub waited_s: f64,
}

/// Saves a run's snapshots into its folder. The state is copied to the host when it is handed
/// over (training then goes on changing it); the files are written by a thread of their own, so
/// that training does not wait for the disk (5.8 GB at Qwen3-0.6B). One write is in flight at a
/// time; `wait` (also on drop) returns when it is on disk, with its error.
pub struct Saver {
    run_dir: PathBuf,
    config_hash: String,
    /// How many checkpoints under `checkpoints/` are kept.
    keep: usize,
    pending: std::sync::Mutex<Option<std::thread::JoinHandle<Result<()>>>>,
    stats: std::sync::Arc<std::sync::Mutex<SaveStats>>,
}

impl Saver {
    pub fn new(run_dir: &Path, config_hash: &str) -> Self {
        Self {
            run_dir: run_dir.to_path_buf(),
            config_hash: config_hash.to_string(),
            keep: 2,
            pending: Default::default(),
            stats: Default::default(),
        }
    }

    pub fn stats(&self) -> SaveStats {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Saves `snap` where `at` says.
    pub fn save(&self, snap: &Snapshot, at: SnapshotAt) -> Result<()> {
        self.wait()?;
        let t0 = std::time::Instant::now();
        let host = Host::of(snap, &self.config_hash)?;
        {
            let mut st = self.stats.lock().unwrap_or_else(|e| e.into_inner());
            st.count += 1;
            st.bytes = host
                .tensors
                .values()
                .map(|t| t.elem_count() * t.dtype().size_in_bytes())
                .sum();
            st.host_copy_s += t0.elapsed().as_secs_f64();
        }
        let (run_dir, keep, stats) = (self.run_dir.clone(), self.keep, self.stats.clone());
        let handle = std::thread::spawn(move || {
            let t0 = std::time::Instant::now();
            let r = match at {
                SnapshotAt::End => host.write(&run_dir.join("latent")),
                SnapshotAt::Checkpoint | SnapshotAt::Interrupted => host
                    .write(&step_dir(&run_dir, host.state.step))
                    .and_then(|()| prune(&run_dir, keep)),
            };
            stats.lock().unwrap_or_else(|e| e.into_inner()).write_s += t0.elapsed().as_secs_f64();
            r
        });
        *self.pending.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        Ok(())
    }

    /// Waits for the write in flight, if any.
    pub fn wait(&self) -> Result<()> {
        let handle = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let t0 = std::time::Instant::now();
        let joined = handle.map(|h| h.join());
        if joined.is_some() {
            self.stats
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .waited_s += t0.elapsed().as_secs_f64();
        }
        match joined {
            None => Ok(()),
            Some(Ok(r)) => r.context("saving the training state"),
            Some(Err(_)) => anyhow::bail!("the thread saving the training state panicked"),
        }
    }
}

impl Drop for Saver {
    fn drop(&mut self) {
        let _ = self.wait();
    }
}

/// Reads the state of the checkpoint folder `dir`.
pub fn read_state(dir: &Path) -> Result<State> {
    let path = dir.join("state.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let state: State = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: not a checkpoint state: {e}", path.display()))?;
    anyhow::ensure!(
        state.format == FORMAT,
        "{}: format {:?}, this ternlab reads {FORMAT:?}",
        path.display(),
        state.format
    );
    Ok(state)
}

/// Loads the checkpoint folder `dir` into `params` (each parameter set in place) and returns
/// the rest of the training state, the moments on `device`.
pub fn load(dir: &Path, params: &Params, device: &Device) -> Result<Resume> {
    let state = read_state(dir)?;
    let file = dir.join("latent.safetensors");
    let mut tensors = candle_core::safetensors::load(&file, &Device::Cpu)
        .with_context(|| format!("reading {}", file.display()))?;
    let mut take = |name: &str, like: &Tensor| -> Result<Tensor> {
        let t = tensors.remove(name).with_context(|| {
            format!(
                "{}: no tensor {name}; it was not saved by this run",
                file.display()
            )
        })?;
        anyhow::ensure!(
            t.shape() == like.shape() && t.dtype() == like.dtype(),
            "{}: {name} is {:?} {:?}, the model's {:?} {:?}",
            file.display(),
            t.shape(),
            t.dtype(),
            like.shape(),
            like.dtype()
        );
        Ok(t.to_device(device)?)
    };
    let mut moments = Vec::with_capacity(params.named.len());
    for (name, var) in &params.named {
        let p = var.as_tensor();
        var.set(&take(name, p)?)?;
        moments.push((
            take(&format!("adamw.m.{name}"), p)?,
            take(&format!("adamw.v.{name}"), p)?,
        ));
    }
    let mut curve = |key: &str| -> Result<Vec<f64>> {
        match tensors.remove(key) {
            Some(t) => Ok(t.to_dtype(DType::F64)?.to_vec1::<f64>()?),
            None => Ok(Vec::new()),
        }
    };
    let (losses, ce_terms, kl_terms) = (curve(CURVES[0])?, curve(CURVES[1])?, curve(CURVES[2])?);
    anyhow::ensure!(
        losses.len() == state.step,
        "{}: {} losses for {} steps",
        file.display(),
        losses.len(),
        state.step
    );
    Ok(Resume {
        step: state.step,
        optimizer_steps: state.optimizer_steps,
        moments,
        sampler: state.sampler,
        losses,
        ce_terms,
        kl_terms,
        train_seconds: state.train_seconds,
    })
}

/// `<run>/checkpoints`.
pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

/// The folder of the checkpoint after `step` steps.
pub fn step_dir(run_dir: &Path, step: usize) -> PathBuf {
    checkpoints_dir(run_dir).join(format!("step-{step:08}"))
}

/// The complete checkpoints of a run folder, oldest first, with their steps.
pub fn list(run_dir: &Path) -> Vec<(usize, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(checkpoints_dir(run_dir)) else {
        return Vec::new();
    };
    let mut found: Vec<(usize, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let step = name.strip_prefix("step-")?.parse().ok()?;
            Some((step, e.path()))
        })
        .filter(|(_, p)| p.join("state.json").is_file())
        .collect();
    found.sort();
    found
}

/// The newest checkpoint of the run folder that belongs to the configuration `config_hash`.
pub fn latest(run_dir: &Path, config_hash: &str) -> Option<(PathBuf, State)> {
    list(run_dir).into_iter().rev().find_map(|(_, dir)| {
        let state = read_state(&dir).ok()?;
        (state.config_hash == config_hash).then_some((dir, state))
    })
}

/// Removes all but the newest `keep` checkpoints, and any left half-written.
pub fn prune(run_dir: &Path, keep: usize) -> Result<()> {
    let all = list(run_dir);
    for (_, dir) in &all[..all.len().saturating_sub(keep)] {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    if let Ok(entries) = std::fs::read_dir(checkpoints_dir(run_dir)) {
        for e in entries.filter_map(|e| e.ok()) {
            if e.file_name().to_string_lossy().ends_with(".tmp") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    Ok(())
}
