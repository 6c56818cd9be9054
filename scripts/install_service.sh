#!/usr/bin/env bash
# Install one experiment's supervisor as a systemd service, or say what to do on a box without systemd.
#
#   scripts/install_service.sh CONFIG [--set section.field=value ...]     # install + enable --now
#   scripts/install_service.sh --dry-run CONFIG [...]                     # print the unit, change nothing
#
# The unit runs `<this venv's python> -m supervisor.cli launch <absolute CONFIG>` in the current directory
# (relative experiment roots resolve as they do for you now) as the current user, with the seeds'
# environment overrides that are set in this shell (GDRIVE_PATH, EXPERIMENT_NAME, ...). Secrets such as
# HUGGINGFACE_ACCESS_TOKEN are never written into it: put them in a root-only EnvironmentFile.
# Environment: PYTHON (default: .venv/bin/python of this checkout, else python3), SUDO (default: sudo when
# not root), UNIT_DIR (default /etc/systemd/system).
set -euo pipefail

usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }

dry_run=0
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; shift; fi
if [ $# -lt 1 ] || [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then usage; exit 2; fi

repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then python="$repo/.venv/bin/python"; else python="$(command -v python3)"; fi
fi
config="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
shift
[ -f "$config" ] || { echo "install_service: no such config file: $config" >&2; exit 2; }

# Both commands validate the config (a mistake is one line on stderr, exit 2).
name="$("$python" -m supervisor.cli systemd-unit "$config" "$@" --name-only)"
unit="$("$python" -m supervisor.cli systemd-unit "$config" "$@")"

if [ "$dry_run" -eq 1 ]; then
  printf '%s\n' "$unit"
  exit 0
fi

if [ ! -d /run/systemd/system ]; then
  cat <<EOF
systemd is not running on this machine (a container or a rented box without it): no service installed.
Run the supervisor in the background yourself instead; any of these survives your SSH session:

  # 1. detached (double fork, new session); logs in the runtime dir:
  cd $(pwd) && $python -m supervisor.cli launch $config $* --detach

  # 2. in tmux, with the live status table:
  tmux new -d -s ${name%.service} "cd $(pwd) && $python -m supervisor.cli launch $config $*"

  # 3. after a reboot, from cron (crontab -e):
  @reboot cd $(pwd) && $python -m supervisor.cli launch $config $* --detach

Then: swarm status $config / swarm logs $config -f / swarm stop $config.
A launch after a crash, a kill -9 or a reboot resumes the experiment (see docs/OPERATIONS.md).
EOF
  exit 0
fi

sudo_cmd=""
if [ "$(id -u)" -ne 0 ]; then sudo_cmd="${SUDO:-sudo}"; fi
unit_dir="${UNIT_DIR:-/etc/systemd/system}"
tmp="$(mktemp)"
trap 'rm -f "$tmp"' EXIT
printf '%s\n' "$unit" > "$tmp"
if command -v systemd-analyze >/dev/null 2>&1; then
  systemd-analyze verify "$tmp" 2>&1 | grep -v "^$" >&2 || true
fi
$sudo_cmd install -m 0644 "$tmp" "$unit_dir/$name"
$sudo_cmd systemctl daemon-reload
$sudo_cmd systemctl enable --now "$name"
echo "installed $unit_dir/$name and started it."
echo "  status: systemctl status $name    (or: swarm status $config)"
echo "  logs:   journalctl -u $name -f     (or: swarm logs $config -f)"
echo "  stop:   systemctl stop $name       (nodes checkpoint first)"
