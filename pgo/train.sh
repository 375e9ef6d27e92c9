#!/bin/bash
# Records pgo/strait.profdata, the profile the release build optimises with (pgo/rustc-wrapper):
#   1. builds strait and strait-sidecar instrumented (-C profile-generate), release profile;
#   2. runs the training workload with them: the mesh benchmark's HTTP/1.1 through a sidecar
#      pair and across clusters, new connections, bulk and streamed bodies (not its HTTP/2
#      section: trained on it too, an idle sidecar held 10.08-10.18 MiB against 9.68-9.77 and
#      HTTP/2 was no faster), and the clusterset simulator (controllers, peering, config
#      streams);
#   3. merges the counts of every process (sparse: code that never ran is left out of the file);
#   4. removes the release build so that every crate is compiled again with the new profile.
# Code the workload does not run (HTTP/2 and gRPC from the application, WebSocket, failover...)
# has no counts and is optimised as without PGO, for size as the release profile asks. An
# unsparse merge marks it cold instead: that took 0.2-0.3 MiB off an idle sidecar but cost the
# application's HTTP/2 6-14 % more CPU (README, "Profile-guided optimisation"). Adding the
# end-to-end tests to the workload covered it but took the sidecar's idle RSS from 9.5 to 10.2
# MiB (README, "Profile-guided optimisation").
# Run it after a change to the data path or the controller's hot paths, or a new Rust
# toolchain; commit pgo/strait.profdata and pgo/rustc-wrapper (the LLVM version line) together.
# Takes about 20 minutes on two cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/strait/target}"
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-2}"
export CARGO_INCREMENTAL=0
say() { printf '\n==> %s\n' "$*"; }

rustup component add llvm-tools >/dev/null 2>&1 || true
version="$(rustc -vV)"
host="$(sed -n 's/^host: //p' <<<"$version")"
llvm="$(sed -n 's/^LLVM version: \([0-9]*\).*/\1/p' <<<"$version")"
llvm_profdata="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
if [ ! -x "$llvm_profdata" ]; then
  echo "pgo/train.sh: llvm-profdata is missing: rustup component add llvm-tools" >&2
  exit 1
fi

work="$HOME/.cache/strait/pgo"
raw="$work/raw"
rm -rf "$raw" "$work/build"
mkdir -p "$raw"

# RUSTFLAGS reach build scripts and proc macros too: what they count while the build runs them
# goes to $work/build and is not part of the profile.
say "building instrumented strait and strait-sidecar (release profile, -C profile-generate)"
CARGO_TARGET_DIR="$work/target" RUSTFLAGS="-Cprofile-generate=$work/build" \
  cargo build --release --bin strait --bin strait-sidecar
export STRAIT_BIN="$work/target/release/strait"

# Every process of one executable adds its counts to the same file (%m: one per executable).
say "training: the mesh benchmark"
LLVM_PROFILE_FILE="$raw/%m.profraw" STRAIT_BENCH_STREAM_MIB=64 STRAIT_BENCH_ONLY=latency,setup,bulk,stream \
  cargo bench -p multicluster-tests --bench mesh
say "training: the clusterset simulator"
LLVM_PROFILE_FILE="$raw/%m.profraw" cargo bench -p multicluster-tests --bench clusterset
say "merging"
"$llvm_profdata" merge --sparse -o pgo/strait.profdata "$raw"/*.profraw
sed -i "s/^written_by=[0-9]*$/written_by=$llvm/" pgo/rustc-wrapper
ls -l pgo/strait.profdata

say "removing the release build (every crate compiles again with the new profile)"
cargo clean --profile release
