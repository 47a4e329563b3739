//! The mClock paper's classic experiment in the simulator: three clients with
//! a reservation, a limit and a weight on one device whose capacity halves at
//! 60 s. Prints the per-phase throughput and draws it over time.
//!
//! `cargo run -p iovirt-sched --example mclock_paper [OUT.svg]`
//! (default: docs/img/mclock.svg in the workspace).

use std::path::PathBuf;

use iovirt_sched::sim::{mclock_paper, ServerSim, SEC};
use plotters::prelude::*;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/img/mclock.svg")
        });
    let report = ServerSim::new(mclock_paper(7))?.run();

    println!(
        "phase            {:>28} {:>28} {:>28}",
        report.names[0], report.names[1], report.names[2]
    );
    for (label, from, to) in [
        ("0-20 s, 1200", 0, 20),
        ("20-60 s, 1200", 20, 60),
        ("60-100 s, 600", 60, 100),
    ] {
        let rates: Vec<String> = (0..3)
            .map(|c| format!("{:>28.1}", report.rate(c, (from + 2) * SEC, to * SEC)))
            .collect();
        println!("{label:<16} {}", rates.join(" "));
    }

    let secs = 100usize;
    let root = SVGBackend::new(&out, (900, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "mClock: throughput per client (capacity 1200 IOPS, 600 from 60 s)",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0f64..secs as f64, 0f64..1000f64)?;
    chart
        .configure_mesh()
        .x_desc("time (s)")
        .y_desc("IOPS")
        .draw()?;
    let colours = [RED, BLUE, GREEN];
    for (c, colour) in colours.into_iter().enumerate() {
        let series = report.series(c);
        let points = series
            .iter()
            .take(secs)
            .enumerate()
            .map(|(t, &v)| (t as f64 + 0.5, v));
        chart
            .draw_series(LineSeries::new(points, colour.stroke_width(2)))?
            .label(report.names[c].clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    root.present()?;
    println!("figure: {}", out.display());
    Ok(())
}
