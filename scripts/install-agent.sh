#!/usr/bin/env bash
# Install the edge agent on a line device: a venv under PREFIX, the edge-agent user,
# /etc/edge-agent and /var/lib/edge-agent, a starter config, the systemd unit.
set -euo pipefail
PROGRAM=install-agent.sh
EXTRAS=""
# shellcheck source=scripts/install-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/install-lib.sh"

usage() {
    cat <<'USAGE'
Usage: install-agent.sh [options]

Installs the edge agent into a venv under PREFIX, creates the edge-agent user (groups
video and gpio), /etc/edge-agent and /var/lib/edge-agent, a starter config when none
exists, and /etc/systemd/system/edge-agent.service; then reloads systemd when it runs.
Idempotent: run it again to upgrade; an existing config is kept. A full install needs
root and systemd. Afterwards: edit /etc/edge-agent/agent.toml, check it with
`edge-agent check`, then `systemctl enable --now edge-agent`.

Options:
  --prefix DIR      venv location (default /opt/edgefleet; or $PREFIX)
  --destdir DIR     install under DIR instead of / (inspection, image builds; or $DESTDIR)
  --bundle PATH     a provisioning bundle from `fleet-server devices enroll` (directory or
                    .tar.gz): its agent.toml, root.json and tls/ become the config
  --python PY       interpreter for the venv (default python3)
  --wheel FILE      install this wheel instead of the checkout
  --extras LIST     pip extras, e.g. tflite for LiteRT models
  --pip-args ARGS   extra pip options (e.g. "--no-index --find-links DIR" offline)
  --no-system       no users, groups, ownership, udev rule or systemctl
  -h, --help        this text
USAGE
}

parse_common "$@"

install_venv
MODELS="$PREFIX/share/edgefleet/models"
if [ -d "$SRC/models/reference-onnx" ]; then
    mkdir -p "$ROOT$MODELS"
    rm -rf "$ROOT$MODELS/reference-onnx.tmp"
    cp -R "$SRC/models/reference-onnx" "$ROOT$MODELS/reference-onnx.tmp"
    rm -rf "$ROOT$MODELS/reference-onnx"
    mv "$ROOT$MODELS/reference-onnx.tmp" "$ROOT$MODELS/reference-onnx"
    say "installed the reference model in $MODELS/reference-onnx"
fi

ensure_group gpio
ensure_user edge-agent /var/lib/edge-agent video,gpio
install_dir 0755 root:root /etc/edge-agent
install_dir 0750 edge-agent:edge-agent /var/lib/edge-agent

if [ -n "$BUNDLE" ]; then
    staged="$(mktemp -d)"
    trap 'rm -rf "$staged"' EXIT
    if [ -d "$BUNDLE" ]; then
        cp -R "$BUNDLE/." "$staged/"
    else
        tar -xzf "$BUNDLE" -C "$staged" --no-same-owner || die "cannot unpack bundle $BUNDLE"
    fi
    for f in agent.toml root.json tls/ca.pem tls/device.pem tls/device.key; do
        [ -f "$staged/$f" ] || die "bundle $BUNDLE has no $f"
    done
    install_dir 0750 root:edge-agent /etc/edge-agent/tls
    install_file_once 0644 root:root "$staged/agent.toml" /etc/edge-agent/agent.toml
    install_file_once 0644 root:root "$staged/root.json" /etc/edge-agent/root.json
    install_file_once 0644 root:root "$staged/tls/ca.pem" /etc/edge-agent/tls/ca.pem
    install_file_once 0644 root:root "$staged/tls/device.pem" /etc/edge-agent/tls/device.pem
    # Readable by the agent's group only; root keeps it unchangeable for the service.
    install_file_once 0640 root:edge-agent "$staged/tls/device.key" /etc/edge-agent/tls/device.key
else
    starter="$(mktemp)"
    trap 'rm -f "$starter"' EXIT
    sed "s#^bundle = .*#bundle = \"$MODELS/reference-onnx\"#" "$SRC/scripts/agent.example.toml" \
        > "$starter"
    install_file_once 0644 root:root "$starter" /etc/edge-agent/agent.toml
fi

if [ "$SYSTEM" = 1 ] && [ -z "$DESTDIR" ] && [ -d /etc/udev/rules.d ] \
    && ! grep -qs gpiochip /etc/udev/rules.d/*.rules /lib/udev/rules.d/*.rules; then
    # Raspberry Pi OS ships such a rule; elsewhere /dev/gpiochip* is root-only.
    echo 'SUBSYSTEM=="gpio", KERNEL=="gpiochip*", GROUP="gpio", MODE="0660"' \
        > /etc/udev/rules.d/60-edgefleet-gpio.rules
    # No udevd (a container, an image build): the rule applies from the next boot.
    if udevadm control --reload-rules 2>/dev/null; then
        udevadm trigger --subsystem-match=gpio
    fi
    say "installed /etc/udev/rules.d/60-edgefleet-gpio.rules"
fi

install_unit edge-agent.service
reload_systemd
say "done. Next: edit /etc/edge-agent/agent.toml, run '$PREFIX/bin/edge-agent check', then"
say "'systemctl enable --now edge-agent'"
