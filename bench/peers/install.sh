#!/bin/sh
# Install the peer brokers (Debian packages) and their Python clients for bench/run_all.py.
#
#   sh bench/peers/install.sh            # as root; idempotent (does nothing that is already done)
#
# Debian starts a package's service on install (redis-server, rabbitmq-server). The benchmark
# runs private instances on their own ports instead, so while installing, a policy-rc.d that
# answers 101 ("action forbidden") keeps invoke-rc.d from starting anything; it is removed
# again afterwards. The services stay enabled as Debian ships them but are not running; this
# script never stops a service that was already running.
set -eu

PACKAGES="nats-server redis-server rabbitmq-server"
PYTHON=${PYTHON:-python}
PIP_PACKAGES="nats-py redis hiredis aio-pika matplotlib"

missing=""
for p in $PACKAGES; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $p"
    fi
done

if [ -n "$missing" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "install.sh: need root to install:$missing" >&2
        exit 1
    fi
    policy=/usr/sbin/policy-rc.d
    ours=""
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\n# bench/peers/install.sh: no service starts while it installs\nexit 101\n' > "$policy"
        chmod +x "$policy"
        ours=1
    fi
    # remove our policy-rc.d whatever happens
    trap '[ -n "$ours" ] && rm -f "$policy"' EXIT INT TERM
    [ -n "${APT_UPDATED:-}" ] || [ -n "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' 2>/dev/null | head -n1)" ] \
        || apt-get update -q
    echo "install.sh: apt-get install$missing"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
fi

if ! "$PYTHON" -c "import nats, redis.asyncio, hiredis, aio_pika, matplotlib" 2>/dev/null; then
    echo "install.sh: pip install $PIP_PACKAGES"
    "$PYTHON" -m pip install -q $PIP_PACKAGES
fi

# versions, for the record
echo "nats-server $(nats-server --version 2>/dev/null | sed 's/^nats-server: *//')"
echo "redis-server $(redis-server --version 2>/dev/null | sed -n 's/.* v=\([^ ]*\).*/\1/p')"
echo "rabbitmq-server $(dpkg-query -W -f='${Version}' rabbitmq-server)"
"$PYTHON" - <<'PY'
from importlib.metadata import version
for d in ("nats-py", "redis", "hiredis", "aio-pika", "aiormq", "matplotlib"):
    print(d, version(d))
PY
