//! mClock (Gulati, Merchant and Varman, OSDI 2010): reservations, limits and
//! weights with three tags per request, and its distributed form's server side
//! (dmClock tags advance by the client's `delta` and `rho`).

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::dmclock::ReqParams;
use crate::heap::KeyedHeap;
use crate::SchedError;

const NS_PER_SEC: f64 = 1e9;

/// Identifies a client (a disk, an export, a VM) within one scheduler.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ClientId(pub u32);

impl std::fmt::Display for ClientId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// A client's quality-of-service settings, in cost units per second ("IOPS"
/// when every request costs 1, see [`CostModel`]).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClientParams {
    /// Floor: served at least this often when the capacity allows (0 = none).
    pub reservation: f64,
    /// Ceiling: never served more often than this; `None` is unlimited.
    pub limit: Option<f64>,
    /// Relative share of the capacity left after reservations.
    pub weight: f64,
}

impl Default for ClientParams {
    fn default() -> Self {
        ClientParams {
            reservation: 0.0,
            limit: None,
            weight: 1.0,
        }
    }
}

impl ClientParams {
    /// Checked settings: weight > 0, reservation ≥ 0, limit > 0 and ≥ reservation.
    pub fn new(reservation: f64, limit: Option<f64>, weight: f64) -> Result<Self, SchedError> {
        let p = ClientParams {
            reservation,
            limit,
            weight,
        };
        p.validate()?;
        Ok(p)
    }

    /// Weight-only settings.
    pub fn weight(weight: f64) -> Result<Self, SchedError> {
        Self::new(0.0, None, weight)
    }

    /// Check the settings, as [`ClientParams::new`] does.
    pub fn validate(&self) -> Result<(), SchedError> {
        if !(self.weight.is_finite() && self.weight > 0.0) {
            return Err(SchedError::InvalidWeight(self.weight));
        }
        if !(self.reservation.is_finite() && self.reservation >= 0.0) {
            return Err(SchedError::InvalidReservation(self.reservation));
        }
        if let Some(limit) = self.limit {
            if !(limit.is_finite() && limit > 0.0) {
                return Err(SchedError::InvalidLimit(limit));
            }
            if self.reservation > limit {
                return Err(SchedError::ReservationAboveLimit {
                    reservation: self.reservation,
                    limit,
                });
            }
        }
        Ok(())
    }
}

impl std::str::FromStr for ClientParams {
    type Err = SchedError;

    /// Parse per-disk options such as `reservation=200,limit=1000,weight=2`
    /// (`limit=none` or an absent key keeps the default: no reservation, no
    /// limit, weight 1).
    fn from_str(s: &str) -> Result<Self, SchedError> {
        let mut p = ClientParams::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let bad = || SchedError::BadOption(part.to_string());
            let (key, value) = part.split_once('=').ok_or_else(bad)?;
            let num = || value.trim().parse::<f64>().map_err(|_| bad());
            match key.trim() {
                "reservation" => p.reservation = num()?,
                "weight" => p.weight = num()?,
                "limit" if value.trim() == "none" => p.limit = None,
                "limit" => p.limit = Some(num()?),
                _ => return Err(bad()),
            }
        }
        p.validate()?;
        Ok(p)
    }
}

/// How much of a client's reservation, limit and share one request uses.
///
/// `cost = per_request + bytes / bytes_per_unit`: with the default
/// (`per_request = 1`, 32 KiB per unit) a 4 KiB request costs 1.125 and a
/// 1 MiB one 33. The paper suggests `bytes_per_unit` = peak bandwidth × mean
/// positioning time, so a request costs its seek plus its transfer in units of
/// a seek ([`CostModel::paper`]). [`CostModel::UNIT`] charges 1 per request.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct CostModel {
    /// Fixed cost of any request (its positioning or per-command overhead).
    pub per_request: f64,
    /// Bytes that cost one more unit; 0 ignores the size.
    pub bytes_per_unit: u64,
}

impl Default for CostModel {
    fn default() -> Self {
        CostModel {
            per_request: 1.0,
            bytes_per_unit: 32 << 10,
        }
    }
}

impl CostModel {
    /// Every request costs 1, whatever its size: plain IOPS.
    pub const UNIT: CostModel = CostModel {
        per_request: 1.0,
        bytes_per_unit: 0,
    };

    /// The paper's model: one unit is what the device transfers at its peak
    /// bandwidth during one mean positioning time.
    pub fn paper(peak_bytes_per_sec: u64, positioning_ns: u64) -> Self {
        let unit = (peak_bytes_per_sec as u128 * positioning_ns as u128 / 1_000_000_000) as u64;
        CostModel {
            per_request: 1.0,
            bytes_per_unit: unit.max(1),
        }
    }

    /// The cost of a request moving `bytes` bytes.
    pub fn cost(&self, bytes: u64) -> f64 {
        let size = if self.bytes_per_unit == 0 {
            0.0
        } else {
            bytes as f64 / self.bytes_per_unit as f64
        };
        self.per_request + size
    }
}

/// Which phase of the scheduler chose a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Phase {
    /// Constraint-based: the client was behind its reservation.
    Reservation,
    /// Weight-based: proportional share among clients under their limits.
    Weight,
}

/// A request the scheduler chose to run next.
#[derive(Debug)]
pub struct Dispatched<T> {
    /// Whose request it is.
    pub client: ClientId,
    /// The queued item.
    pub item: T,
    /// The phase that chose it (dmClock clients report it back as `rho`).
    pub phase: Phase,
    /// The cost it was enqueued with.
    pub cost: f64,
    /// When it was enqueued (ns).
    pub arrival: u64,
}

#[derive(Debug)]
struct Queued<T> {
    item: T,
    cost: f64,
    req: ReqParams,
    arrival: i64,
    /// Reservation tag, before the client's `r_shift` is taken off.
    r: i64,
    /// Limit tag.
    l: i64,
    /// Proportional-share tag in the shifted frame (see `MClock::p_offset`).
    p: i128,
    /// This request's own reservation spacing, given back after a weight-phase dispatch.
    r_own: i64,
    /// Its limit spacing, also counted from the previous dispatch.
    l_inc: i64,
}

#[derive(Debug)]
struct Client<T> {
    params: ClientParams,
    /// Nanoseconds per cost unit of reservation, limit and weight (0: none).
    r_inv: f64,
    l_inv: f64,
    p_inv: f64,
    queue: VecDeque<Queued<T>>,
    last_r: i64,
    last_l: i64,
    last_p: i128,
    /// Sum of the reservation spacing given back by weight-phase dispatches.
    r_shift: i64,
    /// Added to every stored P tag: raised when the client comes back from
    /// its limit, so a capped client banks no share (see `MClock::promote`).
    p_boost: i128,
    /// The previous request's limit tag, or its dispatch time less its
    /// spacing if that is later: the head's limit tag is at least this plus
    /// its spacing, so a client delayed by contention cannot catch up above
    /// its limit by more than one request.
    l_floor: i64,
    removed: bool,
}

const NEVER_R: i64 = i64::MIN / 4;
const NEVER_P: i128 = i128::MIN / 4;

fn ns(x: f64) -> i64 {
    // `as` saturates; tags never need more than ~292 years of nanoseconds.
    x.ceil() as i64
}

impl<T> Client<T> {
    fn new(params: ClientParams) -> Self {
        let mut c = Client {
            params,
            r_inv: 0.0,
            l_inv: 0.0,
            p_inv: 0.0,
            queue: VecDeque::new(),
            last_r: NEVER_R,
            last_l: NEVER_R,
            last_p: NEVER_P,
            r_shift: 0,
            p_boost: 0,
            l_floor: NEVER_R,
            removed: false,
        };
        c.set_rates(params);
        c
    }

    fn set_rates(&mut self, p: ClientParams) {
        self.params = p;
        self.r_inv = if p.reservation > 0.0 {
            NS_PER_SEC / p.reservation
        } else {
            0.0
        };
        self.l_inv = p.limit.map_or(0.0, |l| NS_PER_SEC / l);
        self.p_inv = NS_PER_SEC / p.weight;
    }

    fn has_reservation(&self) -> bool {
        self.r_inv > 0.0
    }

    /// The limit tag that decides when the head may be served.
    fn head_l(&self) -> Option<i64> {
        let h = self.queue.front()?;
        Some(h.l.max(self.l_floor.saturating_add(h.l_inc)))
    }

    /// Assign the three tags of a request arriving at `now` (the paper's
    /// `tag = max(previous tag + cost/rate, now)`; dmClock adds `rho` to the
    /// reservation spacing and `delta` to the others).
    fn tag(
        &mut self,
        cost: f64,
        req: ReqParams,
        now: i64,
        p_offset: i128,
    ) -> (i64, i64, i128, i64) {
        let r_own = ns(cost * self.r_inv);
        let r_eff = if self.has_reservation() {
            let inc = ns((cost + req.rho) * self.r_inv);
            (self.last_r - self.r_shift).saturating_add(inc).max(now)
        } else {
            i64::MAX
        };
        let r = r_eff.saturating_add(self.r_shift);
        let l = self
            .last_l
            .saturating_add(ns((cost + req.delta) * self.l_inv))
            .max(now);
        let p_inc = ((cost + req.delta) * self.p_inv).ceil() as i128;
        let p = (self.last_p + self.p_boost + p_inc).max(now as i128 + p_offset) - self.p_boost;
        self.last_r = r;
        self.last_l = l;
        self.last_p = p;
        (r, l, p, r_own)
    }
}

/// The mClock scheduler over queued items of type `T`.
///
/// Time is a plain `now: u64` in nanoseconds passed to every call, so the
/// scheduler runs on virtual time in tests and simulators and on a monotonic
/// clock in production. Every operation is O(log n) in the number of clients
/// with queued requests: three indexed heaps hold them by reservation tag,
/// by limit tag (clients at their limit) and by proportional-share tag
/// (clients under their limit; those with a reservation are also in the
/// reservation heap: a client at its limit is not served at all).
///
/// ```
/// use iovirt_sched::{ClientParams, MClock, Phase};
///
/// let mut s = MClock::new();
/// let gold = s.add_client(ClientParams::new(100.0, None, 1.0).unwrap());
/// let bronze = s.add_client(ClientParams::new(0.0, Some(50.0), 1.0).unwrap());
/// for i in 0..4 {
///     s.enqueue(gold, ("gold", i), 1.0, 0).unwrap();
///     s.enqueue(bronze, ("bronze", i), 1.0, 0).unwrap();
/// }
/// // Reservations first: gold's first request is due at time 0.
/// let d = s.dispatch(0).unwrap();
/// assert_eq!((d.client, d.phase), (gold, Phase::Reservation));
/// // Then shares among clients under their limit.
/// let d = s.dispatch(0).unwrap();
/// assert_eq!((d.client, d.phase), (bronze, Phase::Weight));
/// ```
#[derive(Debug)]
pub struct MClock<T> {
    clients: Vec<Client<T>>,
    by_r: KeyedHeap<i64>,
    limited: KeyedHeap<i64>,
    ready: KeyedHeap<i128>,
    /// Stored P tags minus this offset are the paper's P tags: shifting every
    /// active client's P tag when an idle client returns is one subtraction.
    p_offset: i128,
    queued: usize,
}

impl<T> Default for MClock<T> {
    fn default() -> Self {
        Self::new()
    }
}

fn clamp_now(now: u64) -> i64 {
    now.min(i64::MAX as u64 / 2) as i64
}

impl<T> MClock<T> {
    /// An empty scheduler.
    pub fn new() -> Self {
        MClock {
            clients: Vec::new(),
            by_r: KeyedHeap::new(),
            limited: KeyedHeap::new(),
            ready: KeyedHeap::new(),
            p_offset: 0,
            queued: 0,
        }
    }

    /// Register a client with checked settings.
    pub fn add_client(&mut self, params: ClientParams) -> ClientId {
        self.clients.push(Client::new(params));
        ClientId((self.clients.len() - 1) as u32)
    }

    fn client(&self, id: ClientId) -> Result<&Client<T>, SchedError> {
        match self.clients.get(id.0 as usize) {
            Some(c) if !c.removed => Ok(c),
            _ => Err(SchedError::UnknownClient(id)),
        }
    }

    fn client_mut(&mut self, id: ClientId) -> Result<&mut Client<T>, SchedError> {
        match self.clients.get_mut(id.0 as usize) {
            Some(c) if !c.removed => Ok(c),
            _ => Err(SchedError::UnknownClient(id)),
        }
    }

    /// Remove a client; its queued items are handed back in order.
    pub fn remove_client(&mut self, id: ClientId) -> Result<Vec<T>, SchedError> {
        let c = self.client_mut(id)?;
        c.removed = true;
        let items: Vec<T> = c.queue.drain(..).map(|q| q.item).collect();
        self.queued -= items.len();
        self.by_r.remove(id.0);
        self.limited.remove(id.0);
        self.ready.remove(id.0);
        Ok(items)
    }

    /// A client's current settings.
    pub fn params(&self, id: ClientId) -> Result<ClientParams, SchedError> {
        Ok(self.client(id)?.params)
    }

    /// Change a client's settings at run time. Its queued requests are
    /// re-tagged from `now`: the new reservation and limit apply at once, and
    /// the new weight from the request at the head of its queue on.
    pub fn set_params(
        &mut self,
        id: ClientId,
        params: ClientParams,
        now: u64,
    ) -> Result<(), SchedError> {
        params.validate()?;
        let now = clamp_now(now);
        let p_offset = self.p_offset;
        let c = self.client_mut(id)?;
        c.set_rates(params);
        c.last_r = NEVER_R;
        c.last_l = NEVER_R;
        c.r_shift = 0;
        let mut queue = std::mem::take(&mut c.queue);
        if let Some(head) = queue.front() {
            c.last_p = head.p - ((head.cost + head.req.delta) * c.p_inv).ceil() as i128;
        }
        for q in queue.iter_mut() {
            let (r, l, p, r_own) = c.tag(q.cost, q.req, now, p_offset);
            (q.r, q.l, q.p, q.r_own) = (r, l, p, r_own);
            q.l_inc = ns((q.cost + q.req.delta) * c.l_inv);
        }
        c.queue = queue;
        self.requeue_head(id.0, now);
        Ok(())
    }

    /// Queue `item` for `client` with the given cost (see [`CostModel`]).
    pub fn enqueue(
        &mut self,
        client: ClientId,
        item: T,
        cost: f64,
        now: u64,
    ) -> Result<(), SchedError> {
        self.enqueue_with(client, item, cost, ReqParams::default(), now)
    }

    /// Like [`MClock::enqueue`], but hands the item back instead of dropping
    /// it when the client is unknown or the cost invalid (for items whose
    /// drop has side effects, such as completions).
    pub fn enqueue_returning(
        &mut self,
        client: ClientId,
        item: T,
        cost: f64,
        now: u64,
    ) -> Result<(), T> {
        if self.client(client).is_err() || !(cost.is_finite() && cost > 0.0) {
            return Err(item);
        }
        // Checked above: this cannot fail.
        let _ = self.enqueue(client, item, cost, now);
        Ok(())
    }

    /// Queue `item` with the dmClock `delta` and `rho` its client sent
    /// (see [`crate::ServiceTracker`]); with zeros this is plain mClock.
    pub fn enqueue_with(
        &mut self,
        client: ClientId,
        item: T,
        cost: f64,
        req: ReqParams,
        now: u64,
    ) -> Result<(), SchedError> {
        if !(cost.is_finite() && cost > 0.0) {
            return Err(SchedError::InvalidCost(cost));
        }
        let req = req.sanitized();
        let now = clamp_now(now);
        let was_idle = self.client(client)?.queue.is_empty();
        if was_idle {
            // An idle client comes back: synchronise the P tags so that the
            // smallest P tag among active clients is `now`, so the newcomer is
            // neither starved by nor starving the others.
            self.promote(now);
            if let Some((min_p, _)) = self.ready.peek() {
                self.p_offset = min_p - now as i128;
            }
        }
        let p_offset = self.p_offset;
        let c = self.client_mut(client)?;
        let (r, l, p, r_own) = c.tag(cost, req, now, p_offset);
        let l_inc = ns((cost + req.delta) * c.l_inv);
        c.queue.push_back(Queued {
            item,
            cost,
            req,
            arrival: now,
            r,
            l,
            p,
            r_own,
            l_inc,
        });
        self.queued += 1;
        if was_idle {
            self.requeue_head(client.0, now);
        }
        Ok(())
    }

    /// Move clients whose limit tag has come due into the weight-phase heap.
    fn promote(&mut self, now: i64) {
        while let Some((l, id)) = self.limited.peek() {
            if l > now {
                break;
            }
            self.limited.remove(id);
            let floor = self.ready.peek().map(|(p, _)| p);
            let c = &mut self.clients[id as usize];
            if let Some(head) = c.queue.front() {
                // Held back by its limit, the client's P tags fell behind:
                // lift them to the smallest ready P tag so it banks no share.
                let mut p = head.p + c.p_boost;
                if let Some(floor) = floor.filter(|&f| f > p) {
                    c.p_boost += floor - p;
                    p = floor;
                }
                self.ready.set(id, p);
                if c.has_reservation() {
                    self.by_r.set(id, head.r - c.r_shift);
                }
            }
        }
    }

    /// Put client `id` into the heaps according to the request at its head.
    fn requeue_head(&mut self, id: u32, now: i64) {
        let c = &self.clients[id as usize];
        match c.queue.front() {
            None => {
                self.by_r.remove(id);
                self.limited.remove(id);
                self.ready.remove(id);
            }
            Some(head) => {
                let l = c.head_l().unwrap_or(head.l);
                if l <= now {
                    self.limited.remove(id);
                    self.ready.set(id, head.p + c.p_boost);
                    if c.has_reservation() {
                        self.by_r.set(id, head.r - c.r_shift);
                    } else {
                        self.by_r.remove(id);
                    }
                } else {
                    // At its limit: not even its reservation is served (it
                    // cannot exceed the limit) until the limit tag comes due.
                    self.ready.remove(id);
                    self.by_r.remove(id);
                    self.limited.set(id, l);
                }
            }
        }
    }

    /// Choose the next request at time `now`: the smallest reservation tag
    /// that is due, else the smallest proportional-share tag among clients
    /// whose limit tag is due. `None` when nothing is queued or every client
    /// with queued requests is over its limit (see [`MClock::next_eligible`]).
    pub fn dispatch(&mut self, now: u64) -> Option<Dispatched<T>> {
        let now = clamp_now(now);
        self.promote(now);
        if let Some((r, id)) = self.by_r.peek() {
            if r <= now {
                return self.serve(id, Phase::Reservation, now);
            }
        }
        let (_, id) = self.ready.peek()?;
        self.serve(id, Phase::Weight, now)
    }

    fn serve(&mut self, id: u32, phase: Phase, now: i64) -> Option<Dispatched<T>> {
        let c = &mut self.clients[id as usize];
        let l = c.head_l()?;
        let q = c.queue.pop_front()?;
        // Lateness of up to one spacing (the dispatcher's own granularity)
        // is forgiven; more is not carried over as a burst.
        c.l_floor = l.max(now.saturating_sub(q.l_inc));
        if phase == Phase::Weight && c.has_reservation() {
            // Served from its share, not its reservation: give the
            // reservation spacing back to the requests behind it.
            c.r_shift = c.r_shift.saturating_add(q.r_own);
        }
        self.queued -= 1;
        self.requeue_head(id, now);
        Some(Dispatched {
            client: ClientId(id),
            item: q.item,
            phase,
            cost: q.cost,
            arrival: q.arrival.max(0) as u64,
        })
    }

    /// The earliest time at which [`MClock::dispatch`] will return a request
    /// (it may already have passed); `None` when nothing is queued.
    pub fn next_eligible(&self) -> Option<u64> {
        if self.ready.len() > 0 {
            return Some(0);
        }
        // Clients with a reservation tag due are in `ready` too.
        let (l, _) = self.limited.peek()?;
        Some(l.max(0) as u64)
    }

    /// Whether a dispatch at `now` would return a request.
    pub fn is_eligible(&self, now: u64) -> bool {
        self.next_eligible().is_some_and(|t| t <= now)
    }

    /// Requests queued over all clients.
    pub fn len(&self) -> usize {
        self.queued
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.queued == 0
    }

    /// Requests queued for one client.
    pub fn queue_len(&self, id: ClientId) -> Result<usize, SchedError> {
        Ok(self.client(id)?.queue.len())
    }

    /// Ids of the registered clients.
    pub fn clients(&self) -> impl Iterator<Item = ClientId> + '_ {
        self.clients
            .iter()
            .enumerate()
            .filter(|(_, c)| !c.removed)
            .map(|(i, _)| ClientId(i as u32))
    }
}

#[cfg(test)]
impl<T> MClock<T> {
    /// Brute force over all clients, for the property tests: the client and
    /// phase a dispatch at `now` must choose, by the paper's rules.
    pub(crate) fn expected_choice(&self, now: u64) -> Option<(ClientId, Phase)> {
        let now = clamp_now(now);
        let heads = self
            .clients
            .iter()
            .enumerate()
            .filter(|(_, c)| !c.removed)
            .filter_map(|(i, c)| c.queue.front().map(|h| (i as u32, c, h)));
        let mut by_r = None;
        let mut by_p = None;
        for (i, c, h) in heads {
            let r = h.r - c.r_shift;
            let under_limit = c.head_l().is_some_and(|l| l <= now);
            if c.has_reservation()
                && under_limit
                && r <= now
                && by_r.is_none_or(|(br, bi)| (r, i) < (br, bi))
            {
                by_r = Some((r, i));
            }
            if c.head_l().is_some_and(|l| l <= now) {
                by_p = Some(by_p.map_or(i, |b: u32| b));
            }
        }
        if let Some((_, i)) = by_r {
            return Some((ClientId(i), Phase::Reservation));
        }
        by_p.map(|_| (ClientId(u32::MAX), Phase::Weight))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// Serve one request every `gap` ns for `n` steps with every client
    /// backlogged; count dispatches per client.
    fn run(s: &mut MClock<u32>, ids: &[ClientId], gap: u64, n: u64) -> Vec<u64> {
        let mut counts = vec![0u64; ids.len()];
        for &id in ids {
            for i in 0..4 {
                s.enqueue(id, i, 1.0, 0).unwrap();
            }
        }
        for step in 0..n {
            let now = step * gap;
            if let Some(d) = s.dispatch(now) {
                let i = ids.iter().position(|&c| c == d.client).unwrap();
                counts[i] += 1;
                s.enqueue(d.client, 0, 1.0, now).unwrap();
            }
        }
        counts
    }

    #[test]
    fn weights_share_the_capacity() {
        let mut s = MClock::new();
        let a = s.add_client(ClientParams::weight(1.0).unwrap());
        let b = s.add_client(ClientParams::weight(3.0).unwrap());
        let c = run(&mut s, &[a, b], MS, 4000);
        assert!((c[1] as f64 / c[0] as f64 - 3.0).abs() < 0.05, "{c:?}");
    }

    #[test]
    fn reservation_and_limit() {
        // 1000 IOPS; a: reservation 600 weight 1; b: weight 9 limit 300; c: weight 1.
        let mut s = MClock::new();
        let a = s.add_client(ClientParams::new(600.0, None, 1.0).unwrap());
        let b = s.add_client(ClientParams::new(0.0, Some(300.0), 9.0).unwrap());
        let c = s.add_client(ClientParams::weight(1.0).unwrap());
        let n = run(&mut s, &[a, b, c], MS, 10_000);
        // 10 s: a ≥ 6000, b ≤ 3000, c the rest.
        assert!(n[0] >= 5990 && n[1] <= 3001, "{n:?}");
        assert!(n[0] + n[1] + n[2] == 10_000, "{n:?}");
    }

    #[test]
    fn idle_client_gets_no_banked_credit() {
        let mut s = MClock::new();
        let a = s.add_client(ClientParams::weight(1.0).unwrap());
        let b = s.add_client(ClientParams::weight(1.0).unwrap());
        // a alone for 5 s at 1000 IOPS.
        for i in 0..4 {
            s.enqueue(a, i, 1.0, 0).unwrap();
        }
        let mut now = 0;
        for _ in 0..5000 {
            let d = s.dispatch(now).unwrap();
            s.enqueue(d.client, 0, 1.0, now).unwrap();
            now += MS;
        }
        // b arrives: the next 1000 dispatches split evenly, not all to b.
        for i in 0..4 {
            s.enqueue(b, i, 1.0, now).unwrap();
        }
        let mut nb = 0;
        for _ in 0..1000 {
            let d = s.dispatch(now).unwrap();
            nb += u32::from(d.client == b);
            s.enqueue(d.client, 0, 1.0, now).unwrap();
            now += MS;
        }
        assert!((480..=520).contains(&nb), "{nb}");
    }

    #[test]
    fn limit_holds_back_and_next_eligible_says_when() {
        let mut s = MClock::new();
        let a = s.add_client(ClientParams::new(0.0, Some(10.0), 1.0).unwrap());
        for i in 0..3 {
            s.enqueue(a, i, 1.0, 0).unwrap();
        }
        assert!(s.dispatch(0).is_some());
        assert!(s.dispatch(0).is_none());
        assert_eq!(s.next_eligible(), Some(100 * MS));
        assert!(!s.is_eligible(99 * MS));
        assert!(s.dispatch(100 * MS).is_some());
        // Raising the limit at run time applies to what is queued.
        s.set_params(a, ClientParams::weight(1.0).unwrap(), 101 * MS)
            .unwrap();
        assert!(s.dispatch(101 * MS).is_some());
        assert!(s.is_empty());
    }

    #[test]
    fn bad_input_is_a_typed_error() {
        let mut s: MClock<()> = MClock::new();
        assert!(matches!(
            s.enqueue(ClientId(3), (), 1.0, 0),
            Err(SchedError::UnknownClient(_))
        ));
        let a = s.add_client(ClientParams::default());
        assert!(matches!(
            s.enqueue(a, (), f64::NAN, 0),
            Err(SchedError::InvalidCost(_))
        ));
        assert!(ClientParams::new(10.0, Some(5.0), 1.0).is_err());
        assert!(ClientParams::new(0.0, None, 0.0).is_err());
        assert!("weight=2,limit=none,reservation=5"
            .parse::<ClientParams>()
            .is_ok());
        assert!("weight=-1".parse::<ClientParams>().is_err());
        assert!("speed=3".parse::<ClientParams>().is_err());
        s.enqueue(a, (), 1.0, 0).unwrap();
        assert_eq!(s.remove_client(a).unwrap().len(), 1);
        assert!(s.dispatch(0).is_none());
    }

    #[test]
    fn cost_grows_with_size() {
        let m = CostModel::default();
        assert!(m.cost(1 << 20) > m.cost(4096));
        assert_eq!(CostModel::UNIT.cost(1 << 20), 1.0);
        // 100 MB/s and 5 ms positioning: 500 kB per unit.
        assert_eq!(
            CostModel::paper(100_000_000, 5_000_000).bytes_per_unit,
            500_000
        );
        // Two weight-equal clients, one with 4x larger requests: equal cost shares.
        let mut s = MClock::new();
        let small = s.add_client(ClientParams::weight(1.0).unwrap());
        let big = s.add_client(ClientParams::weight(1.0).unwrap());
        let (cs, cb) = (1.0, 4.0);
        for _ in 0..4 {
            s.enqueue(small, (), cs, 0).unwrap();
            s.enqueue(big, (), cb, 0).unwrap();
        }
        let mut spent = [0.0f64; 2];
        for step in 0..5000u64 {
            let d = s.dispatch(step).unwrap();
            let i = usize::from(d.client == big);
            spent[i] += d.cost;
            s.enqueue(d.client, (), d.cost, step).unwrap();
        }
        assert!((spent[0] / spent[1] - 1.0).abs() < 0.02, "{spent:?}");
    }
}
