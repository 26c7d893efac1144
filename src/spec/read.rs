//! Reading a spec: the TOML file, layered with the environment and `--set` overrides
//! (figment), extracted into `Spec`, then checked; the errors name the file, the key and what
//! would be right.

use super::Spec;
use crate::model::Preset;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use std::path::{Path, PathBuf};

/// One `--set key=value`: a dotted key path and a TOML value (bare words are strings).
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    pub key: String,
    pub value: toml::Value,
}

impl std::str::FromStr for Override {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (key, raw) = s
            .split_once('=')
            .ok_or_else(|| format!("--set {s:?}: expected key=value, e.g. train.lr=1e-3"))?;
        let key = key.trim().to_string();
        if key.is_empty() {
            return Err(format!("--set {s:?}: the key is empty"));
        }
        let raw = raw.trim();
        let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.to_string()));
        Ok(Self { key, value })
    }
}

/// The tables of a spec; `TERNLAB_<SECTION>__<KEY>` variables (and `TERNLAB_NAME`) layer
/// over the file, other `TERNLAB_*` variables are not spec keys.
const SECTIONS: &[&str] = &["model", "data", "quant", "train", "eval", "run", "distill"];

/// What follows `TERNLAB_` in a variable of the spec's environment layer: `NAME` or
/// `<SECTION>__<KEY>`, in any case.
fn is_spec_suffix(k: &str) -> bool {
    let k = k.to_ascii_lowercase();
    k == "name" || SECTIONS.iter().any(|s| k.starts_with(&format!("{s}__")))
}

/// Whether the environment variable `name` is part of the spec's environment layer (the
/// prefix in any case and the name trimmed, as the layer reads it).
pub fn is_spec_variable(name: &str) -> bool {
    let name = name.trim();
    name.get(..8)
        .is_some_and(|p| p.eq_ignore_ascii_case("TERNLAB_"))
        && is_spec_suffix(&name[8..])
}

/// The layers of a spec, lowest first: the seed's defaults, the file (without its `[sweep]`
/// table), the environment (`TERNLAB_TRAIN__LR=1e-3`), the `--set` overrides.
pub fn layers(file_table: &toml::Table, overrides: &[Override]) -> Figment {
    let text = toml::to_string(file_table).expect("a parsed table serializes");
    let mut fig = Figment::from(Serialized::defaults(Spec::default()))
        .merge(Toml::string(&text))
        .merge(
            Env::prefixed("TERNLAB_")
                .filter(|k| is_spec_suffix(k.as_str()))
                .split("__"),
        );
    for o in overrides {
        fig = fig.merge(Serialized::global(&o.key, &o.value));
    }
    fig
}

/// Reads a spec file as a TOML table; the error names the file, line and column.
pub fn read_table(path: &Path) -> anyhow::Result<toml::Table> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| BadInput(format!("{}: cannot read the spec: {e}", path.display())))?;
    parse_table(&text, path)
}

/// Parses spec text (`path` names it in messages).
pub fn parse_table(text: &str, path: &Path) -> anyhow::Result<toml::Table> {
    toml::from_str::<toml::Table>(text)
        .map_err(|e| BadInput(format!("{}: not valid TOML: {e}", path.display())).into())
}

/// Deserializes layered values into a `Spec`. Errors name the file and the key path, and
/// for an unknown key the nearest valid one.
pub fn extract(fig: &Figment, file: &Path) -> anyhow::Result<Spec> {
    fig.extract::<Spec>().map_err(|e| {
        let mut msgs = Vec::new();
        for err in e {
            let key = err.path.join(".");
            let mut msg = match &err.kind {
                figment::error::Kind::UnknownField(field, _) => {
                    let full = if key.is_empty() || key.ends_with(field.as_str()) {
                        key.clone()
                    } else {
                        format!("{key}.{field}")
                    };
                    let mut m = format!("unknown key `{full}`");
                    if let Some(near) = nearest_key(&full) {
                        m.push_str(&format!("; did you mean `{near}`?"));
                    }
                    m
                }
                kind if key.is_empty() => kind.to_string(),
                kind => format!("key `{key}`: {kind}"),
            };
            if let Some(src) = err.metadata.as_ref().map(|m| m.name.to_string()) {
                if src.contains("environment") {
                    msg.push_str(&format!(" (from the {src})"));
                }
            }
            msgs.push(msg);
        }
        BadInput(format!("{}: {}", file.display(), msgs.join("; "))).into()
    })
}

/// Reads, layers and deserializes a spec that has no `[sweep]`.
pub fn load(path: &Path, overrides: &[Override]) -> anyhow::Result<Spec> {
    let mut table = read_table(path)?;
    table.remove("sweep");
    extract(&layers(&table, overrides), path)
}

/// Every key path a spec accepts (`train.lr`, `model.preset`, ...).
pub fn known_keys() -> Vec<String> {
    let mut full = Spec::default();
    full.model.preset = Some(Preset::Tiny);
    full.model.tokenizer = Some(PathBuf::new());
    // (keys left out of a written spec at their default)
    full.quant.granularity = crate::quant::Granularity::Tensor;
    full.quant.scale = crate::quant::ScaleRule::Absmax;
    full.quant.scale_dtype = crate::quant::ScaleDtype::F16;
    full.quant.exclude_layers = vec![0];
    full.quant.lambda_warmup_steps = 1;
    full.quant.activation_bits = 8;
    full.quant.scale_lr = 2.0;
    full.distill.weight = 1.0;
    full.train.save = crate::export::Save::Ternary;
    full.train.checkpoint_every = 1;
    full.run.devices = 2;
    let table = toml::Table::try_from(&full).expect("a spec serializes");
    let mut keys = Vec::new();
    fn walk(prefix: &str, t: &toml::Table, keys: &mut Vec<String>) {
        for (k, v) in t {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                toml::Value::Table(inner) => walk(&path, inner, keys),
                _ => keys.push(path),
            }
        }
    }
    walk("", &table, &mut keys);
    keys
}

/// The valid key closest to `key` by edit distance, if it is plausibly a typo of it.
pub fn nearest_key(key: &str) -> Option<String> {
    let mut keys = known_keys();
    keys.extend(SECTIONS.iter().map(|s| s.to_string()));
    keys.push("sweep".into());
    let leaf = key.rsplit('.').next().unwrap_or(key);
    keys.into_iter()
        .map(|k| {
            let k_leaf = k.rsplit('.').next().unwrap_or(&k).to_string();
            let d = edit_distance(key, &k).min(edit_distance(leaf, &k_leaf) + 1);
            (d, k)
        })
        .filter(|(d, k)| *d <= 3.max(k.len() / 3))
        .min()
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Input that is wrong before any training starts (the CLI exits with code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);

fn bad(file: &Path, key: &str, value: impl std::fmt::Debug, want: &str) -> anyhow::Error {
    BadInput(format!(
        "{}: key `{key}` = {value:?}: {want}",
        file.display()
    ))
    .into()
}

impl Spec {
    /// Checks every value that can be checked without the model or the data (names of closed
    /// sets were checked as they were read).
    pub fn check(&self, file: &Path) -> anyhow::Result<()> {
        let (d, t, e) = (&self.data, &self.train, &self.eval);
        if self.name.is_empty() || self.name.contains(['/', '\\']) || self.name.starts_with('.') {
            return Err(bad(
                file,
                "name",
                &self.name,
                "a non-empty folder name without '/'",
            ));
        }
        if !(d.val_fraction > 0.0 && d.val_fraction < 1.0) {
            return Err(bad(
                file,
                "data.val_fraction",
                d.val_fraction,
                "must be in (0, 1)",
            ));
        }
        for (key, v) in [
            ("data.seq_len", d.seq_len),
            ("data.batch_size", d.batch_size),
            ("train.steps", t.steps),
        ] {
            if v == 0 {
                return Err(bad(file, key, v, "must be at least 1"));
            }
        }
        if !(t.lr > 0.0 && t.lr.is_finite()) {
            return Err(bad(file, "train.lr", t.lr, "must be a finite number > 0"));
        }
        for (i, b) in t.betas.iter().enumerate() {
            if !(0.0..1.0).contains(b) {
                return Err(bad(
                    file,
                    &format!("train.betas[{i}]"),
                    b,
                    "must be in [0, 1)",
                ));
            }
        }
        if !(0.0..=1.0).contains(&t.min_lr_ratio) {
            return Err(bad(
                file,
                "train.min_lr_ratio",
                t.min_lr_ratio,
                "must be in [0, 1]",
            ));
        }
        if t.eps.is_nan() || t.eps <= 0.0 {
            return Err(bad(file, "train.eps", t.eps, "must be > 0"));
        }
        if t.weight_decay.is_nan() || t.weight_decay < 0.0 {
            return Err(bad(
                file,
                "train.weight_decay",
                t.weight_decay,
                "must be >= 0",
            ));
        }
        let ds = &self.distill;
        if !(ds.weight >= 0.0 && ds.weight.is_finite()) {
            return Err(bad(
                file,
                "distill.weight",
                ds.weight,
                "must be a finite number >= 0 (0: no distillation)",
            ));
        }
        if !(ds.temperature > 0.0 && ds.temperature.is_finite()) {
            return Err(bad(
                file,
                "distill.temperature",
                ds.temperature,
                "must be a finite number > 0",
            ));
        }
        if ![0, 8].contains(&self.quant.activation_bits) {
            return Err(bad(
                file,
                "quant.activation_bits",
                self.quant.activation_bits,
                "must be 0 (off) or 8",
            ));
        }
        let sl = self.quant.scale_lr;
        if !(sl > 0.0 && sl.is_finite()) {
            return Err(bad(
                file,
                "quant.scale_lr",
                sl,
                "must be a finite number > 0 (a multiplier of train.lr for learned scales)",
            ));
        }
        if e.prompts.iter().any(|p| p.is_empty()) {
            return Err(bad(
                file,
                "eval.prompts",
                "",
                "prompts must not be empty strings",
            ));
        }
        let n = self.run.devices;
        if n == 0 {
            return Err(bad(file, "run.devices", n, "must be at least 1"));
        }
        if n > 1 {
            if !matches!(self.run.device, crate::device::DeviceChoice::Cuda(_)) {
                return Err(bad(
                    file,
                    "run.devices",
                    n,
                    "data parallelism runs on CUDA GPUs: set run.device = \"cuda\" (or \"cuda:K\", \
                     the first of the cards)",
                ));
            }
            if d.batch_size % n != 0 {
                return Err(bad(
                    file,
                    "run.devices",
                    n,
                    &format!(
                        "must divide data.batch_size = {} (each GPU takes an equal share)",
                        d.batch_size
                    ),
                ));
            }
            if !cfg!(feature = "nccl") {
                return Err(bad(
                    file,
                    "run.devices",
                    n,
                    "needs a build with NCCL: cargo build --release --features cuda,nccl",
                ));
            }
        }
        Ok(())
    }
}

/// A `--set` key must be a spec key (not `sweep`).
pub fn check_override_key(file: &Path, key: &str) -> anyhow::Result<()> {
    if known_keys().iter().any(|k| k == key) {
        return Ok(());
    }
    let hint = nearest_key(key)
        .map(|k| format!("; did you mean `{k}`?"))
        .unwrap_or_default();
    Err(BadInput(format!(
        "{}: --set {key}: not a spec key{hint}",
        file.display()
    ))
    .into())
}
