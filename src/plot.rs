//! `ternlab plot`: loss curves per configuration (the mean over seeds, with a band from the
//! lowest to the highest seed), held-out losses as points, to PNG or SVG.

use crate::compare::{Comparison, RunResult};
use anyhow::{bail, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;
use std::sync::Once;

/// Held-out losses of a run by step, from its loss.csv.
fn val_points(run: &RunResult) -> Vec<(usize, f64)> {
    let Ok(mut rdr) = csv::Reader::from_path(run.dir.join("loss.csv")) else {
        return Vec::new();
    };
    rdr.records()
        .filter_map(|r| r.ok())
        .filter_map(|r| Some((r.get(0)?.parse().ok()?, r.get(5)?.parse().ok()?)))
        .collect()
}

struct Series {
    label: String,
    mean: Vec<(f64, f64)>,
    band: Vec<(f64, f64, f64)>,
    val: Vec<(f64, f64)>,
}

fn series(c: &Comparison, runs: &[RunResult], experiment: &str) -> Vec<Series> {
    c.rows
        .iter()
        .map(|row| {
            let curves: Vec<&Vec<f64>> = row
                .runs
                .iter()
                .map(|&i| &runs[i].report.loss_curve)
                .collect();
            let len = curves.iter().map(|c| c.len()).min().unwrap_or(0);
            let mut mean = Vec::with_capacity(len);
            let mut band = Vec::with_capacity(len);
            for s in 0..len {
                let xs: Vec<f64> = curves.iter().map(|c| c[s]).collect();
                let m = xs.iter().sum::<f64>() / xs.len() as f64;
                let lo = xs.iter().cloned().fold(f64::INFINITY, f64::min);
                let hi = xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                mean.push((s as f64, m));
                band.push((s as f64, lo, hi));
            }
            let mut by_step: std::collections::BTreeMap<usize, Vec<f64>> = Default::default();
            for &i in &row.runs {
                for (s, v) in val_points(&runs[i]) {
                    by_step.entry(s).or_default().push(v);
                }
            }
            let val = by_step
                .into_iter()
                .map(|(s, v)| (s as f64, v.iter().sum::<f64>() / v.len() as f64))
                .collect();
            // (a key a configuration leaves at its default, "-" in compare, is left out)
            let mut label = row
                .config
                .iter()
                .filter(|(_, v)| v.as_str() != "-")
                .map(|(k, v)| format!("{}={v}", k.rsplit('.').next().unwrap_or(k)))
                .collect::<Vec<_>>()
                .join(" ");
            if label.is_empty() {
                label = if row.config.is_empty() {
                    experiment.to_string()
                } else {
                    "defaults".to_string()
                };
            }
            label.push_str(&format!(" (n={})", row.runs.len()));
            Series {
                label,
                mean,
                band,
                val,
            }
        })
        .collect()
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, title: &str, all: &[Series]) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow::anyhow!("drawing: {e:?}");
    root.fill(&WHITE).map_err(err)?;
    let steps = all.iter().map(|s| s.mean.len()).max().unwrap_or(1).max(2) as f64;
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for s in all {
        for &(_, l, h) in &s.band {
            lo = lo.min(l);
            hi = hi.max(h);
        }
        for &(_, v) in &s.val {
            lo = lo.min(v);
            hi = hi.max(v);
        }
    }
    if !lo.is_finite() || !hi.is_finite() {
        bail!("no finite losses to plot");
    }
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..steps - 1.0, (lo - pad)..(hi + pad))
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("training loss (held-out: points)")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    for (i, s) in all.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        if s.band.iter().any(|&(_, l, h)| h > l) {
            let mut pts: Vec<(f64, f64)> = s.band.iter().map(|&(x, _, h)| (x, h)).collect();
            pts.extend(s.band.iter().rev().map(|&(x, l, _)| (x, l)));
            chart
                .draw_series(std::iter::once(Polygon::new(pts, color.mix(0.18).filled())))
                .map_err(err)?;
        }
        chart
            .draw_series(LineSeries::new(
                s.mean.iter().cloned(),
                color.stroke_width(2),
            ))
            .map_err(err)?
            .label(s.label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(
                s.val
                    .iter()
                    .map(|&(x, y)| Circle::new((x, y), 5, color.filled())),
            )
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

static FONT: Once = Once::new();

/// Draws the comparison's configurations into `out` (.png or .svg).
pub fn plot(c: &Comparison, runs: &[RunResult], experiment: &str, out: &Path) -> Result<()> {
    anyhow::ensure!(!c.rows.is_empty(), "no completed runs to plot");
    FONT.call_once(|| {
        // The bundled DejaVu Sans: PNG text needs no system fonts.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
    let all = series(c, runs, experiment);
    let title = format!("{experiment}: loss by configuration");
    let size = (1100, 680);
    match out.extension().and_then(|e| e.to_str()) {
        Some("png") => draw(
            BitMapBackend::new(out, size).into_drawing_area(),
            &title,
            &all,
        ),
        Some("svg") => draw(SVGBackend::new(out, size).into_drawing_area(), &title, &all),
        _ => bail!("-o {}: the picture must end in .png or .svg", out.display()),
    }
    .with_context(|| format!("plotting to {}", out.display()))
}
