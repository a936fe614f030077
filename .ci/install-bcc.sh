#!/bin/sh
# Install what the XDP fast path (bcc) and its integration tests need on a fresh Debian 12
# machine, then check that bcc can compile an XDP program. Idempotent: safe to run again.
# Called by .ci/test, which runs every test on a fresh machine.
#
#   python3-bpfcc  bcc's Python bindings and libbcc (never `pip install bcc`: unrelated project)
#   nftables       NAT in the test topology          ethtool  checksum offload off on test veths
#   linux-headers  a kernel tree for bcc to compile against (Debian's 6.1 headers work for XDP)
#
# tox envs see bcc through a symlink of /usr/lib/python3/dist-packages/bcc (tox.ini commands_pre);
# xdp/loader.py also falls back to importing that package directly.
set -eu

arch=$(dpkg --print-architecture)
missing=""
for pkg in python3-bpfcc nftables ethtool "linux-headers-$arch"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $pkg"
    fi
done
if [ -n "$missing" ]; then
    echo "installing:$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086  # word splitting of the package list is intended
    apt-get install -y -qq $missing
fi

# bcc looks for the kernel tree in /lib/modules/$(uname -r)/{build,source}. A custom kernel
# (CONFIG_MODULES off, no IKHEADERS) has none: point it at the newest Debian headers tree.
# Never `ln -sfn` onto an existing directory (ln would create the link inside it).
kdir="/lib/modules/$(uname -r)"
if [ ! -e "$kdir" ]; then
    headers=$(ls -d /lib/modules/*-"$arch" 2>/dev/null | sort -V | tail -1)
    if [ -z "$headers" ]; then
        echo "no /lib/modules/*-$arch headers tree after installing linux-headers-$arch" >&2
        exit 1
    fi
    ln -s "$headers" "$kdir"
    echo "linked $kdir -> $headers"
elif [ ! -e "$kdir/build" ]; then
    echo "warning: $kdir exists but has no build/ tree; bcc may not find kernel headers" >&2
fi

# Sanity check (root only: loading BPF needs CAP_BPF/CAP_SYS_ADMIN).
if [ "$(id -u)" = 0 ]; then
    /usr/bin/python3 - <<'PY'
from bcc import BPF
b = BPF(text=b"int xdp_ok(struct xdp_md *ctx) { return XDP_PASS; }")
b.load_func(b"xdp_ok", BPF.XDP)
print("bcc ok: compiled and loaded an XDP program")
PY
fi
