//! Process metrics as plain atomics, rendered in the Prometheus text format for `/metrics`.
//! Counting is lock-free and never allocates, so it is safe on the fan-out path (one add per
//! published event, not per delivery). Knows nothing of what it counts beyond names.

use crate::protocol::CommandKind;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds (seconds) of the commit-latency histogram buckets.
const COMMIT_BUCKETS_S: [f64; 10] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];
/// Upper bounds of the batch-size histogram buckets.
const BATCH_BUCKETS: [f64; 8] = [1.0, 2.0, 4.0, 8.0, 16.0, 64.0, 256.0, 1024.0];

struct Histogram<const N: usize> {
    bounds: [f64; N],
    counts: [AtomicU64; N],
    count: AtomicU64,
    /// Sum in micro-units (microseconds or rows x 1e6) to stay integral.
    sum_micro: AtomicU64,
}

impl<const N: usize> Histogram<N> {
    fn new(bounds: [f64; N]) -> Self {
        Self {
            bounds,
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_micro: AtomicU64::new(0),
        }
    }

    fn observe(&self, v: f64) {
        for (i, b) in self.bounds.iter().enumerate() {
            if v <= *b {
                self.counts[i].fetch_add(1, Relaxed);
                break;
            }
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_micro.fetch_add((v * 1e6) as u64, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, b) in self.bounds.iter().enumerate() {
            cumulative += self.counts[i].load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_micro.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {count}");
    }
}

pub struct Metrics {
    pub connections_open: AtomicI64,
    pub connections_total: AtomicU64,
    commands: [AtomicU64; CommandKind::ALL.len()],
    pub events_published: AtomicU64,
    pub deliveries: AtomicU64,
    pub slow_consumer_closes: AtomicU64,
    /// Resumes replayed from the hub's copy of the room's latest events, and from the store.
    pub replays_from_memory: AtomicU64,
    pub replays_from_store: AtomicU64,
    /// Write loops parked with nothing to write (each started again by its next frame).
    pub writers_parked: AtomicU64,
    /// Times freed heap pages were given back to the system.
    pub heap_trims: AtomicU64,
    pub rate_limited: AtomicU64,
    pub frames_too_large: AtomicU64,
    pub auth_failures: AtomicU64,
    commit_latency: Histogram<10>,
    /// The SQLite log syncs the writer's publisher made (see `store/writer.rs`).
    log_sync_latency: Histogram<10>,
    batch_size: Histogram<8>,
    // -- cluster mode (cluster/) --
    /// Room events this node published on the bus (once each, after commit).
    pub bus_published: AtomicU64,
    /// Room events received from other nodes.
    pub bus_received: AtomicU64,
    /// Refills from the store (a gap that NATS did not fill in time, or a sweep).
    pub bus_gap_refills: AtomicU64,
    /// Events delivered from a refill rather than from the bus.
    pub bus_refilled_events: AtomicU64,
    /// Bus copies dropped because the seq was already delivered (a refill got there first).
    pub bus_duplicates: AtomicU64,
    /// Directed frames (calls, signals) sent to sessions on other nodes.
    pub bus_directed: AtomicU64,
    /// Presence heartbeats sent, and the NATS messages (parts) they took.
    pub bus_heartbeats: AtomicU64,
    pub bus_heartbeat_parts: AtomicU64,
    /// Publish-to-receipt time of room events between nodes.
    bus_latency: Histogram<10>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            connections_open: AtomicI64::new(0),
            connections_total: AtomicU64::new(0),
            commands: std::array::from_fn(|_| AtomicU64::new(0)),
            events_published: AtomicU64::new(0),
            deliveries: AtomicU64::new(0),
            slow_consumer_closes: AtomicU64::new(0),
            replays_from_memory: AtomicU64::new(0),
            replays_from_store: AtomicU64::new(0),
            writers_parked: AtomicU64::new(0),
            heap_trims: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            frames_too_large: AtomicU64::new(0),
            auth_failures: AtomicU64::new(0),
            commit_latency: Histogram::new(COMMIT_BUCKETS_S),
            log_sync_latency: Histogram::new(COMMIT_BUCKETS_S),
            batch_size: Histogram::new(BATCH_BUCKETS),
            bus_published: AtomicU64::new(0),
            bus_received: AtomicU64::new(0),
            bus_gap_refills: AtomicU64::new(0),
            bus_refilled_events: AtomicU64::new(0),
            bus_duplicates: AtomicU64::new(0),
            bus_directed: AtomicU64::new(0),
            bus_heartbeats: AtomicU64::new(0),
            bus_heartbeat_parts: AtomicU64::new(0),
            bus_latency: Histogram::new(COMMIT_BUCKETS_S),
        }
    }
}

impl Metrics {
    pub fn command(&self, kind: CommandKind) {
        if let Some(i) = CommandKind::ALL.iter().position(|k| *k == kind) {
            self.commands[i].fetch_add(1, Relaxed);
        }
    }

    pub fn store_batch(&self, rows: usize, took: Duration) {
        self.batch_size.observe(rows as f64);
        self.commit_latency.observe(took.as_secs_f64());
    }

    /// One sync of the SQLite log before a group commit is answered.
    pub fn store_log_sync(&self, took: Duration) {
        self.log_sync_latency.observe(took.as_secs_f64());
    }

    /// One room event's trip from the publishing node to this one.
    pub fn bus_latency(&self, took: Duration) {
        self.bus_latency.observe(took.as_secs_f64());
    }

    /// Prometheus text exposition; `rooms` and `sessions` are gauges read from the hub, and
    /// `more` are counters kept elsewhere (the SFU's).
    pub fn render(&self, rooms: usize, sessions: usize, more: &[(&str, &str, u64)]) -> String {
        let mut out = String::with_capacity(4096);
        self.render_gauges(&mut out, rooms, sessions);
        self.render_counters(&mut out);
        write_counters(&mut out, more);
        self.render_commands(&mut out);
        self.batch_size.render(
            &mut out,
            "studyhall_store_batch_rows",
            "Writes per group commit.",
        );
        self.commit_latency.render(
            &mut out,
            "studyhall_store_commit_seconds",
            "Time to apply and commit one group commit.",
        );
        self.log_sync_latency.render(
            &mut out,
            "studyhall_store_log_sync_seconds",
            "Time to sync the SQLite log before a group commit is answered (SQLite at `full` \
             with `sqlite_commit_syncs = false`).",
        );
        self.render_bus(&mut out);
        out
    }

    /// The gauges: open connections, signed-in sessions and active rooms.
    fn render_gauges(&self, out: &mut String, rooms: usize, sessions: usize) {
        let mut gauge = |name: &str, help: &str, v: i64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(
            "studyhall_connections",
            "Open WebSocket connections.",
            self.connections_open.load(Relaxed),
        );
        gauge("studyhall_sessions", "Signed-in sessions.", sessions as i64);
        gauge(
            "studyhall_rooms_active",
            "Rooms with at least one joined session.",
            rooms as i64,
        );
    }

    /// The node's connection and fan-out counters.
    fn render_counters(&self, out: &mut String) {
        let counters: [(&str, &str, u64); 11] = [
            (
                "studyhall_connections_total",
                "WebSocket connections accepted.",
                self.connections_total.load(Relaxed),
            ),
            (
                "studyhall_events_published_total",
                "Room events fanned out.",
                self.events_published.load(Relaxed),
            ),
            (
                "studyhall_deliveries_total",
                "Frames queued to sessions by fan-out.",
                self.deliveries.load(Relaxed),
            ),
            (
                "studyhall_slow_consumer_closes_total",
                "Sessions closed 4008 for a full outbox.",
                self.slow_consumer_closes.load(Relaxed),
            ),
            (
                "studyhall_replays_memory_total",
                "Resumes (join with after_seq) replayed from the room's latest events in memory.",
                self.replays_from_memory.load(Relaxed),
            ),
            (
                "studyhall_replays_store_total",
                "Resumes (join with after_seq) replayed from the store.",
                self.replays_from_store.load(Relaxed),
            ),
            (
                "studyhall_writers_parked_total",
                "Session write loops parked after write_idle_ms with nothing to write.",
                self.writers_parked.load(Relaxed),
            ),
            (
                "studyhall_heap_trims_total",
                "Times freed heap pages were given back to the system (heap_trim_parks).",
                self.heap_trims.load(Relaxed),
            ),
            (
                "studyhall_rate_limited_total",
                "Commands refused by the rate limit.",
                self.rate_limited.load(Relaxed),
            ),
            (
                "studyhall_frames_too_large_total",
                "Connections closed 1009.",
                self.frames_too_large.load(Relaxed),
            ),
            (
                "studyhall_auth_failures_total",
                "Connections closed 4001.",
                self.auth_failures.load(Relaxed),
            ),
        ];
        write_counters(out, &counters);
    }

    /// Client commands, one series per command type.
    fn render_commands(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP studyhall_commands_total Client commands by type.\n# TYPE studyhall_commands_total counter"
        );
        for (i, kind) in CommandKind::ALL.iter().enumerate() {
            let _ = writeln!(
                out,
                "studyhall_commands_total{{type=\"{}\"}} {}",
                kind.as_str(),
                self.commands[i].load(Relaxed)
            );
        }
    }

    /// The cluster bus's counters and its cross-node latency.
    fn render_bus(&self, out: &mut String) {
        let counters: [(&str, &str, u64); 8] = [
            (
                "studyhall_bus_published_total",
                "Room events this node published on the cluster bus.",
                self.bus_published.load(Relaxed),
            ),
            (
                "studyhall_bus_received_total",
                "Room events received from other nodes.",
                self.bus_received.load(Relaxed),
            ),
            (
                "studyhall_bus_gap_refills_total",
                "Refills of missing seqs from the store.",
                self.bus_gap_refills.load(Relaxed),
            ),
            (
                "studyhall_bus_refilled_events_total",
                "Room events delivered from a store refill instead of the bus.",
                self.bus_refilled_events.load(Relaxed),
            ),
            (
                "studyhall_bus_duplicates_total",
                "Bus copies dropped as already delivered.",
                self.bus_duplicates.load(Relaxed),
            ),
            (
                "studyhall_bus_directed_total",
                "Directed frames sent to sessions on other nodes.",
                self.bus_directed.load(Relaxed),
            ),
            (
                "studyhall_bus_heartbeats_total",
                "Presence heartbeats this node sent.",
                self.bus_heartbeats.load(Relaxed),
            ),
            (
                "studyhall_bus_heartbeat_parts_total",
                "NATS messages those heartbeats took (a big node's heartbeat is split).",
                self.bus_heartbeat_parts.load(Relaxed),
            ),
        ];
        write_counters(out, &counters);
        self.bus_latency.render(
            out,
            "studyhall_bus_latency_seconds",
            "Cross-node latency: commit-side publish to receipt on this node.",
        );
    }
}

/// Writes each (name, help, value) as a Prometheus counter.
fn write_counters(out: &mut String, counters: &[(&str, &str, u64)]) {
    for (name, help, v) in counters {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms() {
        let m = Metrics::default();
        m.command(CommandKind::Send);
        m.store_batch(3, Duration::from_millis(2));
        let text = m.render(1, 2, &[("studyhall_x_total", "X.", 7)]);
        assert!(text.contains("# TYPE studyhall_x_total counter\nstudyhall_x_total 7"));
        assert!(text.contains("studyhall_commands_total{type=\"send\"} 1"));
        assert!(text.contains("studyhall_store_batch_rows_bucket{le=\"4\"} 1"));
        assert!(text.contains("studyhall_store_commit_seconds_count 1"));
        assert!(text.contains("studyhall_sessions 2"));
    }
}
