//! Fuzzing of every parser that reads hostile bytes, on stable Rust (issue
//! 15). cargo-fuzz needs nightly, so this is our own small engine: seeded,
//! time-bounded, structure-aware mutation of committed seed corpora, with
//! each input run under `catch_unwind` and a counting global allocator.
//!
//! Targets (one test each; `fuzz/README.md` says how to run them longer):
//! - `agent_frame`: `split_frame` and `Request`/`Response::decode` on one
//!   frame, re-encoding what decodes;
//! - `agent_stream`: `agent::protocol::read_frame`, what the agent and the
//!   remote replica client call on a TCP stream, frame after frame;
//! - `fuse_request`: `frontend::fuse::parse_request`, every request the
//!   kernel hands the FUSE server;
//! - `dirty_map`: `DirtyMap::decode` (a file on disk), then using the map;
//! - `config`: `Config::parse` (what `load_or_init` calls on terna.toml,
//!   with its validation), re-parsing what it wrote;
//! - `class_parameters`: `VolumeClass::parse` on a StorageClass's map.
//!
//! A target fails on a panic, on a broken oracle (a round trip, an
//! invariant: those are asserts, so panics too), or when one input makes
//! more live bytes than the target's bound. Failing inputs are printed in
//! hex and saved to `fuzz/crashes/<target>/`; moved to
//! `fuzz/corpus/<target>/` they are run first, every time, as regressions.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashSet};
use std::ffi::{CStr, CString};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::{Duration, Instant};

use serde::Deserialize;

use terna::core::class::VolumeClass;
use terna::core::config::Config;
use terna::core::dirty::DirtyMap;
use terna::datapath::agent::protocol::{self, HEADER_LEN, MAX_PAYLOAD, Request, Response};
use terna::datapath::frontend::fuse::abi::*;
use terna::datapath::frontend::fuse::{Operation, ParseError, parse_request};

// ---------------------------------------------------------------- allocator

/// Counts, per thread, the bytes a fuzz input keeps live, and refuses (so
/// the process aborts, after saying which input) single allocations so
/// large that satisfying them could take the machine down.
struct Counting;

/// Above this, an allocation during a fuzz input is refused outright.
const REFUSE_ABOVE: usize = 1 << 30;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
    /// The input being run, for the report when an allocation is refused.
    static INPUT: Cell<(*const u8, usize)> = const { Cell::new((std::ptr::null(), 0)) };
    static PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
    static QUIET_PANICS: Cell<bool> = const { Cell::new(false) };
    /// Where a refused allocation's input is written (set per target).
    static REFUSED_INPUT_FILE: Cell<Option<&'static CStr>> = const { Cell::new(None) };
}

fn note_alloc(size: usize) -> bool {
    ARMED
        .try_with(|armed| {
            if !armed.get() {
                return true;
            }
            if size > REFUSE_ABOVE {
                armed.set(false);
                report_refusal(size);
                return false;
            }
            LARGEST.with(|l| l.set(l.get().max(size)));
            LIVE.with(|live| {
                let now = live.get() + size as isize;
                live.set(now);
                PEAK.with(|p| p.set(p.get().max(now)));
            });
            true
        })
        .unwrap_or(true)
}

fn note_free(size: usize) {
    let _ = ARMED.try_with(|armed| {
        if armed.get() {
            LIVE.with(|live| live.set(live.get() - size as isize));
        }
    });
}

/// Writes `bytes` to a raw fd: the allocator may not allocate.
fn raw_write(fd: i32, bytes: &[u8]) {
    // SAFETY: a valid slice; a failed write is ignored (we are about to abort).
    let _ = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
}

fn raw_write_usize(fd: i32, mut n: usize) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    raw_write(fd, &buf[i..]);
}

/// Says, without allocating, which input asked for `size` bytes, and saves
/// it; the allocation then fails and the process aborts.
fn report_refusal(size: usize) {
    let (ptr, len) = INPUT.with(Cell::get);
    raw_write(2, b"\nfuzz: an input of ");
    raw_write_usize(2, len);
    raw_write(2, b" bytes asked for one allocation of ");
    raw_write_usize(2, size);
    raw_write(2, b" bytes; refused, so the process aborts. Input hex: ");
    if !ptr.is_null() {
        // SAFETY: INPUT is set to a live slice for exactly the duration of
        // one input's run, and cleared after.
        let input = unsafe { std::slice::from_raw_parts(ptr, len) };
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for chunk in input.chunks(512) {
            let mut buf = [0u8; 1024];
            for (i, b) in chunk.iter().enumerate() {
                buf[2 * i] = HEX[usize::from(b >> 4)];
                buf[2 * i + 1] = HEX[usize::from(b & 15)];
            }
            raw_write(2, &buf[..chunk.len() * 2]);
        }
        if let Some(path) = REFUSED_INPUT_FILE.with(Cell::get) {
            // SAFETY: a NUL-terminated path; the fd is closed below.
            let fd = unsafe {
                libc::open(
                    path.as_ptr(),
                    libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
                    0o644,
                )
            };
            if fd >= 0 {
                raw_write(fd, input);
                // SAFETY: fd was opened above.
                unsafe { libc::close(fd) };
                raw_write(2, b"\nfuzz: saved to ");
                raw_write(2, path.to_bytes());
            }
        }
    }
    raw_write(2, b"\n");
}

// SAFETY: every method forwards to System with the same layout; the
// bookkeeping only touches const-initialised thread-locals without
// destructors (no allocation, no re-entry).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !note_alloc(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !note_alloc(layout.size()) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note_free(layout.size());
        // SAFETY: forwarded; ptr came from System with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !note_alloc(new_size) {
            return std::ptr::null_mut();
        }
        // SAFETY: forwarded; ptr came from System with this layout.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if new.is_null() {
            note_free(new_size);
        } else {
            note_free(layout.size());
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

// --------------------------------------------------------------------- rng

/// xorshift64*: tiny, seedable, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform-ish in `0..n` (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

// ---------------------------------------------------------------- mutation

const INTERESTING_8: [u8; 9] = [0, 1, 0x7f, 0x80, 0xff, 0xfe, b'\n', b'"', b'='];
const INTERESTING_32: [u32; 12] = [
    0,
    1,
    27,
    28,
    255,
    256,
    4096,
    0x7fff_ffff,
    0x8000_0000,
    u32::MAX,
    u32::MAX - 1,
    MAX_PAYLOAD,
];
const INTERESTING_64: [u64; 10] = [
    0,
    1,
    63,
    64,
    1 << 20,
    1 << 32,
    i64::MAX as u64,
    1 << 63,
    u64::MAX,
    u64::MAX - 1,
];

/// Text tokens every text target may splice in, besides its own.
const TEXT_TOKENS: [&str; 22] = [
    "\0",
    "\u{202e}",
    "é",
    "𝕏",
    "\u{feff}",
    "\r\n",
    " ",
    "\t",
    "\"",
    "'",
    "\\",
    "=",
    "[",
    "]",
    "{",
    "}",
    ",",
    "#",
    "18446744073709551616",
    "-1",
    "1e999",
    "99999999999999999999999999999999",
];

/// One random edit of `data`; `pool` is for splicing, `tokens` for text.
fn mutate_once(data: &mut Vec<u8>, rng: &mut Rng, pool: &[Vec<u8>], tokens: &[&[u8]]) {
    let len = data.len();
    match rng.below(16) {
        0 if len > 0 => {
            let i = rng.below(len);
            data[i] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let i = rng.below(len);
            data[i] = *rng.pick(&INTERESTING_8);
        }
        2 if len >= 4 => {
            let i = rng.below(len - 3);
            let v = *rng.pick(&INTERESTING_32);
            let v = if rng.chance(2) { v } else { v.swap_bytes() };
            data[i..i + 4].copy_from_slice(&v.to_le_bytes());
        }
        3 if len >= 8 => {
            // Aligned offsets are where our formats keep their u64 fields.
            let i = if rng.chance(2) {
                rng.below(len / 8) * 8
            } else {
                rng.below(len - 7)
            };
            data[i..i + 8].copy_from_slice(&rng.pick(&INTERESTING_64).to_le_bytes());
        }
        4 if len > 0 => {
            let i = rng.below(len);
            let delta = rng.below(35) as u8;
            data[i] = if rng.chance(2) {
                data[i].wrapping_add(delta)
            } else {
                data[i].wrapping_sub(delta)
            };
        }
        5 if len > 0 => data.truncate(rng.below(len)),
        6 => {
            let n = 1 + rng.below(64);
            for _ in 0..n {
                data.push(rng.next() as u8);
            }
        }
        7 => {
            let at = rng.below(len + 1);
            let n = 1 + rng.below(16);
            let byte = rng.next() as u8;
            data.splice(at..at, std::iter::repeat_n(byte, n));
        }
        8 if len > 1 => {
            let at = rng.below(len);
            let n = 1 + rng.below((len - at).min(64));
            data.drain(at..at + n);
        }
        9 if len > 1 => {
            // Duplicate a chunk somewhere else.
            let from = rng.below(len);
            let n = 1 + rng.below((len - from).min(256));
            let chunk = data[from..from + n].to_vec();
            let at = rng.below(len + 1);
            data.splice(at..at, chunk);
        }
        10 if !pool.is_empty() => {
            // Splice: a prefix of this one and a suffix of another.
            let other = rng.pick(pool);
            let cut = rng.below(len + 1);
            let from = rng.below(other.len() + 1);
            data.truncate(cut);
            data.extend_from_slice(&other[from..]);
        }
        11 if !tokens.is_empty() => {
            let token = *rng.pick(tokens);
            let at = rng.below(len + 1);
            data.splice(at..at, token.iter().copied());
        }
        12 if !tokens.is_empty() && len > 0 => {
            // Overwrite a run with a token (a value replaced by another).
            let token = *rng.pick(tokens);
            let at = rng.below(len);
            let end = (at + token.len()).min(len);
            data.splice(at..end, token.iter().copied());
        }
        13 if len > 0 => {
            // Line-level: duplicate, drop or swap lines (keys repeated,
            // tables reordered).
            let mut lines: Vec<Vec<u8>> = data.split(|b| *b == b'\n').map(<[u8]>::to_vec).collect();
            let i = rng.below(lines.len());
            match rng.below(3) {
                0 => {
                    let line = lines[i].clone();
                    lines.insert(rng.below(lines.len() + 1), line);
                }
                1 => {
                    lines.remove(i);
                }
                _ => {
                    let j = rng.below(lines.len());
                    lines.swap(i, j);
                }
            }
            *data = lines.join(&b'\n');
        }
        14 if len > 0 => {
            // A run of digits becomes a huge or odd number.
            let at = rng.below(len);
            if let Some(start) = data[at..].iter().position(u8::is_ascii_digit) {
                let start = at + start;
                let end = data[start..]
                    .iter()
                    .position(|b| !b.is_ascii_digit())
                    .map_or(len, |e| start + e);
                let numbers: [&[u8]; 8] = [
                    b"0",
                    b"255",
                    b"256",
                    b"4294967296",
                    b"18446744073709551615",
                    b"18446744073709551616",
                    b"340282366920938463463374607431768211456",
                    b"1e308",
                ];
                data.splice(start..end, rng.pick(&numbers).iter().copied());
            }
        }
        _ => {
            // A fresh random input, now and then.
            if rng.chance(8) {
                let n = rng.below(128);
                *data = (0..n).map(|_| rng.next() as u8).collect();
            } else if len > 0 {
                let i = rng.below(len);
                data[i] = rng.next() as u8;
            } else {
                data.push(rng.next() as u8);
            }
        }
    }
}

/// Havoc: a few edits stacked.
fn mutate(data: &mut Vec<u8>, rng: &mut Rng, pool: &[Vec<u8>], tokens: &[&[u8]]) {
    let most = if rng.chance(4) { 16 } else { 4 };
    let n = 1 + rng.below(most);
    for _ in 0..n {
        mutate_once(data, rng, pool, tokens);
    }
    // No target needs more than this to be reached; bigger inputs only
    // slow the run down.
    data.truncate(256 << 10);
}

// ------------------------------------------------------------------ engine

/// A parser under fuzz.
struct Target {
    name: &'static str,
    /// Seeds built by the real encoders and the real files.
    seeds: fn() -> Vec<Vec<u8>>,
    /// Runs one input; returns a small feature (what the parser made of
    /// it) so that inputs reaching something new are kept and mutated
    /// further. Panics on a bug.
    run: fn(&[u8]) -> u64,
    /// Repairs what a format checks first (lengths, checksums) on some
    /// mutants, so mutation reaches the code behind those checks.
    fixup: fn(&mut [u8], &mut Rng),
    tokens: &'static [&'static str],
    /// The most live bytes one input of `n` bytes may make.
    alloc_bound: fn(usize) -> usize,
}

#[derive(Debug)]
struct Failure {
    target: &'static str,
    what: String,
    input: Vec<u8>,
    saved: Option<PathBuf>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = &self.input[..self.input.len().min(4096)];
        write!(
            f,
            "{}: {} on an input of {} bytes (saved: {}): {}{}",
            self.target,
            self.what,
            self.input.len(),
            self.saved
                .as_ref()
                .map_or("no".to_string(), |p| p.display().to_string()),
            hex(shown),
            if shown.len() < self.input.len() {
                "…"
            } else {
                ""
            }
        )
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// Where failing inputs are saved: `TERNA_FUZZ_CRASHES`, else fuzz/crashes.
fn crash_dir() -> PathBuf {
    std::env::var_os("TERNA_FUZZ_CRASHES")
        .map(PathBuf::from)
        .unwrap_or_else(|| fuzz_dir().join("crashes"))
}

fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if QUIET_PANICS.with(Cell::get) {
                ARMED.with(|a| a.set(false));
                let at = info
                    .location()
                    .map(|l| format!("{}:{}", l.file(), l.line()))
                    .unwrap_or_default();
                let msg = info
                    .payload()
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| info.payload().downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                PANIC.with(|p| *p.borrow_mut() = Some(format!("panic at {at}: {msg}")));
            } else {
                default(info);
            }
        }));
    });
}

/// Runs one input; `Err` says what went wrong.
fn run_one(target: &Target, input: &[u8]) -> Result<u64, String> {
    INPUT.with(|i| i.set((input.as_ptr(), input.len())));
    LIVE.with(|l| l.set(0));
    PEAK.with(|p| p.set(0));
    LARGEST.with(|l| l.set(0));
    QUIET_PANICS.with(|q| q.set(true));
    ARMED.with(|a| a.set(true));
    let result = panic::catch_unwind(AssertUnwindSafe(|| (target.run)(input)));
    ARMED.with(|a| a.set(false));
    QUIET_PANICS.with(|q| q.set(false));
    INPUT.with(|i| i.set((std::ptr::null(), 0)));
    let peak = PEAK.with(Cell::get).max(0) as usize;
    let largest = LARGEST.with(Cell::get);
    match result {
        Err(_) => Err(PANIC
            .with(|p| p.borrow_mut().take())
            .unwrap_or_else(|| "panic".to_string())),
        Ok(_) if peak > (target.alloc_bound)(input.len()) => Err(format!(
            "unbounded allocation: {peak} bytes live at once (largest single \
             allocation {largest}), bound {} for {} input bytes",
            (target.alloc_bound)(input.len()),
            input.len()
        )),
        Ok(feature) => Ok(feature),
    }
}

fn save_crash(target: &str, input: &[u8]) -> Option<PathBuf> {
    let dir = crash_dir().join(target);
    std::fs::create_dir_all(&dir).ok()?;
    let path = dir.join(format!("crash-{:016x}", fnv(input)));
    std::fs::write(&path, input).ok()?;
    Some(path)
}

/// Shrinks a failing input while it fails the same way (same message up
/// to its first colon-separated part, e.g. the panic location).
fn minimize(target: &Target, input: &[u8], what: &str, deadline: Instant) -> Vec<u8> {
    let key = |w: &str| w.split(": ").next().unwrap_or_default().to_string();
    let want = key(what);
    let mut best = input.to_vec();
    let mut chunk = best.len() / 2;
    while chunk > 0 && Instant::now() < deadline {
        let mut at = 0;
        while at < best.len() && Instant::now() < deadline {
            let mut shorter = best.clone();
            let end = (at + chunk).min(shorter.len());
            shorter.drain(at..end);
            match run_one(target, &shorter) {
                Err(w) if key(&w) == want => best = shorter,
                _ => at += chunk,
            }
        }
        chunk /= 2;
    }
    best
}

fn corpus(target: &Target) -> Vec<Vec<u8>> {
    let mut inputs = (target.seeds)();
    let dir = fuzz_dir().join("corpus").join(target.name);
    if let Ok(entries) = std::fs::read_dir(&dir) {
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| Some(e.ok()?.path())).collect();
        paths.sort();
        for path in paths {
            if let Ok(bytes) = std::fs::read(&path) {
                inputs.push(bytes);
            }
        }
    }
    let mut seen = HashSet::new();
    inputs.retain(|i| seen.insert(fnv(i)));
    inputs
}

fn budget() -> Duration {
    let secs = std::env::var("TERNA_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(12.0);
    Duration::from_secs_f64(secs.max(0.0))
}

fn seed() -> u64 {
    std::env::var("TERNA_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
}

struct Outcome {
    runs: u64,
    pool: usize,
    failures: Vec<Failure>,
}

/// Runs every corpus input, then mutants for `budget`; collects up to
/// `max_failures` distinct failures (by what failed), each minimized and saved.
fn fuzz_for(
    target: &Target,
    seed: u64,
    budget: Duration,
    save: bool,
    max_failures: usize,
) -> Outcome {
    install_panic_hook();
    let mut rng = Rng::new(seed ^ fnv(target.name.as_bytes()));
    let mut pool = corpus(target);
    let tokens: Vec<&[u8]> = target
        .tokens
        .iter()
        .chain(TEXT_TOKENS.iter())
        .map(|t| t.as_bytes())
        .collect();
    let mut features = HashSet::new();
    let mut failures: Vec<Failure> = Vec::new();
    let mut seen_what = HashSet::new();
    let mut runs = 0u64;
    let fail = |input: &[u8], what: String, failures: &mut Vec<Failure>| {
        let input = minimize(
            target,
            input,
            &what,
            Instant::now() + Duration::from_secs(5),
        );
        let what = run_one(target, &input).err().unwrap_or(what);
        let saved = if save {
            save_crash(target.name, &input)
        } else {
            None
        };
        failures.push(Failure {
            target: target.name,
            what,
            input,
            saved,
        });
    };
    for input in pool.clone() {
        runs += 1;
        match run_one(target, &input) {
            Ok(f) => {
                features.insert(f);
            }
            Err(what) => {
                if seen_what.insert(what.split(": ").next().unwrap_or_default().to_string()) {
                    fail(&input, what, &mut failures);
                }
            }
        }
    }
    let deadline = Instant::now() + budget;
    while Instant::now() < deadline && failures.len() < max_failures {
        for _ in 0..64 {
            let mut input = rng.pick(&pool).clone();
            mutate(&mut input, &mut rng, &pool, &tokens);
            if rng.chance(2) {
                (target.fixup)(&mut input, &mut rng);
            }
            runs += 1;
            match run_one(target, &input) {
                Ok(f) => {
                    if features.insert(f) && pool.len() < 20_000 {
                        pool.push(input);
                    }
                }
                Err(what) => {
                    if seen_what.insert(what.split(": ").next().unwrap_or_default().to_string()) {
                        fail(&input, what, &mut failures);
                    }
                }
            }
        }
    }
    Outcome {
        runs,
        pool: pool.len(),
        failures,
    }
}

fn fuzz(target: &Target) {
    let seed = seed();
    let budget = budget();
    let dir = crash_dir().join(target.name);
    let _ = std::fs::create_dir_all(&dir);
    if let Ok(path) = CString::new(
        dir.join("refused-allocation")
            .into_os_string()
            .into_encoded_bytes(),
    ) {
        let path: &'static CStr = Box::leak(path.into_boxed_c_str());
        REFUSED_INPUT_FILE.with(|f| f.set(Some(path)));
    }
    let corpus_len = corpus(target).len();
    eprintln!(
        "fuzz {}: seed {seed} (TERNA_FUZZ_SEED), {:.0?} (TERNA_FUZZ_SECS), {corpus_len} corpus inputs",
        target.name, budget
    );
    let out = fuzz_for(target, seed, budget, true, 4);
    eprintln!(
        "fuzz {}: {} inputs run, {} kept, {} failure(s)",
        target.name,
        out.runs,
        out.pool,
        out.failures.len()
    );
    let report: Vec<String> = out.failures.iter().map(ToString::to_string).collect();
    assert!(
        out.failures.is_empty(),
        "fuzz {} (seed {seed}) found:\n{}",
        target.name,
        report.join("\n")
    );
}

// ------------------------------------------------------------ agent protocol

fn agent_seeds() -> Vec<Vec<u8>> {
    let p = || "pool-a".to_string();
    let n = || "pvc-1234.r0".to_string();
    let requests = vec![
        Request::Hello {
            token: b"s3cret-cluster-token".to_vec(),
            node: "node-1".into(),
            claim: 7,
        },
        Request::Hello {
            token: Vec::new(),
            node: String::new(),
            claim: 0,
        },
        Request::Create {
            pool: p(),
            name: n(),
            size: 1 << 30,
        },
        Request::Grow {
            pool: p(),
            name: n(),
            size: 2 << 30,
        },
        Request::Delete {
            pool: p(),
            name: n(),
        },
        Request::Stat {
            pool: p(),
            name: n(),
        },
        Request::Capacity { pool: p() },
        Request::Read {
            pool: p(),
            name: n(),
            offset: 4096,
            len: 1 << 20,
        },
        Request::Write {
            pool: p(),
            name: n(),
            offset: 8192,
            data: (0..4096u32).map(|i| i as u8).collect(),
        },
        Request::Write {
            pool: "x".repeat(255),
            name: "y".repeat(255),
            offset: u64::MAX,
            data: Vec::new(),
        },
        Request::Flush {
            pool: p(),
            name: n(),
        },
        Request::Discard {
            pool: p(),
            name: n(),
            offset: 0,
            len: 1 << 20,
        },
        Request::Check {
            pool: p(),
            name: n(),
        },
        Request::Fence {
            pool: p(),
            name: n(),
        },
    ];
    let responses = [
        Response::Ok,
        Response::Hello {
            node: "node-2".into(),
        },
        Response::Stat {
            size: Some(1 << 30),
        },
        Response::Stat { size: None },
        Response::Capacity { bytes: 1 << 40 },
        Response::Data {
            data: vec![0xab; 4096],
        },
        Response::Error {
            errno: libc::ENOSPC,
            message: "pool pool-a is full".into(),
        },
    ];
    let mut seeds: Vec<Vec<u8>> = requests.iter().map(|r| r.encode(1)).collect();
    seeds.extend(responses.iter().map(|r| r.encode(2)));
    // A connection's first few frames, back to back.
    seeds.push(
        [
            requests[0].encode(1),
            requests[8].encode(2),
            requests[7].encode(3),
        ]
        .concat(),
    );
    seeds.push([responses[1].encode(1), responses[5].encode(2)].concat());
    seeds
}

/// Sets the first frame's length field to what follows the header, then
/// its checksums, so mutants get past the header and payload checks.
fn agent_fixup(data: &mut [u8], rng: &mut Rng) {
    if data.len() < HEADER_LEN {
        return;
    }
    if rng.chance(3) {
        data[0..4].copy_from_slice(&protocol::MAGIC.to_le_bytes());
        data[4..6].copy_from_slice(&protocol::VERSION.to_le_bytes());
    }
    let rest = (data.len() - HEADER_LEN) as u32;
    let claimed = u32::from_le_bytes([data[16], data[17], data[18], data[19]]);
    if claimed > rest || rng.chance(2) {
        data[16..20].copy_from_slice(&rest.to_le_bytes());
    }
    let len = u32::from_le_bytes([data[16], data[17], data[18], data[19]]) as usize;
    let crc = crc32c::crc32c(&data[..20]);
    data[20..24].copy_from_slice(&crc.to_le_bytes());
    let end = (HEADER_LEN + len).min(data.len());
    let crc = crc32c::crc32c(&data[HEADER_LEN..end]);
    data[24..28].copy_from_slice(&crc.to_le_bytes());
}

/// Decodes one frame as both sides would, and checks what decodes
/// re-encodes to the same frame (requests: names are checked UTF-8, so
/// byte for byte; responses may normalise, so decode∘encode is the
/// identity on what they decode to).
fn run_agent_frame(data: &[u8]) -> u64 {
    let (header, payload) = match protocol::split_frame(data) {
        Ok(frame) => frame,
        Err(e) => return 1 + std::mem::discriminant(&e).hash_u64() % 64,
    };
    let mut feature = 100 + kind_class(header.kind) * 4;
    match Request::decode(header.kind, payload) {
        Ok(req) => {
            // Names decode lossily (the agent checks them), so the identity
            // holds on what decodes, not on the bytes.
            let again = req.encode(header.id);
            let (h, p) = protocol::split_frame(&again).expect("our own frame splits");
            assert_eq!(Request::decode(h.kind, p).as_ref(), Ok(&req));
            feature += 1;
        }
        Err(e) => feature ^= std::mem::discriminant(&e).hash_u64() << 20,
    }
    match Response::decode(header.kind, payload) {
        Ok(resp) => {
            let again = resp.encode(header.id);
            let (h, p) = protocol::split_frame(&again).expect("our own frame splits");
            assert_eq!(Response::decode(h.kind, p).as_ref(), Ok(&resp));
            feature += 2;
        }
        Err(e) => feature ^= std::mem::discriminant(&e).hash_u64() << 40,
    }
    feature
}

/// Known message kinds stand for themselves, all others for one: a new
/// unknown kind is nothing new to the decoder.
fn kind_class(kind: u16) -> u64 {
    match kind {
        1..=12 | 100..=105 => u64::from(kind),
        _ => 0,
    }
}

/// What the agent (and the remote replica client) do with a stream.
fn run_agent_stream(data: &[u8]) -> u64 {
    let mut stream = data;
    // Coarse on purpose: how many frames, what the last one was and how
    // the stream ended (a finer signature keeps every mutant).
    let mut feature = 0u64;
    for frames in 0..8u64 {
        match terna::datapath::agent::protocol::read_frame(&mut stream) {
            Ok(Some((header, payload))) => {
                assert!(payload.len() <= MAX_PAYLOAD as usize);
                assert_eq!(payload.len(), header.len as usize);
                let req = Request::decode(header.kind, &payload).is_ok();
                let resp = Response::decode(header.kind, &payload).is_ok();
                feature = (frames + 1) << 12
                    | kind_class(header.kind) << 2
                    | u64::from(req) << 1
                    | u64::from(resp);
            }
            Ok(None) => return (feature << 8) | 1,
            Err(e) => return (feature << 8) | ((e.kind().hash_u64() % 64) << 1),
        }
    }
    feature
}

trait HashU64 {
    fn hash_u64(&self) -> u64;
}

impl<T: std::hash::Hash> HashU64 for T {
    fn hash_u64(&self) -> u64 {
        use std::hash::Hasher;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.hash(&mut h);
        h.finish()
    }
}

/// Only copies of what the input holds: a name decodes lossily, which
/// can triple it (each bad byte becomes a 3-byte U+FFFD), and the oracle
/// holds the decoded message, its re-encoding and that decoded again:
/// 16 bytes per input byte, plus slack.
fn agent_frame_bound(n: usize) -> usize {
    16 * n + (64 << 10)
}

/// `read_frame` allocates the payload a header claims once that header
/// passed its checksum and the MAX_PAYLOAD limit, before the payload has
/// arrived: up to MAX_PAYLOAD from 28 bytes. Beyond that, only copies of
/// what the input holds (see `agent_frame_bound`). A claim of 4 GiB must
/// not get through.
fn agent_stream_bound(n: usize) -> usize {
    MAX_PAYLOAD as usize + 16 * n + (64 << 10)
}

#[test]
fn agent_frame() {
    fuzz(&AGENT_FRAME);
}

#[test]
fn agent_stream() {
    fuzz(&AGENT_STREAM);
}

const AGENT_FRAME: Target = Target {
    name: "agent_frame",
    seeds: agent_seeds,
    run: run_agent_frame,
    fixup: agent_fixup,
    tokens: &["TRNA"],
    alloc_bound: agent_frame_bound,
};

const AGENT_STREAM: Target = Target {
    name: "agent_stream",
    seeds: agent_seeds,
    run: run_agent_stream,
    fixup: agent_fixup,
    tokens: &["TRNA"],
    alloc_bound: agent_stream_bound,
};

// ------------------------------------------------------------ FUSE request

const FUSE_VOLUME_INO: u64 = 2;

fn encode_fuse_request(opcode: u32, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let len = size_of::<fuse_in_header>() + body.len();
    let header = fuse_in_header {
        len: len as u32,
        opcode,
        unique: 0x1234_5678,
        nodeid,
        uid: 0,
        gid: 0,
        pid: 4242,
        total_extlen: 0,
        padding: 0,
    };
    [bytes_of(&header), body].concat()
}

fn fuse_seeds() -> Vec<Vec<u8>> {
    let init = fuse_init_in {
        major: FUSE_KERNEL_VERSION,
        minor: 44,
        max_readahead: 128 << 10,
        flags: FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_MAX_PAGES | FUSE_INIT_EXT,
        flags2: FUSE_PASSTHROUGH_FLAGS2,
        ..Default::default()
    };
    let read = fuse_read_in {
        offset: 1 << 20,
        size: 1 << 20,
        ..Default::default()
    };
    let write = fuse_write_in {
        offset: 4096,
        size: 4096,
        ..Default::default()
    };
    let mut write_body = bytes_of(&write).to_vec();
    write_body.extend(std::iter::repeat_n(0x5a, 4096));
    let setattr = fuse_setattr_in {
        valid: FATTR_SIZE,
        size: 1 << 30,
        ..Default::default()
    };
    let readdir = fuse_read_in {
        size: 4096,
        ..Default::default()
    };
    let fallocate = |mode: i32| fuse_fallocate_in {
        offset: 0,
        length: 1 << 20,
        mode: mode as u32,
        ..Default::default()
    };
    let punch = fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE);
    let zero = fallocate(libc::FALLOC_FL_ZERO_RANGE);
    let forget = 1u64.to_ne_bytes();
    let batch_forget = [1u32.to_ne_bytes(), 0u32.to_ne_bytes()].concat();
    vec![
        encode_fuse_request(FUSE_INIT, 0, bytes_of(&init)),
        encode_fuse_request(FUSE_INIT, 0, &bytes_of(&init)[..16]),
        encode_fuse_request(FUSE_LOOKUP, FUSE_ROOT_ID, b"volume\0"),
        encode_fuse_request(FUSE_GETATTR, FUSE_VOLUME_INO, &[0; 16]),
        encode_fuse_request(FUSE_SETATTR, FUSE_VOLUME_INO, bytes_of(&setattr)),
        encode_fuse_request(FUSE_OPEN, FUSE_VOLUME_INO, &[0; 8]),
        encode_fuse_request(FUSE_OPENDIR, FUSE_ROOT_ID, &[0; 8]),
        encode_fuse_request(FUSE_READDIR, FUSE_ROOT_ID, bytes_of(&readdir)),
        encode_fuse_request(FUSE_READ, FUSE_VOLUME_INO, bytes_of(&read)),
        encode_fuse_request(FUSE_WRITE, FUSE_VOLUME_INO, &write_body),
        encode_fuse_request(FUSE_FSYNC, FUSE_VOLUME_INO, &[0; 16]),
        encode_fuse_request(FUSE_FLUSH, FUSE_VOLUME_INO, &[0; 24]),
        encode_fuse_request(FUSE_RELEASE, FUSE_VOLUME_INO, &[0; 24]),
        encode_fuse_request(FUSE_RELEASEDIR, FUSE_ROOT_ID, &[0; 24]),
        encode_fuse_request(FUSE_STATFS, FUSE_ROOT_ID, &[]),
        encode_fuse_request(FUSE_ACCESS, FUSE_ROOT_ID, &[0; 8]),
        encode_fuse_request(FUSE_FALLOCATE, FUSE_VOLUME_INO, bytes_of(&punch)),
        encode_fuse_request(FUSE_FALLOCATE, FUSE_VOLUME_INO, bytes_of(&zero)),
        encode_fuse_request(FUSE_FORGET, FUSE_VOLUME_INO, &forget),
        encode_fuse_request(FUSE_BATCH_FORGET, 0, &batch_forget),
        encode_fuse_request(FUSE_INTERRUPT, 0, &0x1234_5677u64.to_ne_bytes()),
        encode_fuse_request(FUSE_DESTROY, 0, &[]),
        encode_fuse_request(4242, FUSE_VOLUME_INO, &[]),
    ]
}

/// Makes `len` agree with the bytes read, and a WRITE's `size` with its
/// payload, on some mutants.
fn fuse_fixup(data: &mut [u8], rng: &mut Rng) {
    let header = size_of::<fuse_in_header>();
    if data.len() < header {
        return;
    }
    let len = data.len() as u32;
    data[0..4].copy_from_slice(&len.to_ne_bytes());
    let write = size_of::<fuse_write_in>();
    if rng.chance(2) && data.len() >= header + write {
        let payload = (data.len() - header - write) as u32;
        data[header + 16..header + 20].copy_from_slice(&payload.to_ne_bytes());
    }
}

/// Parses and checks what the server relies on: the header's length is
/// what was read, a WRITE's payload is exactly its size and inside the
/// buffer, a name stops before its NUL.
fn run_fuse(data: &[u8]) -> u64 {
    match parse_request(data) {
        Err(ParseError::Short) => {
            assert!(data.len() < size_of::<fuse_in_header>());
            1
        }
        Err(ParseError::Invalid { .. }) => 2,
        Ok(req) => {
            assert_eq!(
                read::<fuse_in_header>(data).map(|h| h.len as usize),
                Some(data.len())
            );
            match req.op {
                Operation::Write { arg, payload } => {
                    assert_eq!(payload.len(), arg.size as usize);
                    let range = data.as_ptr_range();
                    assert!(payload.as_ptr_range().start >= range.start);
                    assert!(payload.as_ptr_range().end <= range.end);
                    3 + u64::from(payload.is_empty())
                }
                Operation::Lookup { name } => {
                    assert!(!name.contains(&0));
                    5 + u64::from(name == b"volume")
                }
                Operation::Unsupported(op) => 1000 + u64::from(op.min(100)),
                op => 10 + (std::mem::discriminant(&op).hash_u64() % 64),
            }
        }
    }
}

/// parse_request is on the hot path and documented allocation-free.
fn fuse_bound(_n: usize) -> usize {
    0
}

const FUSE_REQUEST: Target = Target {
    name: "fuse_request",
    seeds: fuse_seeds,
    run: run_fuse,
    fixup: fuse_fixup,
    tokens: &["volume\0", "volume"],
    alloc_bound: fuse_bound,
};

#[test]
fn fuse_request() {
    fuzz(&FUSE_REQUEST);
}

// --------------------------------------------------------------- dirty map

fn dirty_seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    for (size, region) in [
        (0, 1 << 20),
        (1, 1),
        (10 << 20, 1 << 20),
        ((1 << 30) + 512, 1 << 20),
        (64 << 20, 4096),
        (u64::from(u32::MAX), 1 << 26),
    ] {
        let mut m = DirtyMap::new(size, region);
        seeds.push(m.encode());
        m.mark(0, 1);
        m.mark(size / 2, region * 3);
        m.mark(size.saturating_sub(1), 1);
        seeds.push(m.encode());
        m.mark_all();
        seeds.push(m.encode());
    }
    seeds
}

/// Sets the trailing CRC (and, sometimes, a size its words can hold) so
/// mutants reach the decoder past its checksum.
fn dirty_fixup(data: &mut [u8], rng: &mut Rng) {
    if data.len() >= 28 && rng.chance(3) {
        let words = ((data.len() - 28) / 8) as u64;
        let region = *rng.pick(&[1u64, 4096, 1 << 20, 1 << 40, 1 << 63, u64::MAX]);
        let size = (words * 64)
            .saturating_mul(region)
            .saturating_sub((rng.below(3) as u64).saturating_mul(region));
        data[8..16].copy_from_slice(&region.to_le_bytes());
        data[16..24].copy_from_slice(&size.to_le_bytes());
    }
    if data.len() >= 4 {
        let body = data.len() - 4;
        let crc = crc32c::crc32c(&data[..body]);
        data[body..].copy_from_slice(&crc.to_le_bytes());
    }
}

/// Decodes, then uses the map as catch-up does (its dirty regions and
/// their byte ranges, marking, growing), and checks it re-encodes to the
/// same bytes.
fn run_dirty(data: &[u8]) -> u64 {
    let Some(mut map) = DirtyMap::decode(data) else {
        return 0;
    };
    assert_eq!(map.encode(), data, "a decoded map re-encodes differently");
    let regions = map.regions();
    let mut last_end = 0u64;
    for r in map.dirty_regions().take(1000) {
        let (start, len) = map.range(r);
        assert!(start >= last_end && len > 0, "region {r}: ({start}, {len})");
        last_end = start + len;
    }
    let count = map.count();
    assert!(count <= regions);
    map.mark(regions / 2, 1);
    map.resize(map.regions().saturating_mul(map.region_size()));
    1 + u64::from(count > 0) + 2 * u64::from(count == regions) + 4 * (regions.min(3))
}

/// A decoded map holds as many words as its bytes: the bitmap, its
/// re-encoding, and little else.
fn dirty_bound(n: usize) -> usize {
    4 * n + (4 << 10)
}

const DIRTY_MAP: Target = Target {
    name: "dirty_map",
    seeds: dirty_seeds,
    run: run_dirty,
    fixup: dirty_fixup,
    tokens: &["TRNADIRT"],
    alloc_bound: dirty_bound,
};

#[test]
fn dirty_map() {
    fuzz(&DIRTY_MAP);
}

// ------------------------------------------------------------ terna.toml

fn config_seeds() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    // What the real code writes on first start, standalone and node.
    for default in [
        Config::default_standalone as fn() -> Config,
        Config::default_node,
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        terna::datapath::host::config_file::load_or_init_with(dir.path(), default)
            .expect("default config");
        seeds.push(std::fs::read(dir.path().join(terna::core::config::CONFIG_FILE)).expect("read"));
    }
    // The node plugin's, from its ConfigMap.
    let yaml = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/node-config.yaml"),
    )
    .expect("deploy/node-config.yaml");
    let map: serde_yaml::Value = serde_yaml::from_str(&yaml).expect("yaml");
    let text = map["data"]["terna.toml"].as_str().expect("terna.toml key");
    seeds.push(text.as_bytes().to_vec());
    seeds.push(
        b"overcommit_ratio = 1.5\nagent_timeout_ms = 2000\nagent_max_connections = 64\nreplace_after_secs = 60\n\
          rebuild_mib_per_sec = 0\ncluster_token_file = \"token\"\n\
          metrics_listen = \"[::1]:9420\"\n\n\
          [[nodes]]\nname = \"n2\"\nagent = \"10.1.0.2:7420\"\n\n\
          [[pools]]\nname = \"fast-1\"\npath = \"/mnt/nvme0/terna\"\ntier = \"fast\"\n\
          domain = \"rack-1\"\nzone = \"z1\"\ncapacity_bytes = 1099511627776\n\n\
          [[pools]]\nname = \"remote\"\nnode = \"n2\"\npath = \"pools/r\"\ntier = \"slow\"\n\n\
          [[pools]]\nname = \"nas\"\ntier = \"slow\"\n\
          [pools.nfs]\nserver = \"10.0.0.5\"\nport = 2049\nmount_port = 20048\n\
          export = \"/export/terna\"\nsubdir = \"replicas\"\n"
            .to_vec(),
    );
    seeds.push(b"pools = [{ name = 'a', path = 'a', tier = 'fast' }]\n".to_vec());
    seeds.push(Vec::new());
    seeds
}

/// Parses as `load_or_init` does, with validation; what parses is written
/// back as `load_or_init` writes it and must read back equal.
fn run_config(data: &[u8]) -> u64 {
    // read_to_string refuses invalid UTF-8 before the parser sees it; the
    // lossy form keeps byte-level mutants useful as text.
    let text = String::from_utf8_lossy(data);
    let path = Path::new("/var/lib/terna/terna.toml");
    match Config::parse(&text, path) {
        Ok(config) => {
            let written = toml::to_string_pretty(&config).expect("a parsed config encodes");
            let again = Config::parse(&written, path).expect("what we write parses");
            assert_eq!(again, config, "config does not round-trip:\n{written}");
            2 + config.pools.len().min(4) as u64 * 4 + config.nodes.len().min(2) as u64 * 32
        }
        Err(e) => {
            // The validation errors carry a stable prefix after the path;
            // toml's carry the line, which would make every input new.
            let msg = e.message.trim_start_matches("/var/lib/terna/terna.toml: ");
            1 + (msg
                .split([' ', '\n'])
                .take(3)
                .collect::<Vec<_>>()
                .hash_u64()
                % 256)
                * 2
        }
    }
}

/// The TOML parser keeps tokens, a document tree and error text, each a
/// bounded number of small nodes per input byte.
fn text_bound(n: usize) -> usize {
    64 * n + (1 << 20)
}

const CONFIG: Target = Target {
    name: "config",
    seeds: config_seeds,
    run: run_config,
    fixup: |_, _| {},
    tokens: &[
        "overcommit_ratio = ",
        "agent_timeout_ms = ",
        "agent_max_connections = ",
        "replace_after_secs = ",
        "rebuild_mib_per_sec = ",
        "cluster_token_file = ",
        "metrics_listen = ",
        "[[pools]]\n",
        "[[nodes]]\n",
        "[pools.nfs]\n",
        "[pools]\n",
        "name = ",
        "node = ",
        "path = ",
        "tier = ",
        "domain = ",
        "zone = ",
        "capacity_bytes = ",
        "server = ",
        "port = ",
        "mount_port = ",
        "export = ",
        "subdir = ",
        "agent = ",
        "\"fast\"",
        "\"standard\"",
        "\"slow\"",
        "\"\"",
        "\"/\"",
        "\"n2\"",
        "\"10.1.0.2:7420\"",
        "\"[::1]:0\"",
        "nan",
        "inf",
        "-inf",
        "-0.0",
        "0.0",
        "1e-320",
        "true",
        "[]",
        "{}",
        "\"\"\"",
        "'''",
        "1979-05-27T07:32:00Z",
        "\n",
    ],
    alloc_bound: text_bound,
};

#[test]
fn config() {
    fuzz(&CONFIG);
}

// ---------------------------------------------------- class parameters

/// Parameters as `key=value` lines (split at the first `=`), the way a
/// StorageClass's string map reaches `CreateVolume`.
fn parameters_of(data: &[u8]) -> BTreeMap<String, String> {
    String::from_utf8_lossy(data)
        .split('\n')
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap_or((l, ""));
            (k.to_string(), v.to_string())
        })
        .collect()
}

fn lines_of(params: &BTreeMap<String, String>) -> Vec<u8> {
    params
        .iter()
        .map(|(k, v)| format!("{k}={v}\n"))
        .collect::<String>()
        .into_bytes()
}

fn class_seeds() -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("storageclasses");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("storageclasses/")
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    paths.sort();
    let mut seeds = Vec::new();
    for path in paths {
        let yaml = std::fs::read_to_string(&path).expect("storage class");
        for doc in serde_yaml::Deserializer::from_str(&yaml) {
            let value = serde_yaml::Value::deserialize(doc).expect("yaml");
            if let Ok(params) =
                serde_yaml::from_value::<BTreeMap<String, String>>(value["parameters"].clone())
            {
                seeds.push(lines_of(&params));
            }
        }
    }
    assert!(seeds.len() >= 6, "every StorageClass gives a seed");
    seeds.push(b"replicas=2\nredundancy=standard\nminHealthyReplicas=2\ncsi.storage.k8s.io/pvc/name=data\n".to_vec());
    seeds.push(Vec::new());
    seeds
}

/// Parses, checks the invariants placement and the engine rely on, and
/// that a class written back as parameters parses to itself.
fn run_class(data: &[u8]) -> u64 {
    let params = parameters_of(data);
    match VolumeClass::parse(&params) {
        Ok(class) => {
            assert!(1 <= class.min_healthy, "{class:?}");
            assert!(class.min_healthy <= class.replicas, "{class:?}");
            assert!(
                class.replicas <= terna::core::class::MAX_REPLICAS,
                "{class:?}"
            );
            let mut again = BTreeMap::new();
            if let Some(tier) = class.tier {
                again.insert("tier".to_string(), tier.to_string());
            }
            again.insert("replicas".to_string(), class.replicas.to_string());
            again.insert(
                "failureDomain".to_string(),
                class.failure_domain.to_string(),
            );
            again.insert("fsType".to_string(), class.fs_type.as_str().to_string());
            again.insert(
                "minHealthyReplicas".to_string(),
                class.min_healthy.to_string(),
            );
            assert_eq!(VolumeClass::parse(&again).as_ref(), Ok(&class));
            1000 + (format!("{class:?}").hash_u64() % 1024) * 2
        }
        Err(e) => {
            1 + (e
                .to_string()
                .split(' ')
                .take(2)
                .collect::<Vec<_>>()
                .hash_u64()
                % 64)
                * 2
        }
    }
}

const CLASS_PARAMETERS: Target = Target {
    name: "class_parameters",
    seeds: class_seeds,
    run: run_class,
    fixup: |_, _| {},
    tokens: &[
        "tier=",
        "replicas=",
        "redundancy=",
        "failureDomain=",
        "fsType=",
        "minHealthyReplicas=",
        "csi.storage.k8s.io/",
        "fast",
        "standard",
        "slow",
        "none",
        "high",
        "node",
        "zone",
        "ext4",
        "xfs",
        "0",
        "1",
        "5",
        "6",
        "+3",
        " 3 ",
        "３",
        "\n",
    ],
    alloc_bound: text_bound,
};

#[test]
fn class_parameters() {
    fuzz(&CLASS_PARAMETERS);
}

// ----------------------------------------------------------- the harness

fn toy_seeds() -> Vec<Vec<u8>> {
    vec![b"hello".to_vec()]
}

/// Panics on any input holding a 0xff byte, which one mutation makes.
fn toy_panics(data: &[u8]) -> u64 {
    if data.contains(&0xff) {
        panic!("toy parser met 0xff");
    }
    0
}

/// Keeps 8 MiB live for any input starting with 'x'.
fn toy_allocates(data: &[u8]) -> u64 {
    if data.first() == Some(&b'x') {
        let v = vec![1u8; 8 << 20];
        return std::hint::black_box(v).len() as u64;
    }
    0
}

const TOY_PANICS: Target = Target {
    name: "toy_panics",
    seeds: toy_seeds,
    run: toy_panics,
    fixup: |_, _| {},
    tokens: &[],
    alloc_bound: text_bound,
};

const TOY_ALLOCATES: Target = Target {
    name: "toy_allocates",
    seeds: toy_seeds,
    run: toy_allocates,
    fixup: |_, _| {},
    tokens: &["x"],
    alloc_bound: text_bound,
};

/// The machinery catches what it is there to catch: a panicking and an
/// over-allocating parser both fail, with a minimized input, within a few
/// seconds; and a target that does neither passes.
#[test]
fn harness_catches_panics_and_unbounded_allocations() {
    let out = fuzz_for(&TOY_PANICS, 1, Duration::from_secs(10), false, 1);
    let failure = out.failures.first().expect("the panic is found");
    assert!(failure.what.contains("toy parser met 0xff"), "{failure}");
    assert!(
        failure.what.contains("fuzz.rs"),
        "the location is reported: {failure}"
    );
    assert_eq!(
        failure.input,
        [0xff],
        "minimized to the one byte that matters"
    );

    let out = fuzz_for(&TOY_ALLOCATES, 1, Duration::from_secs(10), false, 1);
    let failure = out.failures.first().expect("the allocation is found");
    assert!(
        failure.what.starts_with("unbounded allocation"),
        "{failure}"
    );
    assert!(failure.what.contains("8388608"), "{failure}");
    assert_eq!(failure.input, b"x", "minimized");

    let quiet = Target {
        run: |_| 0,
        ..TOY_PANICS
    };
    let out = fuzz_for(&quiet, 1, Duration::from_millis(200), false, 1);
    assert!(out.failures.is_empty());
    assert!(out.runs > 100, "mutants are run: {}", out.runs);
}

/// Asks for 2 GiB at once for an input starting with 'x'.
fn toy_allocates_too_much(data: &[u8]) -> u64 {
    if data.first() == Some(&b'x') {
        let v: Vec<u8> = Vec::with_capacity(2 << 30);
        return std::hint::black_box(v).capacity() as u64;
    }
    0
}

/// An allocation too big to make is refused, and the input that asked
/// for it is printed and saved before the process aborts (checked in a
/// child process: `refused_allocation_child`).
#[test]
fn refused_allocations_are_reported_before_the_abort() {
    let crashes = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "refused_allocation_child", "--nocapture"])
        .env("TERNA_FUZZ_REFUSAL_CHILD", "1")
        .env("TERNA_FUZZ_CRASHES", crashes.path())
        .env("TERNA_FUZZ_SECS", "10")
        .env("TERNA_FUZZ_SEED", "1")
        .output()
        .expect("run the child");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the child must abort: {stderr}");
    assert!(
        stderr.contains("one allocation of 2147483648 bytes; refused"),
        "{stderr}"
    );
    let saved = crashes.path().join("toy_refused/refused-allocation");
    let input = std::fs::read(&saved).expect("the input is saved");
    assert_eq!(input.first(), Some(&b'x'));
    assert!(
        stderr.contains(&format!("Input hex: {}", hex(&input))),
        "{stderr}"
    );
}

#[test]
fn refused_allocation_child() {
    if std::env::var_os("TERNA_FUZZ_REFUSAL_CHILD").is_none() {
        return;
    }
    fuzz(&Target {
        name: "toy_refused",
        run: toy_allocates_too_much,
        ..TOY_ALLOCATES
    });
}

/// Every target has a committed corpus. The seeds the code builds are
/// run whether committed or not, so a changed encoder or default config
/// does not fail this (it only says so);
/// `TERNA_FUZZ_WRITE_CORPUS=1` writes the missing ones, to commit.
#[test]
fn seed_corpora_are_committed() {
    let write = std::env::var_os("TERNA_FUZZ_WRITE_CORPUS").is_some();
    let mut empty = Vec::new();
    for target in [
        &AGENT_FRAME,
        &AGENT_STREAM,
        &FUSE_REQUEST,
        &DIRTY_MAP,
        &CONFIG,
        &CLASS_PARAMETERS,
    ] {
        let dir = fuzz_dir().join("corpus").join(target.name);
        for seed in (target.seeds)() {
            let path = dir.join(format!("seed-{:016x}", fnv(&seed)));
            if path.exists() {
                continue;
            }
            if write {
                std::fs::create_dir_all(&dir).expect("corpus dir");
                std::fs::write(&path, &seed).expect("write seed");
            } else {
                eprintln!(
                    "fuzz {}: seed {} not committed (TERNA_FUZZ_WRITE_CORPUS=1 writes it)",
                    target.name,
                    path.display()
                );
            }
        }
        let committed = std::fs::read_dir(&dir).map_or(0, Iterator::count);
        if committed == 0 {
            empty.push(target.name);
        }
    }
    assert!(empty.is_empty(), "no committed corpus for {empty:?}");
}
