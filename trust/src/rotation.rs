//! When to renew a certificate: a pure decision over its validity and the current time.

use std::time::{Duration, SystemTime};

/// What the rotation loop should do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RotationPlan {
    /// Sleep this long, then renew.
    RenewIn(Duration),
    /// The half-life has passed: renew now.
    RenewNow,
}

/// Certificates are renewed at half-life, so a failed renewal has the other half to be retried.
pub fn next_rotation(not_before: SystemTime, not_after: SystemTime, now: SystemTime) -> RotationPlan {
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    let renew_at = not_before + lifetime / 2;
    match renew_at.duration_since(now) {
        Ok(d) if !d.is_zero() => RotationPlan::RenewIn(d),
        _ => RotationPlan::RenewNow,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_at_half_life() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let end = t0 + Duration::from_secs(24 * 3600);
        assert_eq!(
            next_rotation(t0, end, t0),
            RotationPlan::RenewIn(Duration::from_secs(12 * 3600))
        );
        assert_eq!(
            next_rotation(t0, end, t0 + Duration::from_secs(11 * 3600)),
            RotationPlan::RenewIn(Duration::from_secs(3600))
        );
        assert_eq!(
            next_rotation(t0, end, t0 + Duration::from_secs(12 * 3600)),
            RotationPlan::RenewNow
        );
        assert_eq!(
            next_rotation(t0, end, end + Duration::from_secs(5)),
            RotationPlan::RenewNow
        );
    }
}
