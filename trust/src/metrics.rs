use prometheus::{IntCounterVec, IntGauge, Opts, Registry};

/// TLS handshake failures by reason, completed handshakes by side and kind (full or resumed)
/// and the sessions held for resumption, shared by every verifier of one process.
#[derive(Clone, Debug)]
pub struct TlsMetrics {
    failures: IntCounterVec,
    completed: IntCounterVec,
    early: IntCounterVec,
    resumable: IntGauge,
}

impl TlsMetrics {
    pub fn new(registry: &Registry) -> Self {
        let failures = IntCounterVec::new(
            Opts::new(
                "strait_tls_handshake_failures_total",
                "Peers refused during a TLS handshake, by reason",
            ),
            &["reason"],
        )
        .expect("static metric definition is valid");
        let completed = IntCounterVec::new(
            Opts::new(
                "strait_tls_handshakes_total",
                "Completed mutual-TLS handshakes between proxies, by side (client, server) and kind (full; resumed: a session resumed without certificates)",
            ),
            &["side", "kind"],
        )
        .expect("static metric definition is valid");
        let early = IntCounterVec::new(
            Opts::new(
                "strait_tls_early_data_total",
                "Resumed handshakes of opaque streams whose client offered TLS 1.3 early data (0-RTT), by side and outcome: accepted; rejected (the server did not take it and the client sent it again after the handshake; counted by clients only)",
            ),
            &["side", "outcome"],
        )
        .expect("static metric definition is valid");
        let resumable = IntGauge::new(
            "strait_tls_resumable_sessions",
            "TLS 1.3 sessions this process holds for peers to resume (each ticket resumes once; one ticket is issued per handshake)",
        )
        .expect("static metric definition is valid");
        // A second registration (tests that build two stores in one registry) keeps the first.
        let _ = registry.register(Box::new(failures.clone()));
        let _ = registry.register(Box::new(completed.clone()));
        let _ = registry.register(Box::new(early.clone()));
        let _ = registry.register(Box::new(resumable.clone()));
        TlsMetrics {
            failures,
            completed,
            early,
            resumable,
        }
    }

    /// A metrics handle that is not exported anywhere (unit tests, one-shot CLI commands).
    pub fn unregistered() -> Self {
        Self::new(&Registry::new())
    }

    pub fn handshake_failure(&self, reason: &str) {
        self.failures.with_label_values(&[reason]).inc();
    }

    /// Counts a completed handshake; `side` is `client` or `server`.
    pub fn handshake_completed(&self, side: &str, kind: Option<rustls::HandshakeKind>) {
        let kind = match kind {
            Some(rustls::HandshakeKind::Resumed) => "resumed",
            _ => "full",
        };
        self.completed.with_label_values(&[side, kind]).inc();
    }

    /// Counts early data offered in a resumed handshake, taken by the server or not.
    pub fn early_data(&self, side: &str, accepted: bool) {
        let outcome = if accepted { "accepted" } else { "rejected" };
        self.early.with_label_values(&[side, outcome]).inc();
    }

    /// Sessions held for resumption changed by `by` (stored, taken, expired or evicted).
    pub(crate) fn resumable_sessions_changed(&self, by: i64) {
        self.resumable.add(by);
    }

    /// Sessions this process's servers hold for resumption.
    pub fn resumable_sessions(&self) -> i64 {
        self.resumable.get()
    }

    pub fn failures(&self, reason: &str) -> u64 {
        self.failures.with_label_values(&[reason]).get()
    }
}
