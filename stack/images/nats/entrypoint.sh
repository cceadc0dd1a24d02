#!/bin/sh
# Writes the node's config from NATS_NAME, NATS_ROUTES (comma list of host:port) and
# NATS_CLUSTER_NAME, then runs nats-server. no_advertise keeps clients from learning other
# members' addresses, so a client reaches the cluster only through the addresses it was given
# (the toxiproxy proxies) and a cut proxy is really a cut link.
set -eu
: "${NATS_NAME:?set NATS_NAME to this node's name}"
routes=""
for r in $(echo "${NATS_ROUTES:-}" | tr ',' ' '); do routes="$routes\"nats-route://$r\", "; done
cat >/tmp/nats.conf <<CONF
server_name: "$NATS_NAME"
listen: "0.0.0.0:4222"
http: "0.0.0.0:8222"
max_payload: 1MB
jetstream {
  store_dir: "/data"
  max_file_store: ${NATS_MAX_FILE_STORE:-2GB}
  max_memory_store: 256MB
}
CONF
# Without routes this is a single node (component tests); a cluster block would keep it waiting.
if [ -n "$routes" ]; then
  cat >>/tmp/nats.conf <<CONF
cluster {
  name: "${NATS_CLUSTER_NAME:-qoe}"
  listen: "0.0.0.0:6222"
  routes: [ $routes ]
  no_advertise: true
}
CONF
fi
exec /usr/local/bin/nats-server -c /tmp/nats.conf "$@"
