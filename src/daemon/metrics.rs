//! Prometheus metrics: counters kept by the daemon loop, rendered in the text
//! exposition format 0.0.4, served by hyper's HTTP/1.1 server (one request
//! per connection), bounded: a connection cap and a deadline per connection,
//! so slow or idle clients cannot take the daemon's descriptors.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::audit::Tally;
use crate::transfer::PullCounters;

/// The content type Prometheus expects for the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// A request head larger than this is not a scrape (hyper's minimum buffer).
const MAX_REQUEST: usize = 8 * 1024;

#[derive(Debug, Default)]
struct Values {
    reconciles: u64,
    failures: u64,
    /// `(action, outcome)` -> count, from what each reconcile reported of
    /// the audit records it wrote.
    actions: BTreeMap<(String, String), u64>,
    bytes_freed: u64,
    last_timestamp: Option<f64>,
    last_duration: Option<f64>,
    images: Option<u64>,
    image_bytes: Option<u64>,
    trash: Option<crate::trash::Totals>,
    reload_errors: u64,
    engine_reachable: bool,
    pulls: PullCounters,
    /// A registry policy: `(source, digest in force, unix time of the last
    /// successful check)`.
    policy_remote: Option<(String, String, Option<f64>)>,
}

/// The daemon's metrics. Cheap to update; rendered on each scrape.
#[derive(Debug, Default)]
pub struct Metrics {
    values: Mutex<Values>,
}

impl Metrics {
    fn with<T>(&self, f: impl FnOnce(&mut Values) -> T) -> T {
        // A panic while holding the lock leaves plain numbers: still usable.
        let mut guard = self.values.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }

    /// Counts one finished reconcile and the audit records it wrote (its
    /// report's tally, not the log read back: another process's records
    /// are not this daemon's, and a rotated log is not counted twice).
    pub fn reconciled(&self, finished_at: f64, duration: Duration, failed: bool, records: &Tally) {
        self.with(|v| {
            v.reconciles += 1;
            if failed {
                v.failures += 1;
            }
            v.last_timestamp = Some(finished_at);
            v.last_duration = Some(duration.as_secs_f64());
            for (&(action, outcome), n) in &records.records {
                *v.actions
                    .entry((action.as_str().to_owned(), outcome.as_str().to_owned()))
                    .or_default() += n;
            }
            v.bytes_freed += records.bytes_freed;
        });
    }

    pub fn images(&self, count: u64, bytes: u64) {
        self.with(|v| {
            v.images = Some(count);
            v.image_bytes = Some(bytes);
        });
    }

    /// What the trash holds after a reconcile.
    pub fn trash(&self, totals: crate::trash::Totals) {
        self.with(|v| v.trash = Some(totals));
    }

    /// Adds what one reconcile's pulls moved and found corrupt.
    pub fn pulls(&self, counters: &PullCounters) {
        self.with(|v| v.pulls.add(counters));
    }

    pub fn reload_error(&self) {
        self.with(|v| v.reload_errors += 1);
    }

    /// The registry policy in force and when its registry last answered.
    pub fn policy_remote(&self, source: &str, digest: &str, last_success: Option<f64>) {
        self.with(|v| v.policy_remote = Some((source.to_owned(), digest.to_owned(), last_success)));
    }

    pub fn engine_reachable(&self, up: bool) {
        self.with(|v| v.engine_reachable = up);
    }

    /// Finished reconciles so far (tests of the loop).
    #[cfg(feature = "testkit")]
    pub fn reconciles(&self) -> u64 {
        self.with(|v| v.reconciles)
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        self.with(|v| {
            let mut out = String::new();
            let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, String)]| {
                let _ = writeln!(out, "# HELP {name} {help}");
                let _ = writeln!(out, "# TYPE {name} {kind}");
                for (labels, value) in samples {
                    let _ = writeln!(out, "{name}{labels} {value}");
                }
            };
            let one = |value: String| vec![(String::new(), value)];
            metric(
                "stowage_reconciles_total",
                "counter",
                "Reconciles run (including those that failed).",
                &one(v.reconciles.to_string()),
            );
            metric(
                "stowage_reconcile_failures_total",
                "counter",
                "Reconciles that could not run or had failed actions.",
                &one(v.failures.to_string()),
            );
            let actions: Vec<(String, String)> = v
                .actions
                .iter()
                .map(|((kind, outcome), n)| {
                    (
                        format!(
                            "{{kind=\"{}\",outcome=\"{}\"}}",
                            escape(kind),
                            escape(outcome)
                        ),
                        n.to_string(),
                    )
                })
                .collect();
            metric(
                "stowage_actions_total",
                "counter",
                "Audit records written, by action kind and outcome.",
                &actions,
            );
            metric(
                "stowage_bytes_freed_total",
                "counter",
                "Bytes freed by removals, evictions and build-cache pruning.",
                &one(v.bytes_freed.to_string()),
            );
            metric(
                "stowage_pull_bytes_received_total",
                "counter",
                "Bytes pulls received over the network, failed attempts included.",
                &one(v.pulls.bytes_received.to_string()),
            );
            metric(
                "stowage_pull_resumed_bytes_total",
                "counter",
                "Bytes partial downloads already had when a pull resumed them (not fetched again).",
                &one(v.pulls.resumed_bytes.to_string()),
            );
            metric(
                "stowage_pull_verification_failures_total",
                "counter",
                "Downloads that failed verification (size or sha256), discarded and never handed on.",
                &one(v.pulls.verify_failures.to_string()),
            );
            let optional = |x: Option<String>| x.map(one).unwrap_or_default();
            metric(
                "stowage_last_reconcile_timestamp_seconds",
                "gauge",
                "Unix time the last reconcile finished.",
                &optional(v.last_timestamp.map(|t| format!("{t:.3}"))),
            );
            metric(
                "stowage_last_reconcile_duration_seconds",
                "gauge",
                "How long the last reconcile took.",
                &optional(v.last_duration.map(|t| format!("{t:.3}"))),
            );
            metric(
                "stowage_images",
                "gauge",
                "Images on the engine after the last reconcile.",
                &optional(v.images.map(|n| n.to_string())),
            );
            metric(
                "stowage_image_bytes",
                "gauge",
                "Sum of image sizes as the engine lists them (shared layers counted per image).",
                &optional(v.image_bytes.map(|n| n.to_string())),
            );
            metric(
                "stowage_trash_images",
                "gauge",
                "Images in the trash ([daemon] trash) after the last reconcile, due ones included.",
                &optional(v.trash.map(|t| t.images.to_string())),
            );
            metric(
                "stowage_trash_bytes",
                "gauge",
                "Sum of the sizes of the images in the trash, as the engine lists them.",
                &optional(v.trash.map(|t| t.bytes.to_string())),
            );
            metric(
                "stowage_policy_reload_errors_total",
                "counter",
                "Policy reloads rejected as invalid (the old policy stayed in force).",
                &one(v.reload_errors.to_string()),
            );
            metric(
                "stowage_engine_reachable",
                "gauge",
                "1 when the Docker engine answers, else 0.",
                &one(u8::from(v.engine_reachable).to_string()),
            );
            if let Some((source, digest, last)) = &v.policy_remote {
                metric(
                    "stowage_policy_info",
                    "gauge",
                    "The registry policy in force (its digest as a label).",
                    &[(
                        format!(
                            "{{source=\"{}\",digest=\"{}\"}}",
                            escape(source),
                            escape(digest)
                        ),
                        "1".to_owned(),
                    )],
                );
                // The age at scrape time: Prometheus sees a stalled fleet
                // member without computing it from the timestamp.
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64());
                metric(
                    "stowage_policy_check_age_seconds",
                    "gauge",
                    "Seconds since the registry policy was last checked successfully.",
                    &optional(last.map(|t| format!("{:.3}", (now - t).max(0.0)))),
                );
                metric(
                    "stowage_policy_last_check_success_timestamp_seconds",
                    "gauge",
                    "Unix time of the last successful check of the registry policy.",
                    &optional(last.map(|t| format!("{t:.3}"))),
                );
            }
            out
        })
    }
}

/// Bytes an audit record freed: removals, evictions and build-cache pruning.
/// Label values escape `\`, `"` and newlines.
fn escape(v: &str) -> String {
    v.replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

/// Binds `addr` (`host:port`).
pub async fn bind(addr: &str) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Scrapes served at once. More wait in the kernel's listen queue, where they
/// hold none of the daemon's file descriptors, until a slot frees: at most
/// [`CONNECTION_DEADLINE`] later.
pub const MAX_CONNECTIONS: usize = 16;
/// A connection ends this long after it was accepted, whatever it is doing
/// (a client sending slowly, or reading the answer slowly).
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);
const LIMITS: crate::httpd::Limits = crate::httpd::Limits {
    name: "metrics",
    connections: MAX_CONNECTIONS,
    header_timeout: Duration::from_secs(5),
    deadline: CONNECTION_DEADLINE,
    max_request: MAX_REQUEST,
    drain: Duration::from_secs(2),
};

/// Serves `GET /metrics` until `shutdown` with the bounds of [`crate::httpd`]:
/// at most [`MAX_CONNECTIONS`] at once, each for at most
/// [`CONNECTION_DEADLINE`].
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let service = hyper::service::service_fn(move |req| {
        let answer = answer(&req, &metrics);
        async move { Ok::<_, std::convert::Infallible>(answer) }
    });
    crate::httpd::serve(listener, LIMITS, shutdown, service).await;
}

type Body = http_body_util::Full<bytes::Bytes>;

fn answer(req: &hyper::Request<hyper::body::Incoming>, metrics: &Metrics) -> hyper::Response<Body> {
    use hyper::{Method, StatusCode};
    let head = req.method() == Method::HEAD;
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => {
            (StatusCode::OK, CONTENT_TYPE, metrics.render())
        }
        (&Method::GET | &Method::HEAD, "/") => (
            StatusCode::OK,
            "text/plain; charset=utf-8",
            "stowage: metrics at /metrics\n".to_owned(),
        ),
        (&Method::GET | &Method::HEAD, _) => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
        _ => (StatusCode::METHOD_NOT_ALLOWED, "text/plain", String::new()),
    };
    let length = body.len();
    let mut response = hyper::Response::new(Body::new(if head {
        bytes::Bytes::new()
    } else {
        bytes::Bytes::from(body)
    }));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    // HEAD says how long the GET answer would be.
    headers.insert(hyper::header::CONTENT_LENGTH, length.into());
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Action, AuditLog, Outcome, Record};

    fn record(action: Action, outcome: Outcome, bytes: Option<u64>) -> Record {
        Record {
            ts: chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            run: "r".into(),
            action,
            reference: None,
            image: None,
            rule: None,
            reason: String::new(),
            outcome,
            error: None,
            bytes,
            duration_ms: None,
            resumed_bytes: None,
        }
    }

    #[test]
    fn renders_every_family_with_help_and_type() {
        let m = Metrics::default();
        let dir = tempfile::tempdir().unwrap();
        let mut log = AuditLog::open_lenient(&dir.path().join("audit.jsonl"), u64::MAX);
        for r in [
            record(Action::Remove, Outcome::Ok, Some(100)),
            record(Action::Remove, Outcome::Ok, Some(50)),
            record(Action::Remove, Outcome::Failed, None),
            record(Action::Untag, Outcome::Ok, None),
        ] {
            log.append(&r);
        }
        m.reconciled(
            1_700_000_000.5,
            Duration::from_millis(1500),
            true,
            log.tally(),
        );
        m.images(3, 4096);
        m.trash(crate::trash::Totals {
            images: 2,
            bytes: 1500,
        });
        m.engine_reachable(true);
        m.reload_error();
        for _ in 0..2 {
            m.pulls(&PullCounters {
                bytes_received: 1000,
                resumed_bytes: 24,
                verify_failures: 1,
            });
        }
        let text = m.render();
        for line in [
            "stowage_reconciles_total 1",
            "stowage_reconcile_failures_total 1",
            "stowage_actions_total{kind=\"remove\",outcome=\"ok\"} 2",
            "stowage_actions_total{kind=\"remove\",outcome=\"failed\"} 1",
            "stowage_actions_total{kind=\"untag\",outcome=\"ok\"} 1",
            "stowage_bytes_freed_total 150",
            "stowage_last_reconcile_timestamp_seconds 1700000000.500",
            "stowage_last_reconcile_duration_seconds 1.500",
            "stowage_images 3",
            "stowage_image_bytes 4096",
            "stowage_trash_images 2",
            "stowage_trash_bytes 1500",
            "# TYPE stowage_trash_bytes gauge",
            "stowage_policy_reload_errors_total 1",
            "stowage_engine_reachable 1",
            "stowage_pull_bytes_received_total 2000",
            "stowage_pull_resumed_bytes_total 48",
            "stowage_pull_verification_failures_total 2",
            "# TYPE stowage_actions_total counter",
            "# TYPE stowage_pull_bytes_received_total counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
