//! Fault rules: which requests a rule selects, and what it does to them.

use std::ops::Range;
use std::time::{Duration, Instant};

use iovirt_backend::{BlockError, Request};

/// The operation of a block request, as rules select it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// [`Request::Read`].
    Read,
    /// [`Request::Write`] (with or without FUA).
    Write,
    /// [`Request::Flush`].
    Flush,
    /// [`Request::Discard`].
    Discard,
    /// [`Request::WriteZeroes`].
    WriteZeroes,
}

impl Op {
    /// Every operation, in the order statistics list them.
    pub const ALL: [Op; 5] = [Op::Read, Op::Write, Op::Flush, Op::Discard, Op::WriteZeroes];

    /// The operation of `req`.
    pub fn of(req: &Request) -> Op {
        match req {
            Request::Read { .. } => Op::Read,
            Request::Write { .. } => Op::Write,
            Request::Flush => Op::Flush,
            Request::Discard { .. } => Op::Discard,
            Request::WriteZeroes { .. } => Op::WriteZeroes,
        }
    }

    /// The name used in stack descriptions and logs (`write-zeroes` for [`Op::WriteZeroes`]).
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Discard => "discard",
            Op::WriteZeroes => "write-zeroes",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl std::str::FromStr for Op {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "read" => Ok(Op::Read),
            "write" => Ok(Op::Write),
            "flush" => Ok(Op::Flush),
            "discard" => Ok(Op::Discard),
            "write-zeroes" | "write_zeroes" => Ok(Op::WriteZeroes),
            other => Err(format!(
                "unknown operation {other:?} (expected read, write, flush, discard, write-zeroes or any)"
            )),
        }
    }
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Which requests a [`Rule`] applies to.
///
/// A request *matches* when its operation and byte range fit; the rule counts
/// its matches from 0 and acts on matches `after .. after + count` (all from
/// `after` on without a count), and of those only on the ones a seeded coin
/// with `probability` picks. The coin is a per-rule generator seeded from the
/// filter's seed and the rule's number, so the same seed and the same request
/// sequence pick the same requests.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Selector {
    /// The operation; `None` matches every operation.
    pub op: Option<Op>,
    /// Bytes on the disk; a request matches when it overlaps the range.
    /// Flushes have no range and never match a rule with one.
    pub range: Option<Range<u64>>,
    /// Matches to let pass before acting.
    pub after: u64,
    /// How many matches to act on after that; `None` for all.
    pub count: Option<u64>,
    /// Chance (0.0 to 1.0) that an eligible match is acted on; `None` for always.
    pub probability: Option<f64>,
}

impl Selector {
    /// Every request.
    pub fn any() -> Self {
        Selector::default()
    }

    /// Every request of operation `op`.
    pub fn op(op: Op) -> Self {
        Selector {
            op: Some(op),
            ..Selector::default()
        }
    }

    /// Only requests overlapping `range` (bytes).
    pub fn range(mut self, range: Range<u64>) -> Self {
        self.range = Some(range);
        self
    }

    /// Let the first `n` matches pass.
    pub fn after(mut self, n: u64) -> Self {
        self.after = n;
        self
    }

    /// Act on `n` matches only.
    pub fn count(mut self, n: u64) -> Self {
        self.count = Some(n);
        self
    }

    /// Act on an eligible match with probability `p` (clamped to 0.0..=1.0).
    pub fn probability(mut self, p: f64) -> Self {
        self.probability = Some(if p.is_nan() { 0.0 } else { p.clamp(0.0, 1.0) });
        self
    }

    /// Whether the operation and range of a request fit (before counting).
    pub(crate) fn fits(&self, op: Op, span: Option<Range<u64>>) -> bool {
        if self.op.is_some_and(|o| o != op) {
            return false;
        }
        match (&self.range, span) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(r), Some(s)) => s.start < r.end && r.start < s.end,
        }
    }
}

/// The error a failing rule injects; each keeps the device status of the
/// [`BlockError`] it becomes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InjectedError {
    /// A host I/O error (`EIO`): device status I/O error.
    Io,
    /// The host is out of space (`ENOSPC`): device status I/O error.
    NoSpace,
    /// [`BlockError::Unsupported`]: device status unsupported.
    Unsupported,
    /// [`BlockError::ReadOnly`]: device status I/O error.
    ReadOnly,
}

impl InjectedError {
    /// The [`BlockError`] a request of operation `op` fails with.
    pub fn to_block_error(&self, op: Op) -> BlockError {
        match self {
            InjectedError::Io => {
                BlockError::Io(std::io::Error::other(format!("injected I/O error on {op}")))
            }
            InjectedError::NoSpace => BlockError::Io(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                format!("injected out-of-space error on {op}"),
            )),
            InjectedError::Unsupported => BlockError::Unsupported(op.name()),
            InjectedError::ReadOnly => BlockError::ReadOnly,
        }
    }
}

impl std::str::FromStr for InjectedError {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "io" | "eio" => Ok(InjectedError::Io),
            "nospace" | "no-space" | "enospc" => Ok(InjectedError::NoSpace),
            "unsupported" => Ok(InjectedError::Unsupported),
            "read-only" | "readonly" => Ok(InjectedError::ReadOnly),
            other => Err(format!(
                "unknown error {other:?} (expected io, nospace, unsupported or read-only)"
            )),
        }
    }
}

/// What happens after a torn write's first sectors reached the child.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TearThen {
    /// The write completes with this error; the sectors that reached the child stay there.
    Error(InjectedError),
    /// The power fails: the torn sectors count as written to stable storage,
    /// and then [`crate::fault::FaultHandle::power_cut`] happens (the filter
    /// must track writes); the write completes with the power-cut error.
    Crash,
}

/// What a rule does to the requests it selects.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Fail the request without passing it to the child.
    Fail(InjectedError),
    /// Pass the request on, then hold its completion: until released through
    /// the [`crate::fault::FaultHandle`] (`None`), or for a duration.
    Stall(Option<Duration>),
    /// Add latency: the request reaches the child only after this long.
    Slow(Duration),
    /// For writes: pass on only the first `sectors` logical blocks, then fail
    /// or crash as `then` says. Other operations pass untouched.
    Tear {
        /// Logical blocks (of the child) that reach the child.
        sectors: u64,
        /// What follows.
        then: TearThen,
    },
    /// Delay requests so they reach the child at no more than these rates
    /// (a token bucket holding `burst` requests' worth of credit).
    RateLimit {
        /// Requests per second, if capped.
        iops: Option<u64>,
        /// Bytes per second, if capped.
        bytes_per_second: Option<u64>,
        /// Requests (and for the byte cap, that many 4 KiB blocks) that may pass at once.
        burst: u64,
    },
}

/// One fault rule: a [`Selector`] and an [`Action`].
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    /// Which requests.
    pub selector: Selector,
    /// What to do to them.
    pub action: Action,
}

impl Rule {
    /// Fail the selected requests with `error`.
    pub fn fail(selector: Selector, error: InjectedError) -> Self {
        Rule {
            selector,
            action: Action::Fail(error),
        }
    }

    /// Hold the completions of the selected requests until released.
    pub fn stall(selector: Selector) -> Self {
        Rule {
            selector,
            action: Action::Stall(None),
        }
    }

    /// Hold the completions of the selected requests for `d`.
    pub fn stall_for(selector: Selector, d: Duration) -> Self {
        Rule {
            selector,
            action: Action::Stall(Some(d)),
        }
    }

    /// Delay the selected requests by `d` before they reach the child.
    pub fn slow(selector: Selector, d: Duration) -> Self {
        Rule {
            selector,
            action: Action::Slow(d),
        }
    }

    /// Tear the selected writes after `sectors` logical blocks.
    pub fn tear(selector: Selector, sectors: u64, then: TearThen) -> Self {
        Rule {
            selector,
            action: Action::Tear { sectors, then },
        }
    }

    /// Cap the selected requests at `iops` requests and `bytes_per_second` bytes per second.
    pub fn rate_limit(
        selector: Selector,
        iops: Option<u64>,
        bytes_per_second: Option<u64>,
    ) -> Self {
        Rule {
            selector,
            action: Action::RateLimit {
                iops,
                bytes_per_second,
                burst: 1,
            },
        }
    }
}

/// Identifies a rule added to a fault filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleId(pub(crate) u64);

/// A small deterministic generator (SplitMix64): the same seed gives the same sequence.
#[derive(Clone, Debug)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// True with probability `p`.
    pub(crate) fn chance(&mut self, p: f64) -> bool {
        let x = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        x < p
    }
}

/// Generic cell rate algorithm: a token bucket expressed as a theoretical arrival time.
#[derive(Clone, Debug)]
pub(crate) struct Pacer {
    tat: Option<Instant>,
}

impl Pacer {
    pub(crate) fn new() -> Self {
        Pacer { tat: None }
    }

    /// When a request costing `cost` may go, given a tolerance of `burst` costs of `unit`.
    pub(crate) fn admit(&mut self, now: Instant, cost: Duration, tolerance: Duration) -> Instant {
        let tat = self.tat.map_or(now, |t| t.max(now));
        let go = tat.checked_sub(tolerance).map_or(now, |t| t.max(now));
        self.tat = Some(tat + cost);
        go
    }
}

/// A rule in a filter, with its counters.
#[derive(Debug)]
pub(crate) struct RuleState {
    pub(crate) id: RuleId,
    pub(crate) rule: Rule,
    pub(crate) matched: u64,
    pub(crate) fired: u64,
    rng: SplitMix64,
    iops_pacer: Pacer,
    bytes_pacer: Pacer,
}

impl RuleState {
    pub(crate) fn new(id: RuleId, rule: Rule, seed: u64) -> Self {
        let mut mix = SplitMix64::new(seed ^ id.0.wrapping_mul(0xd1b5_4a32_d192_ed03));
        let rng = SplitMix64::new(mix.next_u64());
        RuleState {
            id,
            rule,
            matched: 0,
            fired: 0,
            rng,
            iops_pacer: Pacer::new(),
            bytes_pacer: Pacer::new(),
        }
    }

    /// Count a request and say whether the rule acts on it.
    pub(crate) fn select(&mut self, op: Op, span: Option<Range<u64>>) -> bool {
        let sel = &self.rule.selector;
        if !sel.fits(op, span) {
            return false;
        }
        let n = self.matched;
        self.matched += 1;
        if n < sel.after {
            return false;
        }
        if sel.count.is_some_and(|c| n - sel.after >= c) {
            return false;
        }
        if let Some(p) = sel.probability {
            if !self.rng.chance(p) {
                return false;
            }
        }
        self.fired += 1;
        true
    }

    /// For a rate-limit rule: when a request of `len` bytes may reach the child.
    pub(crate) fn pace(&mut self, now: Instant, len: u64) -> Instant {
        let Action::RateLimit {
            iops,
            bytes_per_second,
            burst,
        } = self.rule.action
        else {
            return now;
        };
        let burst = burst.max(1);
        let mut go = now;
        if let Some(iops) = iops.filter(|&r| r > 0) {
            let unit = Duration::from_secs_f64(1.0 / iops as f64);
            go = go.max(
                self.iops_pacer
                    .admit(now, unit, unit * (burst - 1).min(1 << 20) as u32),
            );
        }
        if let Some(bps) = bytes_per_second.filter(|&r| r > 0) {
            let cost = Duration::from_secs_f64(len as f64 / bps as f64);
            let tol = Duration::from_secs_f64((burst - 1) as f64 * 4096.0 / bps as f64);
            go = go.max(self.bytes_pacer.admit(now, cost, tol));
        }
        go
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selector_counts_matches_and_windows() {
        let mut r = RuleState::new(
            RuleId(1),
            Rule::fail(
                Selector::op(Op::Write).range(4096..8192).after(1).count(2),
                InjectedError::Io,
            ),
            0,
        );
        let w = |o: u64| Some(o..o + 512);
        assert!(!r.select(Op::Read, w(4096)));
        assert!(!r.select(Op::Write, w(0)));
        assert!(!r.select(Op::Write, w(4096))); // match 0: skipped
        assert!(r.select(Op::Write, w(4608))); // match 1
        assert!(r.select(Op::Write, w(8191 - 511))); // match 2
        assert!(!r.select(Op::Write, w(4096))); // match 3: beyond count
        assert!(!r.select(Op::Flush, None));
        assert_eq!(r.fired, 2);
    }

    #[test]
    fn pacer_spaces_requests() {
        let mut r = RuleState::new(
            RuleId(1),
            Rule::rate_limit(Selector::any(), Some(100), None),
            0,
        );
        let now = Instant::now();
        let a = r.pace(now, 512);
        let b = r.pace(now, 512);
        let c = r.pace(now, 512);
        assert_eq!(a, now);
        assert_eq!(b - a, Duration::from_millis(10));
        assert_eq!(c - b, Duration::from_millis(10));
    }

    #[test]
    fn chance_is_deterministic() {
        let mut a = SplitMix64::new(42);
        let mut b = SplitMix64::new(42);
        let va: Vec<bool> = (0..100).map(|_| a.chance(0.3)).collect();
        let vb: Vec<bool> = (0..100).map(|_| b.chance(0.3)).collect();
        assert_eq!(va, vb);
        let hits = va.iter().filter(|&&x| x).count();
        assert!((10..60).contains(&hits));
    }
}
