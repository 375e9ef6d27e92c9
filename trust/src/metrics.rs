use prometheus::{IntCounterVec, Opts, Registry};

/// TLS handshake failures by reason, shared by every verifier of one process.
#[derive(Clone, Debug)]
pub struct TlsMetrics {
    failures: IntCounterVec,
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
        // A second registration (tests that build two stores in one registry) keeps the first.
        let _ = registry.register(Box::new(failures.clone()));
        TlsMetrics { failures }
    }

    /// A metrics handle that is not exported anywhere (unit tests, one-shot CLI commands).
    pub fn unregistered() -> Self {
        Self::new(&Registry::new())
    }

    pub fn handshake_failure(&self, reason: &str) {
        self.failures.with_label_values(&[reason]).inc();
    }

    pub fn failures(&self, reason: &str) -> u64 {
        self.failures.with_label_values(&[reason]).get()
    }
}
