//! Reading finished runs back: `compare` (one row per configuration, statistics over seeds)
//! and `diff` (two runs side by side: config keys, metrics, where the loss curves part).

use crate::report::{Report, RunStatus};
use anyhow::{Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A finished run read from its folder.
#[derive(Debug, Clone)]
pub struct RunResult {
    pub dir: PathBuf,
    pub report: Report,
    /// The resolved config flattened to `key.path -> value` (TOML-like text).
    pub config: BTreeMap<String, String>,
}

/// Flattens JSON objects into dotted keys; leaves (arrays included) become compact JSON text.
pub fn flatten(value: &serde_json::Value) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    fn walk(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&p, v, out);
                }
            }
            serde_json::Value::String(s) => {
                out.insert(prefix.to_string(), s.clone());
            }
            other => {
                out.insert(prefix.to_string(), other.to_string());
            }
        }
    }
    walk("", value, &mut out);
    out
}

pub fn read_run(dir: &Path) -> Result<RunResult> {
    let path = dir.join("report.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let report: Report =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let config = flatten(&report.config);
    Ok(RunResult {
        dir: dir.to_path_buf(),
        report,
        config,
    })
}

/// Every run folder of an experiment that has a report, and how many have none.
pub fn read_experiment(dir: &Path) -> Result<(Vec<RunResult>, usize)> {
    let mut runs = Vec::new();
    let mut without = 0;
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("reading results folder {}", dir.display()))?;
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .filter(|p| {
            // (.locks/, and the job scripts and output of `sweep --slurm`: not runs)
            !p.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                n.starts_with('.') || n == crate::slurm::FOLDER
            })
        })
        .collect();
    dirs.sort();
    for d in dirs {
        if d.join("report.json").is_file() {
            runs.push(read_run(&d)?);
        } else {
            without += 1;
        }
    }
    Ok((runs, without))
}

/// Keys that never define a configuration: the seed (we aggregate over it) and the device.
const NOT_CONFIG: &[&str] = &["train.seed", "run.device"];

pub const METRICS: &[&str] = &[
    "final_loss",
    "last_20_loss_avg",
    "val_ppl",
    "val_nll",
    "gap_recovered",
    "tokens_per_s",
];

fn metric(r: &Report, name: &str) -> Option<f64> {
    Some(match name {
        "final_loss" => r.final_loss,
        "last_20_loss_avg" => r.last_20_loss_avg,
        "first_5_loss_avg" => r.first_5_loss_avg,
        "val_ppl" => r.val_ppl,
        "val_nll" => r.val_nll,
        "tokens_per_s" => r.tokens_per_s,
        "wall_time_s" => r.wall_time_s,
        "gap_recovered" => Some(r.recovery.as_ref()?.gap_recovered).filter(|g| !g.is_nan())?,
        _ => return None,
    })
}

/// mean, sample standard deviation (0 for one value), n.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Stat {
    pub mean: f64,
    pub std: f64,
    pub n: usize,
}

pub fn stat(xs: &[f64]) -> Stat {
    let n = xs.len();
    let mean = xs.iter().sum::<f64>() / n as f64;
    let var = if n > 1 {
        xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64
    } else {
        0.0
    };
    Stat {
        mean,
        std: var.sqrt(),
        n,
    }
}

/// One configuration: the values of the keys that vary across the experiment, and the
/// statistics of each metric over its seeds.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub config: BTreeMap<String, String>,
    pub seeds: Vec<String>,
    pub metrics: BTreeMap<String, Stat>,
    #[serde(skip)]
    pub runs: Vec<usize>,
}

pub struct Comparison {
    pub varying: Vec<String>,
    pub rows: Vec<Row>,
}

/// Groups completed runs by their config without the seed; sorts by `sort_metric`
/// (ascending, but descending for throughput).
pub fn compare(runs: &[RunResult], sort_metric: &str) -> Result<Comparison> {
    anyhow::ensure!(
        METRICS.contains(&sort_metric),
        "--metric {sort_metric:?}: expected one of {METRICS:?}"
    );
    let completed: Vec<(usize, &RunResult)> = runs
        .iter()
        .enumerate()
        .filter(|(_, r)| r.report.status == RunStatus::Completed)
        .collect();
    let key_of = |r: &RunResult| -> BTreeMap<String, String> {
        r.config
            .iter()
            .filter(|(k, _)| !NOT_CONFIG.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    let mut groups: BTreeMap<BTreeMap<String, String>, Vec<usize>> = BTreeMap::new();
    for (i, r) in &completed {
        groups.entry(key_of(r)).or_default().push(*i);
    }
    let all_keys: std::collections::BTreeSet<&String> =
        groups.keys().flat_map(|g| g.keys()).collect();
    let varying: Vec<String> = all_keys
        .into_iter()
        .filter(|k| {
            let vals: std::collections::BTreeSet<Option<&String>> =
                groups.keys().map(|g| g.get(*k)).collect();
            vals.len() > 1
        })
        .cloned()
        .collect();
    let mut rows: Vec<Row> = groups
        .into_iter()
        .map(|(g, members)| {
            let metrics = METRICS
                .iter()
                .map(|m| {
                    let xs: Vec<f64> = members
                        .iter()
                        .filter_map(|&i| metric(&runs[i].report, m))
                        .collect();
                    (m.to_string(), stat(&xs))
                })
                .collect();
            Row {
                config: varying
                    .iter()
                    .map(|k| (k.clone(), g.get(k).cloned().unwrap_or_else(|| "-".into())))
                    .collect(),
                seeds: members
                    .iter()
                    .map(|&i| runs[i].report.seed.to_string())
                    .collect(),
                metrics,
                runs: members,
            }
        })
        .collect();
    let descending = matches!(sort_metric, "tokens_per_s" | "gap_recovered");
    rows.sort_by(|a, b| {
        let (x, y) = (a.metrics[sort_metric].mean, b.metrics[sort_metric].mean);
        let o = x.partial_cmp(&y).unwrap_or(std::cmp::Ordering::Equal);
        if descending {
            o.reverse()
        } else {
            o
        }
    });
    Ok(Comparison { varying, rows })
}

fn fmt_stat(s: &Stat, m: &str) -> String {
    let p = match m {
        "tokens_per_s" => 0,
        "val_ppl" => 2,
        _ => 4,
    };
    if s.n > 1 {
        format!("{:.p$} ± {:.p$}", s.mean, s.std)
    } else {
        format!("{:.p$}", s.mean)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Markdown,
    Csv,
    Json,
}

pub fn render(c: &Comparison, format: Format) -> Result<String> {
    let mut header: Vec<String> = c.varying.clone();
    header.push("n".into());
    header.extend(METRICS.iter().map(|m| m.to_string()));
    let cells = |r: &Row| -> Vec<String> {
        let mut v: Vec<String> = c.varying.iter().map(|k| r.config[k].clone()).collect();
        v.push(r.seeds.len().to_string());
        v.extend(METRICS.iter().map(|m| fmt_stat(&r.metrics[*m], m)));
        v
    };
    Ok(match format {
        Format::Json => serde_json::to_string_pretty(&c.rows)?,
        Format::Csv => {
            let mut w = csv::Writer::from_writer(Vec::new());
            let mut h: Vec<String> = c.varying.clone();
            h.push("n".into());
            for m in METRICS {
                h.push(format!("{m}_mean"));
                h.push(format!("{m}_std"));
            }
            w.write_record(&h)?;
            for r in &c.rows {
                let mut v: Vec<String> = c.varying.iter().map(|k| r.config[k].clone()).collect();
                v.push(r.seeds.len().to_string());
                for m in METRICS {
                    v.push(r.metrics[*m].mean.to_string());
                    v.push(r.metrics[*m].std.to_string());
                }
                w.write_record(&v)?;
            }
            String::from_utf8(w.into_inner()?)?
        }
        Format::Markdown => {
            let mut s = format!("| {} |\n", header.join(" | "));
            s.push_str(&format!("|{}\n", "---|".repeat(header.len())));
            for r in &c.rows {
                s.push_str(&format!("| {} |\n", cells(r).join(" | ")));
            }
            s
        }
        Format::Table => {
            let body: Vec<Vec<String>> = c.rows.iter().map(cells).collect();
            let widths: Vec<usize> = (0..header.len())
                .map(|i| {
                    body.iter()
                        .map(|r| r[i].chars().count())
                        .chain([header[i].len()])
                        .max()
                        .unwrap_or(0)
                })
                .collect();
            let line = |cells: &[String]| {
                cells
                    .iter()
                    .zip(&widths)
                    .map(|(c, w)| format!("{c:>w$}"))
                    .collect::<Vec<_>>()
                    .join("  ")
                    + "\n"
            };
            let mut s = line(&header);
            for r in &body {
                s.push_str(&line(r));
            }
            s
        }
    })
}

/// Where two loss curves part: the first step whose losses differ by more than `tol`
/// (relative), and the largest difference.
#[derive(Debug, Clone, PartialEq)]
pub struct Parting {
    pub first_step: Option<usize>,
    pub max_abs_diff: f64,
    pub max_at: usize,
    pub common_steps: usize,
}

pub fn parting(a: &[f64], b: &[f64], tol: f64) -> Parting {
    let n = a.len().min(b.len());
    let mut p = Parting {
        first_step: None,
        max_abs_diff: 0.0,
        max_at: 0,
        common_steps: n,
    };
    for i in 0..n {
        let d = (a[i] - b[i]).abs();
        if p.first_step.is_none() && d > tol * a[i].abs().max(b[i].abs()).max(1.0) {
            p.first_step = Some(i);
        }
        if d > p.max_abs_diff {
            p.max_abs_diff = d;
            p.max_at = i;
        }
    }
    if p.first_step.is_none() && a.len() != b.len() {
        p.first_step = Some(n);
    }
    p
}

/// The text of `ternlab diff A B`.
pub fn diff(a: &RunResult, b: &RunResult) -> String {
    let mut s = format!(
        "A: {}\nB: {}\n\nconfig:\n",
        a.dir.display(),
        b.dir.display()
    );
    let keys: std::collections::BTreeSet<&String> =
        a.config.keys().chain(b.config.keys()).collect();
    let mut any = false;
    for k in keys {
        let (va, vb) = (a.config.get(k), b.config.get(k));
        if va != vb {
            any = true;
            let show = |v: Option<&String>| v.cloned().unwrap_or_else(|| "(unset)".into());
            s.push_str(&format!("  {k}: {} -> {}\n", show(va), show(vb)));
        }
    }
    if !any {
        s.push_str("  (identical)\n");
    }
    s.push_str(&format!(
        "\n{:<18} {:>12} {:>12} {:>12} {:>9}\n",
        "metric", "A", "B", "B - A", "change"
    ));
    let mut names = vec!["first_5_loss_avg"];
    names.extend(METRICS);
    names.push("wall_time_s");
    for m in names {
        // A metric one of the runs does not have (no recovery gap: `gap_recovered`) is NaN.
        let (x, y) = (
            metric(&a.report, m).unwrap_or(f64::NAN),
            metric(&b.report, m).unwrap_or(f64::NAN),
        );
        let rel = if x != 0.0 {
            format!("{:+.2}%", (y - x) / x.abs() * 100.0)
        } else {
            "-".into()
        };
        s.push_str(&format!(
            "{m:<18} {x:>12.4} {y:>12.4} {:>+12.4} {rel:>9}\n",
            y - x
        ));
    }
    s.push_str(&format!(
        "{:<18} {:>12} {:>12}\n",
        "ternary_ok", a.report.ternary_ok, b.report.ternary_ok
    ));
    let p = parting(&a.report.loss_curve, &b.report.loss_curve, 1e-6);
    s.push_str("\nloss curves: ");
    match p.first_step {
        None => s.push_str(&format!("identical over all {} steps\n", p.common_steps)),
        Some(i) if i >= p.common_steps => s.push_str(&format!(
            "identical over the {} common steps; lengths differ ({} vs {})\n",
            p.common_steps,
            a.report.loss_curve.len(),
            b.report.loss_curve.len()
        )),
        Some(i) => s.push_str(&format!(
            "part at step {i} ({:.6} vs {:.6}); largest difference {:.4} at step {}\n",
            a.report.loss_curve[i], b.report.loss_curve[i], p.max_abs_diff, p.max_at
        )),
    }
    s
}
