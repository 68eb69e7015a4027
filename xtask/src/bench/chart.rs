//! chart.svg: grouped bars of the main metrics, each normalised to plain routing so that higher
//! is better everywhere (latency and CPU cost are inverted), with min–max whiskers.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::{
    prelude::*,
    style::text_anchor::{HPos, Pos, VPos},
};

use super::results::{METRICS, Metric, PathResult, Results};

/// In [`super::paths::ALL`] order, so a path keeps its colour whichever paths a run has; the
/// offload group repeats its references in lighter shades.
const COLORS: [RGBColor; 10] = [
    RGBColor(140, 140, 140), // routing
    RGBColor(55, 110, 190),  // nftables
    RGBColor(230, 140, 40),  // haproxy
    RGBColor(40, 150, 70),   // kpf native
    RGBColor(140, 200, 120), // kpf generic
    RGBColor(150, 90, 180),  // kpf tc
    RGBColor(200, 200, 200), // routing, offloads on
    RGBColor(140, 175, 225), // nftables, offloads on
    RGBColor(245, 195, 130), // haproxy, offloads on
    RGBColor(200, 60, 60),   // kpf tc, offloads on
];
const _: () = assert!(COLORS.len() == super::paths::ALL.len());

fn color(id: &str) -> RGBColor {
    super::paths::ALL.iter().position(|s| s.id == id).map_or(BLACK, |i| COLORS[i])
}

/// (median, low, high) of `p`'s metric relative to `reference`, oriented so higher is better.
fn relative(m: &Metric, p: &PathResult, reference: &PathResult) -> Option<(f64, f64, f64)> {
    let s = p.summary.get(m.key)?;
    let r = reference.median(m.key)?;
    if r <= 0.0 || s.min <= 0.0 {
        return None;
    }
    Some(if m.higher_is_better { (s.median / r, s.min / r, s.max / r) } else { (r / s.median, r / s.max, r / s.min) })
}

pub fn write(r: &Results, path: &Path) -> Result<()> {
    draw(r, path).map_err(|e| anyhow!("drawing {}: {e}", path.display()))
}

fn draw(r: &Results, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let metrics: Vec<&Metric> = METRICS.iter().filter(|m| m.chart.is_some()).collect();
    let reference = super::paths::by_id("routing").expect("plain routing is a path");
    // Each path against plain routing in its own offload group; no bar where that was not run
    // (the table says n/a there too).
    let values: Vec<Vec<Option<(f64, f64, f64)>>> = metrics
        .iter()
        .map(|m| {
            r.paths
                .iter()
                .map(|p| relative(m, p, r.path(&super::paths::reference_id(p.id, "routing"))?))
                .collect()
        })
        .collect();
    let top = values.iter().flatten().flatten().map(|v| v.2).fold(1.2f64, f64::max) * 1.12;

    let root = SVGBackend::new(path, (1500, 650)).into_drawing_area();
    root.fill(&WHITE)?;
    let title = if values.iter().flatten().any(Option::is_some) {
        format!(
            "kpf benchmark: relative to {} of the same offload group (= 1.0), higher is better{}",
            reference.label,
            if r.run.smoke { " — SMOKE RUN, not meaningful" } else { "" }
        )
    } else {
        format!("kpf benchmark: no bars, since this run has no {} to compare with (see results.md)", reference.label)
    };
    let (groups, paths) = (metrics.len(), r.paths.len().max(1));
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(20)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..groups as f64, 0f64..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc(format!("median ÷ {}'s median (latency, CPU: inverted)", reference.label))
        .y_label_formatter(&|y| format!("{y:.1}"))
        .draw()?;

    let slot = 0.84 / paths as f64;
    for (i, p) in r.paths.iter().enumerate() {
        let color = color(p.id);
        let bars = values.iter().enumerate().filter_map(|(g, v)| {
            let (m, _, _) = v[i]?;
            let x0 = g as f64 + 0.08 + i as f64 * slot;
            Some(Rectangle::new([(x0, 0.0), (x0 + slot * 0.88, m)], color.filled()))
        });
        chart
            .draw_series(bars)?
            .label(p.label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
        for (g, v) in values.iter().enumerate() {
            let Some((m, lo, hi)) = v[i] else { continue };
            let xc = g as f64 + 0.08 + i as f64 * slot + slot * 0.44;
            let cap = slot * 0.2;
            if hi > lo {
                let style = BLACK.stroke_width(1);
                chart.draw_series([
                    PathElement::new(vec![(xc, lo), (xc, hi)], style),
                    PathElement::new(vec![(xc - cap, lo), (xc + cap, lo)], style),
                    PathElement::new(vec![(xc - cap, hi), (xc + cap, hi)], style),
                ])?;
            }
            let label = if m >= 10.0 { format!("{m:.0}") } else { format!("{m:.2}") };
            chart.draw_series([Text::new(
                label,
                (xc, hi.max(m) + top * 0.012),
                ("sans-serif", 11).into_font().color(&BLACK).pos(Pos::new(HPos::Center, VPos::Bottom)),
            )])?;
        }
    }
    chart.draw_series([PathElement::new(vec![(0.0, 1.0), (groups as f64, 1.0)], BLACK.mix(0.6).stroke_width(1))])?;
    for (g, m) in metrics.iter().enumerate() {
        let (x, y) = chart.backend_coord(&(g as f64 + 0.5, 0.0));
        root.draw(&Text::new(
            m.chart.unwrap_or(m.key).to_string(),
            (x, y + 10),
            ("sans-serif", 15).into_font().color(&BLACK).pos(Pos::new(HPos::Center, VPos::Top)),
        ))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.4))
        .draw()?;
    root.present()?;
    Ok(())
}
