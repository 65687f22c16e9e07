# shellcheck shell=bash disable=SC2034
# Shared steps of install-agent.sh and install-server.sh; sourced, not run.
# Every step is idempotent: running an installer again upgrades the package and the unit
# and keeps existing configuration.

say() { printf '%s: %s\n' "$PROGRAM" "$*"; }
die() { printf '%s: error: %s\n' "$PROGRAM" "$*" >&2; exit 2; }

# The checkout this script belongs to (models, example configs, units).
SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Common options; the installer sets PROGRAM, EXTRAS and its own defaults before calling.
parse_common() {
    PREFIX="${PREFIX:-/opt/edgefleet}"
    DESTDIR="${DESTDIR:-}"
    PYTHON="${PYTHON:-python3}"
    PIP_ARGS="${PIP_ARGS:-}"
    WHEEL=""
    SYSTEM=1
    BUNDLE="" # used by install-agent.sh only
    while [ $# -gt 0 ]; do
        case "$1" in
            -h | --help) usage; exit 0 ;;
            --prefix) PREFIX="${2:?--prefix needs a directory}"; shift 2 ;;
            --destdir) DESTDIR="${2:?--destdir needs a directory}"; shift 2 ;;
            --python) PYTHON="${2:?--python needs an interpreter}"; shift 2 ;;
            --wheel) WHEEL="${2:?--wheel needs a file}"; shift 2 ;;
            --pip-args) PIP_ARGS="${2?--pip-args needs a value}"; shift 2 ;;
            --extras) EXTRAS="${2?--extras needs a value}"; shift 2 ;;
            --bundle) BUNDLE="${2:?--bundle needs a path}"; shift 2 ;;
            --no-system) SYSTEM=0; shift ;;
            *) die "unknown option '$1' (see --help)" ;;
        esac
    done
    case "$PREFIX" in /*) ;; *) die "--prefix must be absolute, got '$PREFIX'" ;; esac
    if [ -n "$DESTDIR" ]; then
        mkdir -p "$DESTDIR"
        DESTDIR="$(cd "$DESTDIR" && pwd)"
        if [ "$SYSTEM" = 1 ]; then
            # Users, ownership and systemctl belong to the machine that boots the tree.
            say "--destdir: no users, ownership or systemctl on this machine"
            SYSTEM=0
        fi
    fi
    if [ "$SYSTEM" = 1 ] && [ "$(id -u)" != 0 ]; then
        die "creating users and installing units needs root (or use --no-system)"
    fi
    ROOT="$DESTDIR"
    VENV="$ROOT$PREFIX"
}

# The venv under PREFIX with the edgefleet package (and EXTRAS) installed or upgraded.
install_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating venv $VENV"
        "$PYTHON" -m venv "$VENV" || die "cannot create a venv with $PYTHON (python3-venv?)"
    fi
    local spec
    if [ -n "$WHEEL" ]; then
        spec="$WHEEL"
    else
        spec="$SRC"
    fi
    if [ -n "$EXTRAS" ]; then
        spec="${spec}[${EXTRAS}]"
    fi
    say "installing $spec into $VENV"
    # PIP_ARGS is split on purpose: it holds several options.
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install --quiet --upgrade $PIP_ARGS "$spec" \
        || die "pip could not install $spec"
}

# A system user NAME with home HOME and no login shell; extra groups in $3 (comma list).
ensure_user() {
    local name="$1" home="$2" groups="${3:-}"
    if [ "$SYSTEM" = 0 ]; then
        say "skipped: user $name (--no-system)"
        return
    fi
    if ! id -u "$name" >/dev/null 2>&1; then
        say "creating system user $name"
        useradd --system --user-group --home-dir "$home" --no-create-home \
            --shell /usr/sbin/nologin "$name"
    fi
    if [ -n "$groups" ]; then
        usermod --append --groups "$groups" "$name"
    fi
}

ensure_group() {
    local name="$1"
    if [ "$SYSTEM" = 0 ]; then
        return
    fi
    if ! getent group "$name" >/dev/null; then
        say "creating system group $name"
        groupadd --system "$name"
    fi
}

# install_dir MODE OWNER:GROUP DIR (ownership only when SYSTEM=1).
install_dir() {
    local mode="$1" owner="$2" dir="$ROOT$3"
    mkdir -p "$dir"
    chmod "$mode" "$dir"
    if [ "$SYSTEM" = 1 ]; then
        chown "$owner" "$dir"
    fi
}

# install_file_once MODE OWNER:GROUP SOURCE DEST: copy unless DEST exists (never overwrites
# configuration an operator may have edited).
install_file_once() {
    local mode="$1" owner="$2" src="$3" dest="$ROOT$4"
    if [ -e "$dest" ]; then
        say "kept existing $4"
        return
    fi
    install -m "$mode" "$src" "$dest"
    if [ "$SYSTEM" = 1 ]; then
        chown "$owner" "$dest"
    fi
    say "installed $4"
}

# The unit from scripts/systemd with ExecStart under PREFIX; always replaced (it belongs
# to the package, local changes go into a drop-in: systemctl edit NAME).
install_unit() {
    local name="$1" dir="$ROOT/etc/systemd/system"
    mkdir -p "$dir"
    sed "s#/opt/edgefleet/#$PREFIX/#g" "$SRC/scripts/systemd/$name" > "$dir/$name.tmp"
    chmod 0644 "$dir/$name.tmp"
    mv "$dir/$name.tmp" "$dir/$name"
    say "installed /etc/systemd/system/$name"
}

# daemon-reload when systemd runs this machine; said and skipped otherwise (containers,
# image builds, --no-system, DESTDIR).
reload_systemd() {
    if [ "$SYSTEM" = 0 ] || [ -n "$DESTDIR" ]; then
        say "skipped: systemctl daemon-reload (--no-system or --destdir)"
    elif [ ! -d /run/systemd/system ]; then
        say "skipped: systemctl daemon-reload (systemd is not running here, e.g. a container)"
    else
        systemctl daemon-reload
        say "systemd reloaded"
    fi
}
