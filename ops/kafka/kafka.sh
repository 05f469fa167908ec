#!/usr/bin/env bash
# A real single-node Apache Kafka broker (KRaft: broker + controller in one JVM,
# no ZooKeeper, no Docker) for development and tests, run from the Apache Kafka
# jars on Maven Central with the machine's Java 17+.
#
#   kafka.sh fetch                          jars into the cache (once; cached)
#   kafka.sh start [--data DIR] [--port N]  start in the background, wait until
#                                           ready, print KAFKA_BOOTSTRAP_SERVERS=...
#   kafka.sh stop  [--data DIR]             SIGTERM, wait for a clean exit
#   kafka.sh status [--data DIR]            print KAFKA_BOOTSTRAP_SERVERS=... if running
#
# Environment:
#   OUTBOXD_KAFKA_VERSION        Apache Kafka version (default 4.1.1; 4.x only)
#   OUTBOXD_KAFKA_HOME           jar cache root (default ~/.cache/outboxd/kafka);
#                                jars go to $OUTBOXD_KAFKA_HOME/<version>/lib
#   OUTBOXD_KAFKA_DATA           default --data (default ~/.local/state/outboxd/kafka)
#   OUTBOXD_KAFKA_START_TIMEOUT  seconds to wait for the broker (default 90)
#   OUTBOXD_KAFKA_STOP_TIMEOUT   seconds to wait for a clean exit (default 30)
#   KAFKA_HEAP_OPTS              default "-Xms128m -Xmx512m"
#   KAFKA_JVM_OPTS               extra JVM options (default: serial GC, for a fast start)
#   JAVA, JAVA_HOME              the java to use (else java on PATH)
#   MVN                          the mvn to use (else mvn on PATH); MVN_ARGS: extra args
#
# Data dir layout: server.properties, log4j2.xml, kafka.pid, data/ (log.dirs,
# formatted once, so a restart keeps the topics and messages), logs/server.log
# (the broker's log; the previous run's is logs/server.log.1), logs/kafka.out.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
KAFKA_VERSION=${OUTBOXD_KAFKA_VERSION:-4.1.1}
CACHE_ROOT=${OUTBOXD_KAFKA_HOME:-$HOME/.cache/outboxd/kafka}
LIB=$CACHE_ROOT/$KAFKA_VERSION/lib
DEFAULT_DATA=${OUTBOXD_KAFKA_DATA:-${XDG_STATE_HOME:-$HOME/.local/state}/outboxd/kafka}
START_TIMEOUT=${OUTBOXD_KAFKA_START_TIMEOUT:-90}
STOP_TIMEOUT=${OUTBOXD_KAFKA_STOP_TIMEOUT:-30}

die() { echo "kafka.sh: $*" >&2; exit 1; }
say() { echo "kafka.sh: $*" >&2; }   # progress goes to stderr; stdout is for the result

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//' >&2
  exit "${1:-2}"
}

# --- prerequisites ---------------------------------------------------------------

find_java() {
  local java
  if [ -n "${JAVA:-}" ]; then
    java=$JAVA
    command -v "$java" >/dev/null 2>&1 || die "JAVA=$JAVA is not an executable: point JAVA at a Java 17+ 'java', or unset it"
  elif [ -n "${JAVA_HOME:-}" ]; then
    java=$JAVA_HOME/bin/java
    [ -x "$java" ] || die "JAVA_HOME=$JAVA_HOME has no bin/java: point JAVA_HOME at a JRE/JDK 17+, or unset it"
  elif command -v java >/dev/null 2>&1; then
    java=java
  else
    die "java not found: install a JRE 17+ (e.g. apt-get install openjdk-17-jre-headless), or set JAVA_HOME / JAVA"
  fi
  local line major
  line=$("$java" -version 2>&1 | grep -m1 -i 'version' || true)
  major=$(sed -E 's/.*version "([0-9]+)(\.([0-9]+))?.*/\1 \3/' <<<"$line")
  # "1.8.0_x" style: the major is the second number
  if [ "${major%% *}" = 1 ]; then major=${major#* }; else major=${major%% *}; fi
  case $major in
    ''|*[!0-9]*) die "cannot tell the version of '$java' (it said: ${line:-nothing}); Apache Kafka $KAFKA_VERSION needs Java 17+" ;;
  esac
  [ "$major" -ge 17 ] || die "$java is Java $major; Apache Kafka $KAFKA_VERSION needs Java 17+: install openjdk-17-jre-headless (or newer) and set JAVA_HOME"
  JAVA_BIN=$java
}

have_jars() { [ -f "$LIB/.complete" ]; }

fetch() {
  if have_jars; then
    return 0
  fi
  local mvn=${MVN:-mvn}
  command -v "$mvn" >/dev/null 2>&1 \
    || die "mvn not found (needed once to fetch the Apache Kafka jars from Maven Central): install Maven (e.g. apt-get install maven), or set MVN; or copy the jars of kafka_2.13:$KAFKA_VERSION and a log4j2 backend into $LIB and touch $LIB/.complete"
  find_java   # mvn needs a java too; say so clearly
  mkdir -p "$CACHE_ROOT/$KAFKA_VERSION"
  # One fetch at a time per version (concurrent CI jobs / test sessions).
  if command -v flock >/dev/null 2>&1; then
    exec 9>"$CACHE_ROOT/$KAFKA_VERSION/.fetch.lock"
    flock 9
    if have_jars; then exec 9>&-; return 0; fi
  fi
  local tmp=$CACHE_ROOT/$KAFKA_VERSION/lib.tmp.$$
  rm -rf "$tmp"
  say "fetching Apache Kafka $KAFKA_VERSION jars from Maven Central into $LIB"
  # (sed: Debian's Maven 3.8 prints bare colour resets even with -B -q)
  # shellcheck disable=SC2086
  if ! "$mvn" -q -B -Dstyle.color=never -f "$HERE/pom.xml" -Dkafka.version="$KAFKA_VERSION" ${MVN_ARGS:-} \
        dependency:copy-dependencies -DoutputDirectory="$tmp" 2>&1 | sed 's/\x1b\[[0-9;]*m//g' >&2; then
    rm -rf "$tmp"
    die "mvn could not fetch org.apache.kafka:kafka_2.13:$KAFKA_VERSION (is Maven Central reachable? a proxy goes in ~/.m2/settings.xml)"
  fi
  ls "$tmp"/kafka_2.13-"$KAFKA_VERSION".jar >/dev/null 2>&1 || { rm -rf "$tmp"; die "mvn ran but $tmp has no kafka_2.13-$KAFKA_VERSION.jar"; }
  touch "$tmp/.complete"
  rm -rf "$LIB"
  mv "$tmp" "$LIB"
  if command -v flock >/dev/null 2>&1; then exec 9>&-; fi
}

# --- helpers -----------------------------------------------------------------------

free_port() {
  if command -v python3 >/dev/null 2>&1; then
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
    return
  fi
  local p i
  for i in $(seq 1 200); do
    p=$(( 20000 + RANDOM % 30000 ))
    if ! port_open "$p"; then echo "$p"; return; fi
  done
  die "found no free loopback port"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# A pid that is alive and is our broker (not a recycled pid).
broker_pid() {
  local pidfile=$DATA/kafka.pid pid
  [ -f "$pidfile" ] || return 1
  pid=$(cat "$pidfile" 2>/dev/null) || return 1
  case $pid in ''|*[!0-9]*) return 1 ;; esac
  kill -0 "$pid" 2>/dev/null || return 1
  if [ -r "/proc/$pid/cmdline" ]; then
    grep -qa 'kafka\.Kafka' "/proc/$pid/cmdline" || return 1
  fi
  echo "$pid"
}

prop() {  # prop FILE KEY -> value
  [ -f "$1" ] || return 0
  sed -n "s/^$2=//p" "$1" | tail -1
}

log_tail() {
  local f
  for f in "$DATA/logs/server.log" "$DATA/logs/kafka.out"; do
    if [ -s "$f" ]; then
      echo "---- last lines of $f ----" >&2
      tail -n 30 "$f" >&2
    fi
  done
}

jvm_args() {  # the java command line up to the main class, in JVM_ARGS
  # shellcheck disable=SC2206
  JVM_ARGS=("$JAVA_BIN" ${KAFKA_HEAP_OPTS:--Xms128m -Xmx512m}
    ${KAFKA_JVM_OPTS:--XX:+UseSerialGC -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true}
    -Dlog4j2.configurationFile="$DATA/log4j2.xml" -Dkafka.logs.dir="$DATA/logs"
    -cp "$LIB/*")
}

write_config() {
  mkdir -p "$DATA/data" "$DATA/logs"
  cat >"$DATA/server.properties" <<EOF
# written by ops/kafka/kafka.sh on every start; edits are overwritten
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$CPORT
listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CPORT
advertised.listeners=PLAINTEXT://127.0.0.1:$PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$DATA/data

num.partitions=1
default.replication.factor=1
min.insync.replicas=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0

# small and quick: a dev/test broker
log.segment.bytes=16777216
log.cleaner.dedupe.buffer.size=8388608
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
background.threads=4
EOF
  cat >"$DATA/log4j2.xml" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="warn">
  <Appenders>
    <File name="file" fileName="$DATA/logs/server.log" append="true">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </File>
  </Appenders>
  <Loggers>
    <Logger name="kafka.request.logger" level="warn"/>
    <Logger name="org.apache.kafka.controller" level="info"/>
    <Logger name="state.change.logger" level="warn"/>
    <Root level="info"><AppenderRef ref="file"/></Root>
  </Loggers>
</Configuration>
EOF
}

formatted() { [ -f "$DATA/data/meta.properties" ]; }

format_storage() {
  local cid
  cid=$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')
  case $cid in -*) cid=A${cid#-} ;; esac   # Kafka never hands out ids that start with '-'
  jvm_args
  if ! "${JVM_ARGS[@]}" kafka.tools.StorageTool format --cluster-id "$cid" --config "$DATA/server.properties" \
        --ignore-formatted >>"$DATA/logs/format.out" 2>&1; then
    tail -n 40 "$DATA/logs/format.out" >&2 || true
    die "formatting the storage in $DATA/data failed (output above; full text in $DATA/logs/format.out)"
  fi
}

# --- commands ------------------------------------------------------------------------

parse_opts() {
  DATA=$DEFAULT_DATA
  PORT=
  while [ $# -gt 0 ]; do
    case $1 in
      --data) [ $# -ge 2 ] || die "--data needs a directory"; DATA=$2; shift 2 ;;
      --data=*) DATA=${1#--data=}; shift ;;
      --port) [ $# -ge 2 ] || die "--port needs a number"; PORT=$2; shift 2 ;;
      --port=*) PORT=${1#--port=}; shift ;;
      -h|--help) usage 0 ;;
      *) die "unknown option: $1 (see: kafka.sh --help)" ;;
    esac
  done
  case $PORT in *[!0-9]*) die "--port must be a number, not '$PORT'" ;; esac
  mkdir -p "$DATA"
  DATA=$(cd "$DATA" && pwd)
}

start() {
  parse_opts "$@"
  local pid
  if pid=$(broker_pid); then
    local running_port
    running_port=$(prop "$DATA/server.properties" advertised.listeners | sed 's/.*://')
    if [ -n "$PORT" ] && [ "$PORT" != "$running_port" ]; then
      die "a broker (pid $pid) already runs on $DATA with port $running_port, not $PORT: stop it first (kafka.sh stop --data $DATA)"
    fi
    say "already running (pid $pid)"
    echo "KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:$running_port"
    return 0
  fi
  rm -f "$DATA/kafka.pid"
  find_java
  fetch

  # Same ports as last time on this data dir when nothing else says otherwise.
  local old=$DATA/server.properties
  if [ -z "$PORT" ]; then
    PORT=$(prop "$old" advertised.listeners | sed -n 's/.*127\.0\.0\.1:\([0-9]*\)$/\1/p')
    if [ -z "$PORT" ] || port_open "$PORT"; then PORT=$(free_port); fi
  elif port_open "$PORT"; then
    die "port $PORT on 127.0.0.1 is already in use: pick another --port, or leave it out for a free one"
  fi
  CPORT=$(prop "$old" controller.quorum.voters | sed -n 's/.*:\([0-9]*\)$/\1/p')
  if [ -z "$CPORT" ] || [ "$CPORT" = "$PORT" ] || port_open "$CPORT"; then
    CPORT=$(free_port)
    while [ "$CPORT" = "$PORT" ]; do CPORT=$(free_port); done
  fi

  write_config
  formatted || format_storage

  [ -f "$DATA/logs/server.log" ] && mv -f "$DATA/logs/server.log" "$DATA/logs/server.log.1"
  : >"$DATA/logs/server.log"
  local t0=$SECONDS
  # The broker writes its own pid (bash execs java), so the pid file names the
  # JVM itself; its stdio goes to files, so no caller's pipe stays open.
  jvm_args
  rm -f "$DATA/kafka.pid"
  nohup bash -c 'echo $$ >"$0"; exec "$@"' "$DATA/kafka.pid" \
    "${JVM_ARGS[@]}" kafka.Kafka "$DATA/server.properties" \
    </dev/null >"$DATA/logs/kafka.out" 2>&1 &
  pid=$!

  # Ready = the port takes connections and the broker logged that it started
  # (KafkaRaftServer logs "Kafka Server started" once the broker is unfenced
  # and serves metadata).
  local deadline=$(( SECONDS + START_TIMEOUT ))
  while :; do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$DATA/kafka.pid"
      log_tail
      die "the broker exited while starting (logs in $DATA/logs)"
    fi
    if grep -q 'Kafka Server started' "$DATA/logs/server.log" 2>/dev/null && port_open "$PORT"; then
      break
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      log_tail
      kill -TERM "$pid" 2>/dev/null || true
      die "the broker was not ready after ${START_TIMEOUT}s (pid $pid, sent SIGTERM; logs in $DATA/logs; OUTBOXD_KAFKA_START_TIMEOUT raises the limit)"
    fi
    sleep 0.2
  done
  say "Apache Kafka $KAFKA_VERSION ready in $(( SECONDS - t0 ))s (pid $pid, data $DATA, log $DATA/logs/server.log)"
  echo "KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:$PORT"
}

stop() {
  parse_opts "$@"
  local pid
  if ! pid=$(broker_pid); then
    rm -f "$DATA/kafka.pid"
    say "not running ($DATA)"
    return 0
  fi
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$(( SECONDS + STOP_TIMEOUT ))
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      say "pid $pid still running after ${STOP_TIMEOUT}s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.5
      break
    fi
    sleep 0.2
  done
  rm -f "$DATA/kafka.pid"
  say "stopped (pid $pid)"
}

status() {
  parse_opts "$@"
  local pid
  if pid=$(broker_pid); then
    say "running (pid $pid, data $DATA)"
    echo "KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:$(prop "$DATA/server.properties" advertised.listeners | sed 's/.*://')"
  else
    say "not running ($DATA)"
    return 3
  fi
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case $cmd in
  fetch)
    [ $# -eq 0 ] || die "fetch takes no options"
    if have_jars; then say "jars already in $LIB"; else fetch; say "jars in $LIB"; fi
    ;;
  start) start "$@" ;;
  stop) stop "$@" ;;
  status) status "$@" ;;
  -h|--help|help) usage 0 ;;
  '') usage 2 ;;
  *) say "unknown command: $cmd"; usage 2 ;;
esac
