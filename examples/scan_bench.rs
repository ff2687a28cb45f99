//! `builtin:secrets` throughput: a ~200 MB docker-archive (four layers of
//! text files, one of them gzip'd, one planted secret) written to a temp
//! folder, then `scan::secrets::scan_archive` timed. Run by `scripts/bench
//! secrets` (release build). Prints MB/s of layer data (uncompressed).

use std::io::Write;
use std::time::Instant;

fn main() {
    let mb: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200);
    let dir = tempfile::tempdir().expect("a temp folder");
    let path = dir.path().join("image.tar");
    let file = std::fs::File::create(&path).expect("creating the archive");
    let mut out = tar::Builder::new(std::io::BufWriter::new(file));
    let layers = 4;
    let per_layer = mb * 1024 * 1024 / layers;
    let mut x: u64 = 0x5eed;
    for l in 0..layers {
        let mut layer = tar::Builder::new(Vec::with_capacity(per_layer + 1024 * 1024));
        let mut written = 0;
        let mut n = 0;
        while written < per_layer {
            // Config-like text: words, numbers, `key = value` lines.
            let mut text = Vec::with_capacity(64 * 1024);
            while text.len() < 64 * 1024 {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                let w = (x >> 33) as usize;
                let _ = writeln!(
                    text,
                    "key_{} = value-{:x} some words here {}",
                    w % 997,
                    w,
                    w % 13
                );
            }
            if l == 2 && n == 7 {
                // Split so that this file holds no token-shaped string.
                let token = ["ghp", "R2d2C3poR2d2C3poR2d2C3poR2d2C3po1234"].join("_");
                let _ = writeln!(text, "token: {token}");
            }
            put(&mut layer, &format!("srv/data/{l}/{n}.conf"), &text);
            written += text.len();
            n += 1;
        }
        let tar = layer.into_inner().expect("a layer in memory");
        let data = if l == 1 {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(&tar).expect("gzip in memory");
            gz.finish().expect("gzip in memory")
        } else {
            tar
        };
        put(&mut out, &format!("{l:064x}/layer.tar"), &data);
    }
    out.into_inner()
        .expect("finishing the archive")
        .flush()
        .expect("writing the archive");
    let started = Instant::now();
    let report = stowage::scan::secrets::scan_archive(&path, &Default::default())
        .expect("scanning the archive");
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(report.total, 1, "{:?}", report.findings);
    let mib = report.bytes as f64 / 1_048_576.0;
    println!(
        "builtin:secrets: {mib:.0} MiB of layer data in {} files, {secs:.2} s, {:.0} MiB/s, {} finding",
        report.files,
        mib / secs,
        report.total
    );
}

fn put<W: Write>(t: &mut tar::Builder<W>, path: &str, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    t.append_data(&mut h, path, data).expect("appending");
}
