#!/usr/bin/env bash
# Install the fleet server: a venv under PREFIX, the fleet-server user,
# /etc/fleet-server and /var/lib/fleet-server, a starter environment file, the systemd
# unit, and optionally the Mosquitto configuration from scripts/mosquitto/.
set -euo pipefail
PROGRAM=install-server.sh
EXTRAS="server,postgres"
# shellcheck source=scripts/install-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/install-lib.sh"

usage() {
    cat <<'USAGE'
Usage: install-server.sh [options]

Installs the fleet server into a venv under PREFIX (extras server,postgres), creates
the fleet-server user, /etc/fleet-server (with fleet-server.env when none exists) and
/var/lib/fleet-server, and /etc/systemd/system/fleet-server.service; then reloads
systemd when it runs. With --mosquitto, also installs scripts/mosquitto/ as
/etc/mosquitto/conf.d/edgefleet.conf and /etc/mosquitto/edgefleet.acl when absent.
Idempotent: run it again to upgrade; existing configuration is kept. A full install
needs root and systemd. Afterwards: create keys and repository, the broker's and the
server's certificates (docs/operations.md), then `systemctl enable --now fleet-server`.

Options:
  --prefix DIR      venv location (default /opt/edgefleet; or $PREFIX)
  --destdir DIR     install under DIR instead of / (inspection, image builds; or $DESTDIR)
  --mosquitto       also install the Mosquitto configuration
  --python PY       interpreter for the venv (default python3)
  --wheel FILE      install this wheel instead of the checkout
  --extras LIST     pip extras (default server,postgres)
  --pip-args ARGS   extra pip options (e.g. "--no-index --find-links DIR" offline)
  --no-system       no users, ownership or systemctl
  -h, --help        this text
USAGE
}

MOSQUITTO=0
args=()
for arg in "$@"; do
    if [ "$arg" = --mosquitto ]; then MOSQUITTO=1; else args+=("$arg"); fi
done
parse_common "${args[@]+"${args[@]}"}"
[ -z "$BUNDLE" ] || die "--bundle is for install-agent.sh"

install_venv
ensure_user fleet-server /var/lib/fleet-server
install_dir 0750 root:fleet-server /etc/fleet-server
install_dir 0750 fleet-server:fleet-server /var/lib/fleet-server
install_file_once 0640 root:fleet-server "$SRC/scripts/systemd/fleet-server.env" \
    /etc/fleet-server/fleet-server.env

if [ "$MOSQUITTO" = 1 ]; then
    if [ "$SYSTEM" = 1 ] && ! getent group mosquitto >/dev/null; then
        die "--mosquitto: no mosquitto group; install the mosquitto package first"
    fi
    install_dir 0755 root:root /etc/mosquitto/conf.d
    install_dir 0750 root:mosquitto /etc/mosquitto/certs
    install_file_once 0644 root:root "$SRC/scripts/mosquitto/mosquitto.conf" \
        /etc/mosquitto/conf.d/edgefleet.conf
    install_file_once 0644 root:root "$SRC/scripts/mosquitto/acl" /etc/mosquitto/edgefleet.acl
    say "put ca.pem, crl.pem, broker.pem and broker.key in /etc/mosquitto/certs"
fi

install_unit fleet-server.service
reload_systemd
say "done. Next: see docs/operations.md (keys, certificates), then"
say "'systemctl enable --now fleet-server'"
