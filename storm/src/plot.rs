//! The storm at a glance (SVG): nodes Alive with A + PTR over time, and the distribution of
//! connect-to-Alive.

use crate::args::Args;
use crate::clients::Report;
use crate::figures::connect_to_up;
use plotters::prelude::*;
use std::path::Path;

pub fn draw(path: &Path, a: &Args, r: &Report) {
    if let Err(e) = try_draw(path, a, r) {
        eprintln!("{}: not drawn: {e}", path.display());
    }
}

fn try_draw(path: &Path, a: &Args, r: &Report) -> Result<(), Box<dyn std::error::Error>> {
    let n = r.nodes.len();
    let storm_at = r
        .nodes
        .iter()
        .filter_map(|t| t.start)
        .fold(f64::INFINITY, f64::min);
    let storm_at = if storm_at.is_finite() { storm_at } else { 0.0 };
    let curve: Vec<(f64, usize)> = r
        .up_curve
        .iter()
        .filter(|p| p.0 >= storm_at && p.0 <= r.disconnect_start)
        .map(|&(t, c)| (t - storm_at, c))
        .collect();
    let x_max = curve.last().map_or(1.0, |p| p.0).max(1.0);
    let root = SVGBackend::new(path, (1000, 820)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, bottom) = root.split_vertically(410);

    let title = format!(
        "idhal boot storm: {n} nodes ({} OpenVPN clients), {} serve, hook mode {:?}",
        a.real_clients().min(n),
        a.serve,
        a.hook_mode
    )
    .to_lowercase();
    let mut c = ChartBuilder::on(&top)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..x_max * 1.02, 0usize..(n + n / 20 + 1))?;
    c.configure_mesh()
        .x_desc("seconds since the storm began")
        .y_desc("nodes Alive with A + PTR")
        .draw()?;
    c.draw_series(LineSeries::new(curve, BLUE.stroke_width(2)))?;

    let values: Vec<f64> = r.nodes.iter().filter_map(connect_to_up).collect();
    let v_max = values.iter().copied().fold(0.0f64, f64::max).max(0.001);
    const BUCKETS: u32 = 40;
    let width = v_max / f64::from(BUCKETS);
    let bucket = |v: f64| ((v / width) as u32).min(BUCKETS - 1);
    let mut counts = vec![0u32; BUCKETS as usize];
    for &v in &values {
        counts[bucket(v) as usize] += 1;
    }
    let y_max = counts.iter().copied().max().unwrap_or(1).max(1);
    let mut h = ChartBuilder::on(&bottom)
        .caption(
            format!("connect-to-alive, {} nodes", values.len()),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(
            (0u32..BUCKETS).into_segmented(),
            0u32..(y_max + y_max / 10 + 1),
        )?;
    h.configure_mesh()
        .disable_x_mesh()
        .x_desc("seconds from a node's start to Alive with A + PTR")
        .y_desc("nodes")
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(b) | SegmentValue::Exact(b) => {
                format!("{:.1}", (f64::from(*b) + 0.5) * width)
            }
            SegmentValue::Last => String::new(),
        })
        .draw()?;
    h.draw_series(
        Histogram::vertical(&h)
            .style(BLUE.mix(0.6).filled())
            .margin(1)
            .data(values.iter().map(|&v| (bucket(v), 1u32))),
    )?;
    root.present()?;
    Ok(())
}
