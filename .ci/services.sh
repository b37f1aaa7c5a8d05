#!/usr/bin/env bash
# Starts the local services the tests talk to, when they are not already listening (loopback only).
set -u
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if ! listening 6379; then
  echo "starting redis on 127.0.0.1:6379"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi
if ! listening 5432; then
  echo "starting postgresql on 127.0.0.1:5432"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
fi
for i in $(seq 1 30); do
  listening 6379 && listening 5432 && exit 0
  sleep 1
done
listening 6379 || echo "warning: redis is not listening on 127.0.0.1:6379; redis tests will be skipped"
listening 5432 || echo "warning: postgresql is not listening on 127.0.0.1:5432; postgres tests will be skipped"
exit 0
