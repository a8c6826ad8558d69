//! SVG plots of benchmark results, drawn with plotters.

use std::path::Path;

use plotters::prelude::*;

/// A plotters error, as text: its error types hold the backend's error,
/// which need not be `Send`.
fn draw_error(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("drawing the plot: {e}")
}

/// A histogram of `values` in 30 equal bins.
pub fn histogram(path: &Path, title: &str, x_label: &str, values: &[f64]) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_error)?;
    let max = values.iter().copied().fold(1.0, f64::max);
    let bins = 30usize;
    let width = max / bins as f64;
    let mut counts = vec![0u32; bins];
    for v in values {
        counts[((v / width) as usize).min(bins - 1)] += 1;
    }
    let top = counts.iter().copied().max().unwrap_or(1).max(1);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..max * 1.02, 0u32..top + 1)
        .map_err(draw_error)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc("acquires")
        .draw()
        .map_err(draw_error)?;
    chart
        .draw_series(counts.iter().enumerate().map(|(i, &c)| {
            let x0 = i as f64 * width;
            Rectangle::new([(x0, 0), (x0 + width * 0.95, c)], BLUE.mix(0.6).filled())
        }))
        .map_err(draw_error)?;
    root.present().map_err(draw_error)
}

/// Transactions per second over time, with the run's phases shaded.
pub fn timeline(
    path: &Path,
    series: &[(f64, f64)],
    phases: &[(String, f64, f64)],
) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1000, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_error)?;
    let t_max = series.last().map_or(1.0, |(t, _)| *t);
    let y_max = series.iter().map(|(_, v)| *v).fold(1.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Ledger throughput during one backup run and its resync",
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(0.0..t_max, 0.0..y_max)
        .map_err(draw_error)?;
    chart
        .configure_mesh()
        .x_desc("time (s)")
        .y_desc("transactions per second (100 ms samples)")
        .draw()
        .map_err(draw_error)?;
    let colours = [RED, GREEN, MAGENTA, RGBColor(230, 120, 0), CYAN, BLUE];
    for (i, (name, from, to)) in phases.iter().enumerate() {
        let colour = colours[i % colours.len()];
        // Very short phases (acquire, delete) get a visible minimum width.
        let to = to.max(from + t_max / 300.0);
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(*from, 0.0), (to, y_max)],
                colour.mix(0.15).filled(),
            )))
            .map_err(draw_error)?
            .label(name.clone())
            .legend(move |(x, y)| {
                Rectangle::new([(x, y - 5), (x + 15, y + 5)], colour.mix(0.4).filled())
            });
    }
    chart
        .draw_series(LineSeries::new(
            series.iter().copied(),
            BLACK.stroke_width(2),
        ))
        .map_err(draw_error)?
        .label("ledger tps")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], BLACK.stroke_width(2)));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(draw_error)?;
    root.present().map_err(draw_error)
}
