//! Times decoding and encoding the metadata of real images with the stasis codec and with
//! ciborium (which wrote the images before it), and checks that both give the same bytes.
//!
//! cargo run --release -p stasis-image --example codec_bench -- DIR... [--runs N] [--only decode|encode]

use stasis_image::format::{Header, HEADER_PAGE};
use stasis_image::{cbor, Image, IMAGE_FILE};
use std::path::Path;
use std::time::{Duration, Instant};

fn median_ms(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1000.0
}

fn time<T>(runs: usize, mut f: impl FnMut() -> T) -> f64 {
    let mut t = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        let out = std::hint::black_box(f());
        t.push(start.elapsed());
        drop(out);
    }
    median_ms(t)
}

/// Medians of `a` and `b` run alternately, so that a change in the machine's load hits
/// both alike.
fn time_pair<T, U>(runs: usize, mut a: impl FnMut() -> T, mut b: impl FnMut() -> U) -> (f64, f64) {
    let (mut ta, mut tb) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    for _ in 0..runs {
        let start = Instant::now();
        let out = std::hint::black_box(a());
        ta.push(start.elapsed());
        drop(out);
        let start = Instant::now();
        let out = std::hint::black_box(b());
        tb.push(start.elapsed());
        drop(out);
    }
    (median_ms(ta), median_ms(tb))
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut runs = 20;
    if let Some(i) = args.iter().position(|a| a == "--runs") {
        runs = args.get(i + 1).and_then(|n| n.parse().ok()).expect("--runs N");
        args.drain(i..i + 2);
    }
    let mut only = None;
    if let Some(i) = args.iter().position(|a| a == "--only") {
        only = args.get(i + 1).cloned();
        args.drain(i..i + 2);
    }
    for dir in &args {
        let path = Path::new(dir).join(IMAGE_FILE);
        let file = std::fs::read(&path).expect("read image");
        let header = Header::decode(&path, &file[..HEADER_PAGE as usize]).expect("header");
        let meta = &file[header.meta_offset as usize..header.file_len() as usize];

        let ours: Image = cbor::from_slice(meta).expect("stasis codec decodes");
        let theirs: Image = ciborium::from_reader(meta).expect("ciborium decodes");
        assert!(ours == theirs, "{dir}: the two decoders disagree");
        let ours_bytes = cbor::to_vec(&ours).expect("stasis codec encodes");
        let mut theirs_bytes = Vec::new();
        ciborium::into_writer(&theirs, &mut theirs_bytes).expect("ciborium encodes");
        assert!(ours_bytes == theirs_bytes, "{dir}: the two encoders disagree");
        assert!(ours_bytes == meta, "{dir}: re-encoding changes the bytes");

        // For profiling one side alone (perf record).
        match only.as_deref() {
            Some("decode") => {
                time(runs, || cbor::from_slice::<Image>(meta).unwrap());
                continue;
            }
            Some("encode") => {
                time(runs, || cbor::to_vec(&ours).unwrap());
                continue;
            }
            _ => {}
        }
        let (dec_c, dec_s) =
            time_pair(runs, || ciborium::from_reader::<Image, _>(meta).unwrap(), || cbor::from_slice::<Image>(meta).unwrap());
        let (enc_c, enc_s) = time_pair(
            runs,
            || {
                let mut v = Vec::new();
                ciborium::into_writer(&ours, &mut v).unwrap();
                v
            },
            || cbor::to_vec(&ours).unwrap(),
        );
        println!(
            "{dir}: {} processes, {} metadata bytes; decode ciborium {dec_c:.2} ms, stasis {dec_s:.2} ms ({:.1}x); \
             encode ciborium {enc_c:.2} ms, stasis {enc_s:.2} ms ({:.1}x)",
            ours.processes.len(),
            meta.len(),
            dec_c / dec_s,
            enc_c / enc_s,
        );
    }
}
