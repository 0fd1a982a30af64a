#!/bin/bash
# Redis alone, no relay: 100 batches of 50 ZADDs of 1,000 UUID-led members
# (one Lua call per batch, as the relay sends them); prints the server-side
# microseconds per ZADD call by tenth (INFO commandstats).
# Usage: docs/bench/zadd-scores.sh PORT SORTED(0|1) eq|inc   (a private redis-server on PORT)
P=$1
redis-server --port $P --save '' --appendonly no --daemonize yes --dir /tmp --logfile /tmp/zadd-scores-$P.log
sleep 0.5
SHA=$(redis-cli -p $P SCRIPT LOAD "$(cat "$(dirname "$0")/zadd-scores.lua")")
out=""
for t in $(seq 0 9); do
  redis-cli -p $P CONFIG RESETSTAT >/dev/null
  for b in $(seq $((t*10)) $((t*10+9))); do redis-cli -p $P EVALSHA $SHA 0 $b $2 $3 >/dev/null; done
  out="$out $(redis-cli -p $P INFO commandstats | grep cmdstat_zadd | tr -d '\r' | sed 's/.*usec_per_call=\([0-9.]*\).*/\1/')"
done
echo "sorted=$2 mode=$3 usec per 1000-member ZADD by tenth:$out"
redis-cli -p $P shutdown nosave >/dev/null
