#!/usr/bin/env bash
# System packages the test suite needs beyond Python: PostgreSQL's server (for the MLflow team-server test,
# tests/test_infra_stack.py), Chromium (headless screenshots of the HTML 3-D previews,
# tests/test_generate_browser.py) and strace (which files a preprocessing job opens,
# tests/test_pipeline_hostile.py). Idempotent, non-interactive, for Debian 12 as root (CI) or with sudo.
#
#   bash infra/ci/install-system-deps.sh                  # as root or with sudo (may ask for a password)
#   bash infra/ci/install-system-deps.sh --if-permitted   # `make test`: install only as root or with
#                                                         # passwordless sudo, else say so and exit 0
#
# Nothing is started and no database cluster is created: the tests run their own throw-away server from a
# temporary data directory (initdb / pg_ctl from /usr/lib/postgresql/<major>/bin, as the postgres user).
set -euo pipefail

# ---------------------------------------------------------------------------------------------------------
# Chromium and strace: a separate block with its own checks; it never ends the script, so PostgreSQL below
# still runs.
install_chromium() {
  local pkgs=()
  command -v chromium >/dev/null || command -v chromium-browser >/dev/null || pkgs+=(chromium)
  command -v strace >/dev/null || pkgs+=(strace)
  if [[ ${#pkgs[@]} == 0 ]]; then
    echo "install-system-deps: Chromium and strace already installed"
    return 0
  fi
  local sudo_cmd=""
  if [[ "$(id -u)" != 0 ]]; then
    if command -v sudo >/dev/null && { [[ "${1:-}" != --if-permitted ]] || sudo -n true 2>/dev/null; }; then
      sudo_cmd="sudo"
    else
      echo "install-system-deps: ${pkgs[*]} not installed and this user may not install them; the HTML preview" \
        "screenshot test will skip (run: sudo bash infra/ci/install-system-deps.sh)" >&2
      return 0
    fi
  fi
  if ! command -v apt-get >/dev/null; then
    echo "install-system-deps: no apt-get here: install ${pkgs[*]} yourself for the HTML preview and open-tracing tests" >&2
    return 0
  fi
  local attempt
  for attempt in 1 2 3; do
    if DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get update -q \
        && DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -q --no-install-recommends "${pkgs[@]}"; then
      echo "install-system-deps: installed ${pkgs[*]}"
      return 0
    fi
    sleep $((attempt * 5))
  done
  echo "install-system-deps: apt-get failed 3 times to install ${pkgs[*]}" >&2
  [[ "${1:-}" == --if-permitted ]] || return 1
}
install_chromium "${1:-}"
# ---------------------------------------------------------------------------------------------------------

versions() { local d out=""; for d in /usr/lib/postgresql/*/bin/initdb; do out+="$(basename "$(dirname "$(dirname "$d")")") "; done; echo "$out"; }

have_postgres() {
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null && compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null \
    && getent passwd postgres >/dev/null
}

if have_postgres; then
  echo "install-system-deps: PostgreSQL already installed ($(versions))"
  exit 0
fi

IF_PERMITTED=0
[[ "${1:-}" == --if-permitted ]] && IF_PERMITTED=1

SUDO=""
if [[ "$(id -u)" != 0 ]]; then
  if [[ $IF_PERMITTED == 1 ]] && ! { command -v sudo >/dev/null && sudo -n true 2>/dev/null; }; then
    echo "install-system-deps: PostgreSQL is not installed and this user may not install it; the MLflow" \
      "team-server tests will skip (run: sudo bash infra/ci/install-system-deps.sh)" >&2
    exit 0
  fi
  if command -v sudo >/dev/null; then SUDO="sudo"; else
    echo "install-system-deps: must run as root (or with sudo available) to install PostgreSQL" >&2
    exit 1
  fi
fi
if ! command -v apt-get >/dev/null; then
  echo "install-system-deps: no apt-get here: install PostgreSQL's server (initdb, pg_ctl) yourself" >&2
  [[ $IF_PERMITTED == 1 ]] && exit 0
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# Do not let the package create and start the default cluster (main, port 5432): the tests bring their own.
$SUDO mkdir -p /etc/postgresql-common/createcluster.d
echo "create_main_cluster = false" | $SUDO tee /etc/postgresql-common/createcluster.d/mdt-no-main-cluster.conf >/dev/null

apt_opts=(-y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold --no-install-recommends)
for attempt in 1 2 3; do
  if $SUDO apt-get update -q && $SUDO apt-get install "${apt_opts[@]}" postgresql; then
    break
  fi
  if [[ $attempt == 3 ]]; then
    echo "install-system-deps: apt-get failed 3 times" >&2
    exit 1
  fi
  sleep $((attempt * 5))
done

have_postgres || { echo "install-system-deps: PostgreSQL binaries not found after install" >&2; exit 1; }
echo "install-system-deps: installed PostgreSQL ($(versions))"
