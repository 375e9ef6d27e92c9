#!/usr/bin/env bash
# Runs every Strait test on this machine: formatting, lints, unit tests of each crate, and the
# multi-cluster end-to-end tests (real processes, real QUIC/TLS on loopback sockets).
# Installs what it needs (Debian packages) idempotently; reuses a cargo target directory
# outside the clone so repeated runs are incremental.
set -euo pipefail
cd "$(dirname "$0")"

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/strait/target}"
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
# One build per run: incremental compilation only costs time and disk (tens of GB over many runs).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

say() { printf '\n==> %s\n' "$*"; }

if ! command -v cargo >/dev/null 2>&1; then
  echo "test.sh: cargo is not installed; install Rust (rustup, stable >= 1.85) first" >&2
  exit 1
fi

# Tools the end-to-end tests drive for real.
missing=()
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
command -v iptables >/dev/null 2>&1 || missing+=(iptables)
command -v nft >/dev/null 2>&1 || missing+=(nftables)
command -v dig >/dev/null 2>&1 || missing+=(bind9-dnsutils)
command -v dnsmasq >/dev/null 2>&1 || missing+=(dnsmasq-base)
command -v nc >/dev/null 2>&1 || missing+=(netcat-openbsd)
command -v setpriv >/dev/null 2>&1 || missing+=(util-linux)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
command -v readelf >/dev/null 2>&1 || missing+=(binutils)
# A real Prometheus scrapes a running mesh in the observability tests.
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
# A real headless browser loads the clusterset page.
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing ${missing[*]}"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  fi
fi

# Tier 3 runs real kube-apiservers and etcds, built from the upstream Go modules (cached
# outside the clone, keyed by version; the first build takes several minutes).
say "kube-apiserver and etcd"
if ! command -v go >/dev/null 2>&1; then
  echo "test.sh: Go (>= 1.25) is needed to build kube-apiserver and etcd for the Kubernetes tier" >&2
  exit 1
fi
STRAIT_KUBE_BIN_DIR="$(multicluster-tests/kube/build.sh)"
export STRAIT_KUBE_BIN_DIR
echo "using $STRAIT_KUBE_BIN_DIR"

# Real clients and conformance tools the tests drive, built once from the Go module proxy and
# cached outside the clone, keyed by version: go_tool NAME PACKAGE VERSION prints the binary.
go_tool() {
  local name="$1" package="$2" version="$3"
  local bin="${HOME}/.cache/strait/bin/${name}-${version}"
  if [ ! -x "$bin" ]; then
    say "building ${name} ${version}" >&2
    local tmp_bin
    tmp_bin="$(mktemp -d)"
    GOBIN="$tmp_bin" go install "${package}@${version}" >&2
    mkdir -p "$(dirname "$bin")"
    mv "$tmp_bin/$(basename "$package")" "$bin"
    rmdir "$tmp_bin"
  fi
  echo "$bin"
}
STRAIT_GRPCURL="$(go_tool grpcurl github.com/fullstorydev/grpcurl/cmd/grpcurl v1.9.3)"
# HTTP/2 conformance (h2spec) and the grpc-go interop server and client.
STRAIT_H2SPEC="$(go_tool h2spec github.com/summerwind/h2spec/cmd/h2spec v2.2.1+incompatible)"
STRAIT_GRPC_INTEROP_SERVER="$(go_tool grpc-interop-server google.golang.org/grpc/interop/server v1.85.0)"
STRAIT_GRPC_INTEROP_CLIENT="$(go_tool grpc-interop-client google.golang.org/grpc/interop/client v1.85.0)"
export STRAIT_GRPCURL STRAIT_H2SPEC STRAIT_GRPC_INTEROP_SERVER STRAIT_GRPC_INTEROP_CLIENT
# Jaeger (the OpenTelemetry-Collector-based v2 all-in-one) receives the mesh's OTLP spans in the
# tracing tests. Its module has a `replace` directive, which `go install pkg@version` refuses, so
# it is built with `go get -tool` in a scratch module (the first build takes several minutes).
JAEGER_VERSION=v1.76.0
STRAIT_JAEGER="${HOME}/.cache/strait/bin/jaeger-${JAEGER_VERSION}"
if [ ! -x "$STRAIT_JAEGER" ]; then
  say "building jaeger ${JAEGER_VERSION}"
  jaeger_src="${HOME}/.cache/strait/jaeger-${JAEGER_VERSION}-src"
  mkdir -p "$jaeger_src" "$(dirname "$STRAIT_JAEGER")"
  (
    cd "$jaeger_src"
    [ -f go.mod ] || go mod init local/jaegertool
    # Upstream's own replace, mirrored so the module graph resolves as upstream builds it.
    go mod edit -replace github.com/Shopify/sarama=github.com/Shopify/sarama@v1.33.0
    go get -tool "github.com/jaegertracing/jaeger/cmd/jaeger@${JAEGER_VERSION}"
    go build -o "${STRAIT_JAEGER}.tmp" github.com/jaegertracing/jaeger/cmd/jaeger
  )
  mv "${STRAIT_JAEGER}.tmp" "$STRAIT_JAEGER"
fi
export STRAIT_JAEGER
if [ "$(id -u)" != 0 ]; then
  echo "test.sh: the Kubernetes tier (strait up --kube) needs root to route its 198.18.0.0/15 workload" >&2
  echo "         addresses on lo; its tests will fail here. Run as root (CI does)." >&2
fi

say "shell scripts (bash -n, shellcheck)"
scripts=(test.sh .ci/run deploy/kind/up.sh multicluster-tests/kube/build.sh pgo/train.sh
  pgo/rustc-wrapper)
for script in "${scripts[@]}"; do
  bash -n "$script"
done
shellcheck "${scripts[@]}"

say "cargo fmt --check"
cargo fmt --all -- --check

say "cargo clippy --all-targets -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

say "building the strait and strait-sidecar binaries"
cargo build --bin strait --bin strait-sidecar
export STRAIT_BIN="$CARGO_TARGET_DIR/debug/strait"

say "unit and end-to-end tests"
# End-to-end tests start whole meshes (18+ processes each); the fixture runs one mesh at a
# time per test binary, so extra threads only queue. Benchmarks are not run here.
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
# --no-fail-fast: every test binary runs even when one fails, so the summary counts every test.
cargo test --no-fail-fast --workspace --lib --bins --tests -- --test-threads=2 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e

# Every run fuzzes: each cargo-fuzz target for a bounded time, starting from the seed corpus in
# fuzz/corpus (read-only here; new inputs go to a scratch directory). A crash fails the run; its
# input is saved under fuzz/artifacts and printed (base64) so the CI log keeps it.
FUZZ_SECONDS="${FUZZ_SECONDS:-30}"
CARGO_FUZZ_VERSION=0.13.2
fuzz_root="${HOME}/.cache/strait/cargo-fuzz-${CARGO_FUZZ_VERSION}"
fuzz_passed=0
fuzz_failed=0
say "fuzzing: cargo-fuzz ${CARGO_FUZZ_VERSION}, ${FUZZ_SECONDS}s per target"
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "test.sh: the nightly Rust toolchain (for cargo-fuzz) is missing: rustup toolchain install nightly" >&2
  fuzz_failed=1
else
  if [ ! -x "$fuzz_root/bin/cargo-fuzz" ]; then
    say "installing cargo-fuzz ${CARGO_FUZZ_VERSION}"
    cargo install --locked --root "$fuzz_root" cargo-fuzz --version "$CARGO_FUZZ_VERSION"
  fi
  fuzz_target_dir="${HOME}/.cache/strait/fuzz-target"
  if ! PATH="$fuzz_root/bin:$PATH" cargo +nightly fuzz build --target-dir "$fuzz_target_dir"; then
    echo "test.sh: the fuzz targets do not build" >&2
    fuzz_failed=1
  else
    for target in $(PATH="$fuzz_root/bin:$PATH" cargo +nightly fuzz list); do
      scratch="$(mktemp -d)"
      if PATH="$fuzz_root/bin:$PATH" cargo +nightly fuzz run --target-dir "$fuzz_target_dir" "$target" \
          "$scratch" "fuzz/corpus/$target" -- -max_total_time="$FUZZ_SECONDS" -rss_limit_mb=2048 \
          > "$scratch.log" 2>&1; then
        fuzz_passed=$((fuzz_passed + 1))
        echo "fuzz $target: ok ($(grep -o 'Done [0-9]* runs' "$scratch.log" | tail -1))"
      else
        fuzz_failed=$((fuzz_failed + 1))
        tail -40 "$scratch.log"
        # The panic's message is far above the tail (the stack trace and the input come after).
        grep -m1 -A1 "panicked at" "$scratch.log" || true
        for crash in fuzz/artifacts/"$target"/*; do
          [ -f "$crash" ] || continue
          echo "fuzz $target: FAILED, input saved in $crash (base64: $(base64 -w0 "$crash"))"
        done
      fi
      rm -rf "$scratch" "$scratch.log"
    done
  fi
fi

echo
awk -v fp="$fuzz_passed" -v ff="$fuzz_failed" '
     /^test result:/ { for (i = 1; i < NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p + fp, f + ff }' "$log"
if [ "$fuzz_failed" -gt 0 ] && [ "$status" = 0 ]; then
  status=1
fi
exit "$status"
