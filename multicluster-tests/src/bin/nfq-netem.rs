//! `nfq-netem`: packet delay and loss for kernels built without the netem qdisc (the CI kernel
//! here has none). iptables hands packets to an NFQUEUE; this holds each one for `--delay-ms`
//! before accepting it, and drops `--loss-percent` of them, so the kernel really delivers them
//! late or not at all, as `tc qdisc add ... netem delay D loss P` would on egress.
//!
//!   ip netns exec NS iptables -t mangle -A POSTROUTING -o eth1 -j NFQUEUE --queue-num 7 --queue-bypass
//!   ip netns exec NS nfq-netem --queue 7 --delay-ms 20 --loss-percent 3
//!
//! `--queue-bypass` and fail-open keep traffic flowing if this process stops or falls behind.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rand::Rng;

struct Args {
    queue: u16,
    delay: Duration,
    loss_percent: f64,
}

fn parse() -> anyhow::Result<Args> {
    let mut args = Args {
        queue: 0,
        delay: Duration::ZERO,
        loss_percent: 0.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .ok_or_else(|| anyhow::anyhow!("{flag} needs a value, e.g. {flag} 20"))?;
        match flag.as_str() {
            "--queue" => args.queue = value.parse()?,
            "--delay-ms" => args.delay = Duration::from_millis(value.parse()?),
            "--loss-percent" => args.loss_percent = value.parse()?,
            _ => anyhow::bail!("unknown flag {flag}: use --queue N --delay-ms D --loss-percent P"),
        }
    }
    if !(0.0..=100.0).contains(&args.loss_percent) {
        anyhow::bail!("--loss-percent must be between 0 and 100");
    }
    Ok(args)
}

fn main() -> anyhow::Result<()> {
    let args = parse()?;
    let mut queue = nfq::Queue::open()?;
    queue.bind(args.queue)?;
    queue.set_fail_open(args.queue, true)?;
    queue.set_queue_max_len(args.queue, 4096)?;
    queue.set_nonblocking(true);
    let mut rng = rand::rng();
    let mut held: VecDeque<(Instant, nfq::Message)> = VecDeque::new();
    let (mut passed, mut dropped) = (0u64, 0u64);
    eprintln!(
        "nfq-netem: queue {} delay {:?} loss {}%",
        args.queue, args.delay, args.loss_percent
    );
    loop {
        loop {
            match queue.recv() {
                Ok(mut msg) => {
                    if rng.random::<f64>() * 100.0 < args.loss_percent {
                        msg.set_verdict(nfq::Verdict::Drop);
                        queue.verdict(msg)?;
                        dropped += 1;
                    } else {
                        held.push_back((Instant::now() + args.delay, msg));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.into()),
            }
        }
        let now = Instant::now();
        while held.front().is_some_and(|(due, _)| *due <= now) {
            let (_, mut msg) = held.pop_front().expect("front exists");
            msg.set_verdict(nfq::Verdict::Accept);
            queue.verdict(msg)?;
            passed += 1;
            if passed.is_multiple_of(1000) {
                eprintln!("nfq-netem: {passed} delayed, {dropped} dropped");
            }
        }
        let next = held
            .front()
            .map(|(due, _)| due.saturating_duration_since(now))
            .unwrap_or(Duration::from_millis(1));
        std::thread::sleep(next.min(Duration::from_millis(1)));
    }
}
