#!/usr/bin/env bash
# Makes sure a Redis server answers on $1 (a redis:// URL); starts a local one if none does.
# Used by `make test`. Installs Debian's redis-server when it is missing (as root).
set -euo pipefail
url="${1:-redis://127.0.0.1:6379/0}"
hostport="${url#redis://}"; hostport="${hostport#*@}"; hostport="${hostport%%/*}"
host="${hostport%%:*}"; port="${hostport##*:}"; [ "$port" = "$host" ] && port=6379

ping() { (exec 3<>"/dev/tcp/$host/$port" && printf 'PING\r\n' >&3 && timeout 2 head -c 5 <&3 | grep -q PONG) 2>/dev/null; }

if ping; then echo "redis: answering on $host:$port"; exit 0; fi
if ! command -v redis-server >/dev/null; then
  echo "redis: redis-server not found; installing Debian's package"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi
echo "redis: starting redis-server on $host:$port"
redis-server --bind "$host" --port "$port" --save "" --appendonly no --daemonize yes \
  --dir /tmp --logfile "/tmp/forgerpc-redis-$port.log"
for _ in $(seq 50); do ping && exit 0; sleep 0.1; done
echo "redis: started but not answering on $host:$port; see /tmp/forgerpc-redis-$port.log" >&2
exit 1
