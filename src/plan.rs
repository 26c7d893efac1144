//! Sweep expansion: a spec's `[sweep]` table becomes a list of fully resolved runs, each with
//! a run id that is readable (the swept values), short, unique (a short config hash) and the
//! same on every machine.
//!
//! ```toml
//! [sweep]
//! "train.lr" = [1e-4, 5e-4]          # grid axes: every combination
//! "train.seed" = [0, 1, 2]
//! [[sweep.zip]]                      # one axis whose keys vary together
//! "train.lr" = [1e-3, 3e-3]
//! "train.warmup_steps" = [10, 30]
//! ```
//! Axes are crossed in the order written, the last one varying fastest. `--set` and the
//! environment layer over the file before expansion; a `--set` on a grid key pins that axis
//! to the one value (the runs keep their ids).

use crate::spec::{self, BadInput, Override, Spec};
use figment::providers::Serialized;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// One sweep axis: keys varied together, and the tuple of values of each point.
#[derive(Debug, Clone, PartialEq)]
pub struct Axis {
    pub keys: Vec<String>,
    pub points: Vec<Vec<toml::Value>>,
}

/// A fully resolved run of a plan.
#[derive(Debug, Clone)]
pub struct PlannedRun {
    pub spec: Spec,
    /// The swept keys and this run's values, in axis order.
    pub swept: Vec<(String, toml::Value)>,
    pub config_hash: String,
    pub id: String,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub file: PathBuf,
    pub name: String,
    pub axes: Vec<Axis>,
    pub runs: Vec<PlannedRun>,
}

fn bad(file: &Path, msg: String) -> anyhow::Error {
    BadInput(format!("{}: {msg}", file.display())).into()
}

fn list_values(file: &Path, key: &str, v: &toml::Value) -> anyhow::Result<Vec<toml::Value>> {
    match v {
        toml::Value::Array(a) if !a.is_empty() => Ok(a.clone()),
        toml::Value::Array(_) => Err(bad(
            file,
            format!("sweep key `{key}` has an empty list; give at least one value"),
        )),
        other => Err(bad(
            file,
            format!(
                "sweep key `{key}` = {other}: a sweep axis is a list of values, e.g. [{other}]"
            ),
        )),
    }
}

fn check_key(file: &Path, key: &str) -> anyhow::Result<()> {
    if key == "name" {
        return Err(bad(
            file,
            "sweep key `name`: the experiment name cannot be swept".into(),
        ));
    }
    if spec::known_keys().iter().any(|k| k == key) {
        return Ok(());
    }
    let hint = spec::nearest_key(key)
        .map(|k| format!("; did you mean `{k}`?"))
        .unwrap_or_default();
    Err(bad(
        file,
        format!("sweep key `{key}` is not a spec key{hint}"),
    ))
}

/// Reads the `[sweep]` table into axes.
pub fn parse_axes(file: &Path, sweep: &toml::Table) -> anyhow::Result<Vec<Axis>> {
    let mut axes = Vec::new();
    for (key, value) in sweep {
        if key == "zip" {
            let groups = match value {
                toml::Value::Array(a) => a.clone(),
                t @ toml::Value::Table(_) => vec![t.clone()],
                _ => {
                    return Err(bad(
                        file,
                        "sweep.zip must be tables of equal-length lists ([[sweep.zip]])".into(),
                    ))
                }
            };
            for g in groups {
                let table = g.as_table().ok_or_else(|| {
                    bad(
                        file,
                        "each [[sweep.zip]] entry must be a table of lists".into(),
                    )
                })?;
                let mut keys = Vec::new();
                let mut columns = Vec::new();
                for (k, v) in table {
                    check_key(file, k)?;
                    keys.push(k.clone());
                    columns.push(list_values(file, k, v)?);
                }
                let n = columns.first().map(Vec::len).unwrap_or(0);
                if n == 0 {
                    return Err(bad(file, "a [[sweep.zip]] entry has no keys".into()));
                }
                if let Some((k, c)) = keys.iter().zip(&columns).find(|(_, c)| c.len() != n) {
                    return Err(bad(
                        file,
                        format!(
                            "sweep.zip: `{k}` has {} values but `{}` has {n}; zipped lists \
                             must have the same length",
                            c.len(),
                            keys[0]
                        ),
                    ));
                }
                let points = (0..n)
                    .map(|i| columns.iter().map(|c| c[i].clone()).collect())
                    .collect();
                axes.push(Axis { keys, points });
            }
        } else {
            check_key(file, key)?;
            let values = list_values(file, key, value)?;
            axes.push(Axis {
                keys: vec![key.clone()],
                points: values.into_iter().map(|v| vec![v]).collect(),
            });
        }
    }
    let mut seen = std::collections::HashSet::new();
    for k in axes.iter().flat_map(|a| &a.keys) {
        if !seen.insert(k) {
            return Err(bad(file, format!("sweep key `{k}` appears on two axes")));
        }
    }
    Ok(axes)
}

/// Stable hash of what determines a run's results: the resolved spec except `[run]` (the
/// device does not change the experiment) and `train.checkpoint_every` (a resumed run's curve
/// is the uninterrupted one's).
pub fn config_hash(spec: &Spec) -> String {
    let mut s = spec.clone();
    s.run = Default::default();
    s.train.checkpoint_every = 0;
    let text = toml::to_string(&s).expect("a spec serializes");
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A value as it appears in a run id: short and safe in a file name (projection names lose
/// their `_proj`: `q+k+v+o`; an empty list is `none`).
fn id_value(v: &toml::Value) -> String {
    let raw = match v {
        toml::Value::String(s) => s.strip_suffix("_proj").unwrap_or(s).to_string(),
        toml::Value::Array(a) if a.is_empty() => "none".into(),
        toml::Value::Array(a) => a.iter().map(id_value).collect::<Vec<_>>().join("+"),
        other => other.to_string(),
    };
    raw.chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '+' => c,
            _ => '-',
        })
        .collect()
}

/// `lr=0.001_seed=1_3fa2c9e1`: the swept values by their last key segment (the whole path
/// where two keys share one), then 8 hex digits of the config hash. Without a sweep:
/// `seed=0_<hash8>`.
pub fn run_id(spec: &Spec, swept: &[(String, toml::Value)], hash: &str) -> String {
    let leaf = |k: &str| k.rsplit('.').next().unwrap_or(k).to_string();
    let mut parts: Vec<String> = swept
        .iter()
        .map(|(k, v)| {
            let clash = swept.iter().filter(|(o, _)| leaf(o) == leaf(k)).count() > 1;
            let label = if clash { k.replace('.', "-") } else { leaf(k) };
            format!("{label}={}", id_value(v))
        })
        .collect();
    if parts.is_empty() {
        parts.push(format!("seed={}", spec.train.seed));
    }
    parts.push(hash[..8].to_string());
    parts.join("_")
}

/// Expands a spec file into its runs, each resolved and checked (static checks only; the
/// model and data are checked by `run::prepare`).
pub fn plan(file: &Path, overrides: &[Override]) -> anyhow::Result<Plan> {
    plan_table(file, spec::read_table(file)?, overrides)
}

/// As `plan`, for a spec already parsed (`file` names it in messages).
pub fn plan_table(
    file: &Path,
    mut table: toml::Table,
    overrides: &[Override],
) -> anyhow::Result<Plan> {
    let sweep = match table.remove("sweep") {
        None => toml::Table::new(),
        Some(toml::Value::Table(t)) => t,
        Some(_) => return Err(bad(file, "`sweep` must be a table ([sweep])".into())),
    };
    let mut axes = parse_axes(file, &sweep)?;
    for o in overrides {
        spec::check_override_key(file, &o.key)?;
        if let Some(a) = axes
            .iter()
            .find(|a| a.keys.len() > 1 && a.keys.contains(&o.key))
        {
            return Err(bad(
                file,
                format!(
                    "--set {}: that key is zipped with {:?} in [[sweep.zip]]; \
                     edit the spec instead",
                    o.key, a.keys
                ),
            ));
        }
        // A --set on a grid key pins that axis to the given value; the axis stays, so the
        // run keeps the id it has in the full sweep.
        for a in axes.iter_mut().filter(|a| a.keys == [o.key.clone()]) {
            a.points = vec![vec![o.value.clone()]];
        }
    }
    let base = spec::layers(&table, overrides);
    let base_spec = spec::extract(&base, file)?;

    let mut combos: Vec<Vec<(String, toml::Value)>> = vec![vec![]];
    for axis in &axes {
        combos = combos
            .into_iter()
            .flat_map(|c| {
                axis.points.iter().map(move |p| {
                    let mut c = c.clone();
                    c.extend(axis.keys.iter().cloned().zip(p.iter().cloned()));
                    c
                })
            })
            .collect();
    }
    let mut runs = Vec::with_capacity(combos.len());
    for swept in combos {
        let mut fig = base.clone();
        for (k, v) in &swept {
            fig = fig.merge(Serialized::global(k, v));
        }
        let at = swept
            .iter()
            .map(|(k, v)| format!("{k} = {v}"))
            .collect::<Vec<_>>()
            .join(", ");
        let with_context = |e: anyhow::Error| -> anyhow::Error {
            if at.is_empty() {
                e
            } else {
                BadInput(format!("{e:#} (in the sweep run with {at})")).into()
            }
        };
        let spec = spec::extract(&fig, file).map_err(with_context)?;
        spec.check(file).map_err(with_context)?;
        let config_hash = config_hash(&spec);
        let id = run_id(&spec, &swept, &config_hash);
        runs.push(PlannedRun {
            spec,
            swept,
            config_hash,
            id,
        });
    }
    let mut ids = std::collections::HashSet::new();
    for r in &runs {
        if !ids.insert(&r.id) {
            return Err(bad(
                file,
                format!(
                    "two sweep runs resolve to the same config ({}); remove the repeated value",
                    r.id
                ),
            ));
        }
    }
    Ok(Plan {
        file: file.to_path_buf(),
        name: base_spec.name,
        axes,
        runs,
    })
}
