#!/usr/bin/env bash
# Brings up Strait on three kind clusters on your machine (needs docker, kind, kubectl):
#   deploy/kind/up.sh
# Creates east (us-east, two zones), west (us-west) and central (eu-central) with region and
# zone labels on their nodes, builds the Strait image and loads it, installs Strait in each
# cluster with its own intermediate CA of one shared trust domain, joins them, and deploys the
# demo services (sidecars injected) with ServiceExports.
set -euo pipefail
cd "$(dirname "$0")/../.."

IMAGE="${STRAIT_IMAGE:-strait:dev}"
TRUST_DOMAIN="${STRAIT_TRUST_DOMAIN:-mesh.local}"
STATE="${STRAIT_KIND_STATE:-$PWD/.kind-state}"
GATEWAY_NODE_PORT=31443

for tool in docker kind kubectl cargo; do
  command -v "$tool" >/dev/null 2>&1 || { echo "up.sh: $tool is required" >&2; exit 1; }
done

step() { printf '\n==> %s\n' "$*"; }

step "building strait and the image $IMAGE"
cargo build --release --bin strait --bin strait-sidecar
STRAIT="$PWD/target/release/strait"
docker build -t "$IMAGE" -f deploy/Dockerfile .

mkdir -p "$STATE"
if [ ! -f "$STATE/trust/ca-key.pem" ]; then
  step "creating the root of trust domain $TRUST_DOMAIN"
  "$STRAIT" trust init --trust-domain "$TRUST_DOMAIN" --out "$STATE/trust"
fi

contexts=()
while read -r line; do
  [ -z "$line" ] && continue
  case "$line" in \#*) continue ;; esac
  name="${line%%:*}"
  read -r region zones <<<"${line#*:}"
  read -r -a zone_list <<<"$zones"
  contexts+=("kind-$name")

  if ! kind get clusters | grep -qx "$name"; then
    step "creating kind cluster $name ($region: ${zone_list[*]})"
    config="$STATE/$name-kind.yaml"
    {
      echo "kind: Cluster"
      echo "apiVersion: kind.x-k8s.io/v1alpha4"
      echo "nodes:"
      echo "- role: control-plane"
      for zone in "${zone_list[@]}"; do
        echo "- role: worker"
        echo "  labels:"
        echo "    topology.kubernetes.io/region: $region"
        echo "    topology.kubernetes.io/zone: $zone"
      done
    } >"$config"
    kind create cluster --name "$name" --config "$config"
  fi
  kind load docker-image "$IMAGE" --name "$name"

  node_ip="$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$name-worker")"
  step "installing Strait in $name (gateway $node_ip:$GATEWAY_NODE_PORT)"
  "$STRAIT" trust intermediate --root "$STATE/trust" --trust-domain "$TRUST_DOMAIN" --cluster "$name" --out "$STATE/$name-ca"
  "$STRAIT" install --cluster-name "$name" --region "$region" --zone "${zone_list[0]}" \
    --gateway-address "$node_ip:$GATEWAY_NODE_PORT" --trust-domain "$TRUST_DOMAIN" --image "$IMAGE" \
    --apply --context "kind-$name"
  kubectl --context "kind-$name" -n strait-system create secret generic strait-ca \
    --from-file=ca.pem="$STATE/$name-ca/ca.pem" --from-file=ca-key.pem="$STATE/$name-ca/ca-key.pem" \
    --from-file=bundle.pem="$STATE/trust/bundle.pem" --dry-run=client -o yaml | kubectl --context "kind-$name" apply -f -
  # kind has no load balancer: expose QUIC (UDP) and its TCP+TLS fallback on one fixed NodePort.
  kubectl --context "kind-$name" -n strait-system patch service strait-gateway --type=json -p \
    "[{\"op\":\"replace\",\"path\":\"/spec/ports/0/nodePort\",\"value\":$GATEWAY_NODE_PORT},
      {\"op\":\"replace\",\"path\":\"/spec/ports/1/nodePort\",\"value\":$GATEWAY_NODE_PORT}]"
done <deploy/kind/clusters.yaml

step "joining ${contexts[*]}"
join_args=()
for c in "${contexts[@]}"; do join_args+=(--context "$c"); done
"$STRAIT" join "${join_args[@]}"

for c in "${contexts[@]}"; do
  kubectl --context "$c" -n strait-system rollout status deployment/strait-federation --timeout=120s
  kubectl --context "$c" -n strait-system rollout status deployment/strait-gateway --timeout=120s
done

step "deploying the demo services (namespace demo, sidecars injected)"
for c in "${contexts[@]}"; do
  "$STRAIT" install --demo --cluster-name "${c#kind-}" --image "$IMAGE" --apply --context "$c"
done
for c in "${contexts[@]}"; do
  kubectl --context "$c" -n demo wait --for=condition=Available deployment --all --timeout=180s
done

step "checking"
for c in "${contexts[@]}"; do "$STRAIT" check --context "$c" || true; done

cat <<MSG

Strait is installed and joined in: ${contexts[*]}, with the demo services exported from each
(echo in every cluster, greeter only in west, ledger only in central).
Call west's greeter from east by its clusterset name, with no change to the app:
  kubectl --context kind-east -n demo exec deploy/echo-us-east-1a -c app -- \
    curl -s http://greeter.demo.svc.clusterset.local/
The imports every cluster sees:
  kubectl --context kind-east -n demo get serviceimports
  strait check --context kind-east
Export your own Service the same way (MCS API):
  kubectl --context kind-west -n shop apply -f - <<'YAML'
  apiVersion: multicluster.x-k8s.io/v1alpha1
  kind: ServiceExport
  metadata: {name: cart, namespace: shop}
  YAML
MSG
