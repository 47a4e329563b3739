// Real client: Debian's SeaBIOS (int 13h over ATA PIO and virtio-blk) and a boot-sector bus-master DMA driver, counted by iovirt-vmm's bus trap counters.
//
// Traps per read for IDE PIO, IDE DMA and virtio-blk: each interface and size
// boots the BENCH boot sector, which frames N reads (N from IOVIRT_TRAP_ITERS,
// default 20) with "TRAP-MARK start"/"TRAP-MARK end" lines on the debug console;
// iovirt-vmm --trap-stats snapshots its counters at each, and the difference
// divided by N is the cost of one read, firmware start-up excluded. Prints the
// table docs/PERFORMANCE.md shows ("Traps per I/O"):
//
//     IOVIRT_TRAP_ITERS=100 cargo test -p iovirt-vmm --test traps_per_io -- --nocapture

mod common;

use std::time::Duration;

use common::{assemble, pattern_image, run_to_exit, seabios_ready, TempDir};
use serde_json::Value;

const IMAGE_SIZE: usize = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    IdePio,
    IdeDma,
    Virtio,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::IdePio => "IDE PIO (SeaBIOS int 13h)",
            Kind::IdeDma => "IDE DMA (boot-sector driver)",
            Kind::Virtio => "virtio-blk (SeaBIOS int 13h)",
        }
    }
    fn disk_opts(self) -> &'static str {
        match self {
            Kind::IdePio | Kind::IdeDma => "interface=ide,cache=writeback",
            Kind::Virtio => "cache=writeback",
        }
    }
    /// Whether a bus device name belongs to this interface's controller.
    fn owns(self, name: &str) -> bool {
        match self {
            Kind::IdePio | Kind::IdeDma => name.starts_with("ide") || name == "00:01.1-bar4",
            Kind::Virtio => name == "00:04.0-bar0",
        }
    }
}

/// Counters of one run, flattened: (space, device) -> (reads, writes); plus exits and IRQs.
#[derive(Debug, Default, Clone)]
struct Counts {
    devices: Vec<(String, f64, f64)>,
    exits: f64,
    irq_lines: f64,
    msis: f64,
}

fn num(v: &Value) -> f64 {
    v.as_u64().unwrap_or(0) as f64
}

/// The counters of one snapshot (the file's top level or a mark).
fn parse(v: &Value) -> Counts {
    let mut c = Counts::default();
    for space in ["pio", "mmio"] {
        if let Some(devs) = v[space]["devices"].as_object() {
            for (name, s) in devs {
                c.devices
                    .push((name.clone(), num(&s["reads"]), num(&s["writes"])));
            }
        }
        let u = &v[space]["unclaimed"];
        c.devices.push((
            format!("{space}-unclaimed"),
            num(&u["reads"]),
            num(&u["writes"]),
        ));
    }
    c.exits = num(&v["exits"]["io"]) + num(&v["exits"]["mmio"]);
    c.irq_lines = v["interrupts"]["line_asserts"]
        .as_object()
        .map_or(0.0, |m| m.values().map(num).sum());
    c.msis = num(&v["interrupts"]["msi_irqfd"]) + num(&v["interrupts"]["msi_signal"]);
    c
}

/// The snapshots at the "start" and "end" marks of a trap-stats file.
fn marks(json: &str) -> (Counts, Counts) {
    let v: Value = serde_json::from_str(json).expect("trap stats are JSON");
    let find = |label: &str| {
        v["marks"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["label"] == label))
            .map(parse)
            .unwrap_or_else(|| panic!("no {label:?} mark in {json}"))
    };
    (find("start"), find("end"))
}

/// Boot `kind` with `iters` reads of `sectors` sectors; the counters at the
/// start and end marks.
fn run(fw: &str, kind: Kind, iters: u32, sectors: u32) -> Option<(Counts, Counts)> {
    let tag = format!("traps-{kind:?}-{iters}-{sectors}");
    let dir = TempDir::in_target(&tag);
    let iter_def = format!("ITER={iters}");
    let sec_def = format!("SECTORS={sectors}");
    let mut defs = vec!["BENCH", iter_def.as_str(), sec_def.as_str()];
    if kind == Kind::IdeDma {
        defs.push("DMA");
    }
    let boot = assemble(&tag, &defs, &dir.path("boot.bin"))?;
    let img = dir.path("disk.img");
    pattern_image(&img, IMAGE_SIZE, &boot);
    let log = dir.path("debugcon.log");
    let stats = dir.path("traps.json");
    let (ok, text) = run_to_exit(
        &[
            "--firmware",
            fw,
            "--serial",
            "null",
            "--debugcon",
            &format!("file={}", log.display()),
            "--disk",
            &format!("path={},{}", img.display(), kind.disk_opts()),
            "--trap-stats",
            &stats.to_string_lossy(),
        ],
        &log,
        Duration::from_secs(180),
    );
    assert!(ok && text.contains("BOOT-OK"), "{tag}: log:\n{text}");
    Some(marks(
        &std::fs::read_to_string(&stats).expect("trap stats written"),
    ))
}

/// Per-read costs: (device reads, device writes, all traps, exits, IRQ line asserts, MSIs).
#[derive(Debug, Clone, Copy)]
struct PerIo {
    dev_reads: f64,
    dev_writes: f64,
    all: f64,
    exits: f64,
    irqs: f64,
    msis: f64,
}

impl PerIo {
    fn dev(&self) -> f64 {
        self.dev_reads + self.dev_writes
    }
}

fn per_io(kind: Kind, base: &Counts, run: &Counts, n: f64) -> PerIo {
    let sum = |c: &Counts, f: &dyn Fn(&str) -> bool, reads: bool, writes: bool| -> f64 {
        c.devices
            .iter()
            .filter(|(name, ..)| f(name))
            .map(|(_, r, w)| (if reads { *r } else { 0.0 }) + (if writes { *w } else { 0.0 }))
            .sum()
    };
    let owned = |name: &str| kind.owns(name);
    // The debug console carries the marks themselves.
    let any = |name: &str| name != "debugcon";
    PerIo {
        dev_reads: (sum(run, &owned, true, false) - sum(base, &owned, true, false)) / n,
        dev_writes: (sum(run, &owned, false, true) - sum(base, &owned, false, true)) / n,
        all: (sum(run, &any, true, true) - sum(base, &any, true, true)) / n,
        // Each debug-console byte of the end mark is one exit of its own.
        exits: (run.exits
            - base.exits
            - (sum(run, &|d| d == "debugcon", true, true)
                - sum(base, &|d| d == "debugcon", true, true)))
            / n,
        irqs: (run.irq_lines - base.irq_lines) / n,
        msis: (run.msis - base.msis) / n,
    }
}

#[test]
fn traps_per_read_ide_pio_dma_and_virtio() {
    let test = "traps_per_io";
    let Some(fw) = seabios_ready(test) else {
        return;
    };
    if assemble(
        test,
        &["BENCH"],
        &TempDir::in_target(test).path("probe.bin"),
    )
    .is_none()
    {
        return;
    }
    let iters: u32 = std::env::var("IOVIRT_TRAP_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(20);
    let kinds = [Kind::IdePio, Kind::IdeDma, Kind::Virtio];
    // Every boot runs at once.
    let mut jobs = Vec::new();
    for kind in kinds {
        for sectors in [8, 128] {
            let fw = fw.clone();
            jobs.push((
                kind,
                sectors,
                std::thread::spawn(move || run(&fw, kind, iters, sectors)),
            ));
        }
    }
    let mut table = Vec::new();
    eprintln!("N = {iters} reads per run");
    for (kind, sectors, j) in jobs {
        let Some((start, end)) = j.join().expect("run thread") else {
            return; // skipped (printed already)
        };
        let p = per_io(kind, &start, &end, f64::from(iters));
        let size = if sectors == 8 { "4 KiB" } else { "64 KiB" };
        eprintln!(
            "| {} | {size} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} / {:.2} |",
            kind.name(),
            p.dev_reads,
            p.dev_writes,
            p.dev(),
            p.all,
            p.exits,
            p.irqs,
            p.msis
        );
        table.push((kind, sectors, p));
    }
    let at = |kind: Kind, sectors: u32| {
        table
            .iter()
            .find(|t| t.0 == kind && t.1 == sectors)
            .map(|t| t.2)
            .expect("row present")
    };
    let (pio4, pio64) = (at(Kind::IdePio, 8), at(Kind::IdePio, 128));
    let (dma4, dma64) = (at(Kind::IdeDma, 8), at(Kind::IdeDma, 128));
    let (vio4, vio64) = (at(Kind::Virtio, 8), at(Kind::Virtio, 128));

    // IDE PIO: one 16-bit data-port read per word (SeaBIOS uses `rep insw`), plus
    // a status read or two per sector and the task-file writes of one command.
    assert!(
        (2048.0..2048.0 + 64.0).contains(&pio4.dev_reads),
        "IDE PIO 4 KiB reads: {pio4:?}"
    );
    assert!(
        (32768.0..32768.0 + 700.0).contains(&pio64.dev_reads),
        "IDE PIO 64 KiB reads: {pio64:?}"
    );
    assert!((5.0..=16.0).contains(&pio4.dev_writes), "{pio4:?}");
    // IDE DMA: the boot-sector driver's 13 port accesses, whatever the size.
    assert!(
        (12.0..=14.0).contains(&dma4.dev()),
        "IDE DMA 4 KiB: {dma4:?}"
    );
    assert!(
        (12.0..=14.0).contains(&dma64.dev()),
        "IDE DMA 64 KiB: {dma64:?}"
    );
    assert!(dma4.irqs >= 0.9, "IDE DMA waits for IRQ 14: {dma4:?}");
    // virtio-blk: the queue notify goes to an ioeventfd; SeaBIOS reads the ISR once.
    assert!(vio4.dev() <= 3.0, "virtio-blk 4 KiB: {vio4:?}");
    assert!(vio64.dev() <= 3.0, "virtio-blk 64 KiB: {vio64:?}");
    // The article's ordering.
    assert!(pio4.dev() > 100.0 * dma4.dev(), "{pio4:?} vs {dma4:?}");
    assert!(dma4.dev() >= vio4.dev(), "{dma4:?} vs {vio4:?}");
    assert!(pio64.dev() > 10.0 * pio4.dev(), "PIO grows with size");
}
