#!/usr/bin/env bash
# Installs the Debian packages the project needs, only where missing:
# the PostgreSQL 15 server and client tools, python3-venv, and a C compiler
# with the Python headers for the compiled page operations (pgformat._native;
# without them the install still works and redo runs in pure Python), and
# libfuse3 (fuse3, libfuse3-dev, pkg-config) that pip builds pyfuse3 against
# for lazy computes.
set -euo pipefail

need=()
[ -x /usr/lib/postgresql/15/bin/postgres ] || need+=(postgresql-15)
[ -x /usr/lib/postgresql/15/bin/pg_waldump ] || need+=(postgresql-15)
command -v psql >/dev/null 2>&1 || need+=(postgresql-client-15)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
command -v gcc >/dev/null 2>&1 || need+=(gcc)
[ -e /usr/include/stdint.h ] || need+=(libc6-dev)
"${PYTHON:-python3}" -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' >/dev/null 2>&1 \
    || need+=(python3-dev)
command -v fusermount3 >/dev/null 2>&1 || need+=(fuse3)
[ -e /usr/include/fuse3/fuse_lowlevel.h ] || need+=(libfuse3-dev)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)

if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "missing Debian packages: ${need[*]}; run as root or install them" >&2
        exit 1
    fi
    echo "installing Debian packages: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}" >/dev/null
fi
# Postgres refuses to run as root; the harness and zctl use this user.
id postgres >/dev/null 2>&1 || useradd --system --create-home postgres
