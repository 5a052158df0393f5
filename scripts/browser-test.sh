#!/usr/bin/env bash
# The dashboard's browser tests (tests/api/dashboard.rs, `#[ignore]`d in `cargo test`):
# installs Debian's Chromium and ChromeDriver when they are missing, then runs them.
# Needs PostgreSQL on 127.0.0.1:5432, like `cargo test`; apt-get needs root.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -q
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver
fi

cargo test --test api dashboard:: -- --include-ignored "$@"
