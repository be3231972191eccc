#!/usr/bin/env bash
# The auth part of the server config `breakfix bus init --dir DIR` wrote, for the NATS Helm chart:
# operator (the JWT, mounted at /etc/breakfix-auth/operator.jwt), system_account, resolver and
# resolver_preload. Listen address, TLS, JetStream and monitoring come from nats-values.yaml instead.
# Usage: nats-auth-conf.sh DIR [OPERATOR_JWT_PATH] > auth.conf
set -euo pipefail
conf="${1:?usage: nats-auth-conf.sh DIR}/nats-server.conf"
[ -f "$conf" ] || { echo "nats-auth-conf.sh: $conf not found (breakfix bus init --dir ${1})" >&2; exit 2; }
echo "# From $conf by deploy/overlays/production/nats-auth-conf.sh"
printf 'operator: "%s"\n' "${2:-/etc/breakfix-auth/operator.jwt}"
sed -n -e '/^system_account:/p' -e '/^resolver: /p' -e '/^resolver_preload: {/,/^}/p' "$conf"
