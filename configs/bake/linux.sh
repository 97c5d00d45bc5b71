#!/bin/bash
# Bakes the linux pool's image (configs/ec2.example.toml): run as root by
# `hangar image bake linux` on a staging server booted from the pool's
# image. What it installs, the pool's instances then boot with: the
# bootstrap finds buildbot-worker and does not install it again.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends buildbot-worker git ca-certificates
apt-get clean
rm -rf /var/lib/apt/lists/*
