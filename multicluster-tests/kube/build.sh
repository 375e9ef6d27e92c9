#!/usr/bin/env bash
# Builds kube-apiserver, kubectl and etcd from their upstream Go modules at pinned versions, the way
# controller-runtime's envtest uses them, and caches the binaries outside the clone keyed by
# version. Idempotent: prints the cache directory and exits at once when both are built.
#
#   multicluster-tests/kube/build.sh            # -> $STRAIT_CACHE/kube/k8s-v1.35.4-etcd-v3.6.x
#
# Why a wrapper module: `go install k8s.io/kubernetes/cmd/kube-apiserver@v1.N` is refused
# because k8s.io/kubernetes requires its staging modules at v0.0.0 through replace directives;
# we require it from a module of our own that replaces each staging module with its v0.N.M.
set -euo pipefail

K8S_VERSION="${STRAIT_K8S_VERSION:-v1.35.4}"
ETCD_VERSION="${STRAIT_ETCD_VERSION:-v3.6.16}"
CACHE="${STRAIT_CACHE:-$HOME/.cache/strait}"
OUT="$CACHE/kube/k8s-$K8S_VERSION-etcd-$ETCD_VERSION"

if [ -x "$OUT/kube-apiserver" ] && [ -x "$OUT/etcd" ] && [ -x "$OUT/kubectl" ]; then
  echo "$OUT"
  exit 0
fi
command -v go >/dev/null 2>&1 || { echo "build.sh: Go is required to build kube-apiserver and etcd (go >= 1.25)" >&2; exit 1; }

export CGO_ENABLED=0 GOWORK=off GOTOOLCHAIN=local GOFLAGS=-mod=mod
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$OUT"

minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
staging="v0.${K8S_VERSION#v1.}"

# The wrapper module that requires k8s.io/kubernetes with its staging modules replaced.
k8s_module() {
  mkdir -p "$work/apiserver"
  cd "$work/apiserver"
  [ -f go.mod ] && return 0
  go mod init strait.local/kube-apiserver >/dev/null 2>&1
  modfile="$(go env GOMODCACHE)/cache/download/k8s.io/kubernetes/@v/$K8S_VERSION.mod"
  go mod download -json "k8s.io/kubernetes@$K8S_VERSION" >/dev/null
  {
    echo "require k8s.io/kubernetes $K8S_VERSION"
    # Every staging module the release requires at v0.0.0 gets its published version.
    grep -E '^\s+k8s.io/[a-z0-9-]+ v0\.0\.0$' "$modfile" | awk -v v="$staging" '{ printf "replace %s => %s %s\n", $1, $1, v }'
  } >> go.mod
  cat > main.go <<'GO'
package main

import (
	_ "k8s.io/kubectl/pkg/cmd"
	_ "k8s.io/kubernetes/cmd/kube-apiserver/app"
)

func main() {}
GO
  go mod tidy >/dev/null 2>&1 || true
}
version_flags="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"

if [ ! -x "$OUT/kube-apiserver" ]; then
  echo "building kube-apiserver $K8S_VERSION (first time: downloads modules and compiles for minutes)" >&2
  k8s_module
  go build -trimpath -o "$OUT/kube-apiserver.tmp" -ldflags "$version_flags" k8s.io/kubernetes/cmd/kube-apiserver
  mv "$OUT/kube-apiserver.tmp" "$OUT/kube-apiserver"
fi

# kubectl of the same release: the Kubernetes tier applies routes and policies with it.
if [ ! -x "$OUT/kubectl" ]; then
  echo "building kubectl $K8S_VERSION" >&2
  k8s_module
  go build -trimpath -o "$OUT/kubectl.tmp" -ldflags "$version_flags" k8s.io/kubernetes/cmd/kubectl
  mv "$OUT/kubectl.tmp" "$OUT/kubectl"
fi

if [ ! -x "$OUT/etcd" ]; then
  echo "building etcd $ETCD_VERSION" >&2
  mkdir -p "$work/etcd"
  cd "$work/etcd"
  go mod init strait.local/etcd >/dev/null 2>&1
  cat > main.go <<'GO'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >/dev/null 2>&1
  go mod tidy >/dev/null 2>&1
  go build -trimpath -ldflags "-s -w" -o "$OUT/etcd.tmp" .
  mv "$OUT/etcd.tmp" "$OUT/etcd"
fi

echo "$OUT"
