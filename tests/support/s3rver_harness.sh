# shellcheck shell=bash
# S3 test harness: starts s3rver 3.7.1 (pinned in the repo's package-lock.json) and our fault
# proxy (fault_proxy.js) on 127.0.0.1, uploads fixtures through the S3 API, and stops what it
# started when the test ends (TESTING.md "The S3 server for tests", "Injecting faults").
#
# Source it from a bash test:   source "$REPO/tests/support/s3rver_harness.sh"
#
#   s3_start DATA_DIR BUCKET [BUCKET...]   start s3rver with those buckets; exports S3_ENDPOINT
#                                          (http://127.0.0.1:PORT), S3_PORT, S3_PID, S3_LOG
#   s3_stop                                stop it (safe to call twice, and when never started)
#   s3_put BUCKET KEY FILE                 upload FILE as KEY (any bytes; encoded per segment)
#   s3_put_tree BUCKET DIR [PREFIX]        upload every file under DIR, key = PREFIX/relative path
#   s3_url BUCKET [KEY]                    print the path-style URL of a bucket or object
#   fault_start TARGET [CERT KEY]          start a fault proxy in front of TARGET (an endpoint URL),
#                                          speaking HTTPS with CERT/KEY when given;
#                                          exports FAULT_ENDPOINT, FAULT_PORT, FAULT_PID for the
#                                          newest one; several may run (e.g. two for failover)
#   fault_arm MODE COUNT MATCH [PROXY]     arm a rule (MODE: 503, 500, reset, short, delay=MS, down;
#                                          COUNT -1 = until cleared; MATCH "" = every request)
#   fault_clear [PROXY]                    disarm every rule
#   fault_stats [PROXY]                    print the proxy's JSON counters
#   fault_stop [PID]                       stop one proxy, or every proxy started
#   s3_add_cleanup COMMAND                 run COMMAND (a string, eval'd) when the shell exits
#   s3_run_cleanups                        run the registered cleanups now, newest first
# PROXY defaults to $FAULT_ENDPOINT.
#
# Exit handling: the first s3_add_cleanup installs an EXIT trap that runs the cleanups newest
# first and then whatever EXIT trap was set before it. A caller that sets its own EXIT trap
# afterwards must call s3_run_cleanups from it (or register its work with s3_add_cleanup
# instead). SIGINT and SIGTERM are turned into an exit (so the EXIT trap runs) unless the caller
# already trapped them. Everything binds to 127.0.0.1 only.

S3H_REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
S3H_PROXY_JS="$S3H_REPO_ROOT/tests/support/fault_proxy.js"

declare -a _s3h_cleanups=()
declare -a _s3h_fault_pids=()
_s3h_trap_installed=0
_s3h_previous_exit_trap=""

_s3h_die() {
  echo "s3rver_harness: $*" >&2
  return 1
}

s3_run_cleanups() {
  local i
  for ((i = ${#_s3h_cleanups[@]} - 1; i >= 0; i--)); do
    eval "${_s3h_cleanups[i]}" || true
  done
  _s3h_cleanups=()
}

_s3h_on_exit() {
  local status=$?
  s3_run_cleanups
  if [[ -n "$_s3h_previous_exit_trap" ]]; then
    eval "$_s3h_previous_exit_trap"
  fi
  return "$status"
}

s3_add_cleanup() {
  local registered
  for registered in "${_s3h_cleanups[@]}"; do
    [[ "$registered" != "$1" ]] || return 0
  done
  _s3h_cleanups+=("$1")
  if ((_s3h_trap_installed)); then
    return 0
  fi
  # `trap -p EXIT` prints "trap -- 'COMMAND' EXIT" with COMMAND quoted for reuse.
  local previous
  previous="$(trap -p EXIT)"
  if [[ -n "$previous" ]]; then
    eval "set -- $previous"
    _s3h_previous_exit_trap="$3"
  fi
  trap _s3h_on_exit EXIT
  [[ -n "$(trap -p INT)" ]] || trap 'exit 130' INT
  [[ -n "$(trap -p TERM)" ]] || trap 'exit 143' TERM
  _s3h_trap_installed=1
}

# Percent-encodes one path segment into variable $1: everything but RFC 3986 unreserved bytes.
# Writes a variable rather than printing, so uploads of thousands of keys fork nothing per key.
# Locals carry the _s3h_ prefix so that they never shadow the caller's variable named by $1.
_s3h_encode_segment_to() {
  local -n _s3h_seg_out="$1"
  local LC_ALL=C
  local _s3h_text="$2" _s3h_acc="" _s3h_c _s3h_i _s3h_code
  for ((_s3h_i = 0; _s3h_i < ${#_s3h_text}; _s3h_i++)); do
    _s3h_c="${_s3h_text:_s3h_i:1}"
    case "$_s3h_c" in
      [A-Za-z0-9._~-]) _s3h_acc+="$_s3h_c" ;;
      *)
        printf -v _s3h_code '%d' "'$_s3h_c"
        ((_s3h_code < 0)) && _s3h_code=$((_s3h_code + 256))
        printf -v _s3h_c '%%%02X' "$_s3h_code"
        _s3h_acc+="$_s3h_c"
        ;;
    esac
  done
  _s3h_seg_out="$_s3h_acc"
}

# Encodes a key segment by segment into variable $1, so its '/' stay separators.
_s3h_encode_key_to() {
  local -n _s3h_key_out="$1"
  local _s3h_rest="$2" _s3h_done="" _s3h_piece
  while [[ "$_s3h_rest" == */* ]]; do
    _s3h_encode_segment_to _s3h_piece "${_s3h_rest%%/*}"
    _s3h_done+="$_s3h_piece/"
    _s3h_rest="${_s3h_rest#*/}"
  done
  _s3h_encode_segment_to _s3h_piece "$_s3h_rest"
  _s3h_key_out="$_s3h_done$_s3h_piece"
}

_s3h_encode_segment() {
  local encoded
  _s3h_encode_segment_to encoded "$1"
  printf '%s' "$encoded"
}

_s3h_encode_key() {
  local encoded
  _s3h_encode_key_to encoded "$1"
  printf '%s' "$encoded"
}

# The path-style URL of BUCKET or BUCKET/KEY into variable $1.
_s3h_url_to() {
  local -n _s3h_url_out="$1"
  local _s3h_bucket _s3h_key
  _s3h_encode_segment_to _s3h_bucket "$2"
  if (($# > 2)); then
    _s3h_encode_key_to _s3h_key "$3"
    _s3h_url_out="$S3_ENDPOINT/$_s3h_bucket/$_s3h_key"
  else
    _s3h_url_out="$S3_ENDPOINT/$_s3h_bucket"
  fi
}

s3_url() {
  [[ -n "${S3_ENDPOINT:-}" ]] || _s3h_die "s3_url: s3rver is not running" || return
  local url
  _s3h_url_to url "$@"
  printf '%s\n' "$url"
}

_s3h_ensure_node_modules() {
  [[ -x "$S3H_REPO_ROOT/node_modules/.bin/s3rver" ]] && return 0
  echo "s3rver_harness: node_modules missing; running npm ci in $S3H_REPO_ROOT" >&2
  (cd "$S3H_REPO_ROOT" && npm ci --no-audit --no-fund >&2) ||
    _s3h_die "npm ci failed in $S3H_REPO_ROOT"
}

# Waits (up to SECONDS) for the first line of FILE to be a number written by process PID.
_s3h_wait_for_line() {
  local file="$1" pid="$2" seconds="$3" pattern="$4" tries line
  for ((tries = 0; tries < seconds * 20; tries++)); do
    line="$(grep -m1 -oE "$pattern" "$file" 2>/dev/null || true)"
    if [[ -n "$line" ]]; then
      printf '%s' "$line"
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || return 1
    sleep 0.05
  done
  return 1
}

# Stops PID: TERM, then KILL after 5 s; reaps it when it is our child.
_s3h_stop_pid() {
  local pid="$1" tries
  kill -0 "$pid" 2>/dev/null || {
    wait "$pid" 2>/dev/null || true
    return 0
  }
  kill -TERM "$pid" 2>/dev/null || true
  for ((tries = 0; tries < 100; tries++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.05
  done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
  wait "$pid" 2>/dev/null || true
}

s3_start() {
  (($# >= 2)) || _s3h_die "usage: s3_start DATA_DIR BUCKET [BUCKET...]" || return
  if [[ -n "${S3_PID:-}" ]] && kill -0 "$S3_PID" 2>/dev/null; then
    _s3h_die "s3_start: s3rver is already running (pid $S3_PID)"
    return
  fi
  local dir="$1"
  shift
  _s3h_ensure_node_modules || return
  mkdir -p "$dir" || return
  dir="$(cd "$dir" && pwd)"
  local args=(-d "$dir" -a 127.0.0.1 -p 0) bucket
  for bucket in "$@"; do
    args+=(--configure-bucket "$bucket")
  done
  export S3_LOG="${dir%/}.s3rver.log"
  # Port 0: s3rver binds a free port itself and prints it, so no other process can take the
  # port between choosing and binding it.
  node --openssl-legacy-provider "$S3H_REPO_ROOT/node_modules/.bin/s3rver" "${args[@]}" \
    >"$S3_LOG" 2>&1 </dev/null &
  export S3_PID=$!
  s3_add_cleanup s3_stop
  local port
  if ! port="$(_s3h_wait_for_line "$S3_LOG" "$S3_PID" 10 'listening on 127\.0\.0\.1:[0-9]+')"; then
    _s3h_die "s3rver did not start; log $S3_LOG:"
    tail -n 20 "$S3_LOG" >&2
    s3_stop
    return 1
  fi
  export S3_PORT="${port##*:}"
  export S3_ENDPOINT="http://127.0.0.1:$S3_PORT"
  local tries
  for ((tries = 0; tries < 200; tries++)); do
    if curl -s -o /dev/null --max-time 1 "$S3_ENDPOINT/"; then
      return 0
    fi
    sleep 0.05
  done
  _s3h_die "s3rver at $S3_ENDPOINT did not answer within 10 s"
  s3_stop
  return 1
}

s3_stop() {
  if [[ -n "${S3_PID:-}" ]]; then
    _s3h_stop_pid "$S3_PID"
  fi
  unset S3_PID S3_PORT S3_ENDPOINT
}

s3_put() {
  (($# == 3)) || _s3h_die "usage: s3_put BUCKET KEY FILE" || return
  [[ -f "$3" ]] || _s3h_die "s3_put: no file $3" || return
  local url
  url="$(s3_url "$1" "$2")" || return
  curl -sS --fail --max-time 300 -H 'Content-Type: application/octet-stream' \
    -T "$3" "$url" -o /dev/null || _s3h_die "s3_put: PUT $url failed"
}

s3_put_tree() {
  (($# == 2 || $# == 3)) || _s3h_die "usage: s3_put_tree BUCKET DIR [PREFIX]" || return
  local bucket="$1" dir="${2%/}" prefix="${3:-}" file key
  [[ -d "$dir" ]] || _s3h_die "s3_put_tree: no directory $dir" || return
  [[ -z "$prefix" || "$prefix" == */ ]] || prefix+="/"
  # One curl per 100 files, 8 transfers at a time over reused connections: thousand-key
  # fixtures (listing pages) upload in seconds rather than a minute of curl start-ups.
  [[ -n "${S3_ENDPOINT:-}" ]] || _s3h_die "s3_put_tree: s3rver is not running" || return
  local -a batch=()
  local url
  while IFS= read -r -d '' file; do
    key="$prefix${file#"$dir"/}"
    _s3h_url_to url "$bucket" "$key"
    batch+=(-T "$file" "$url")
    if ((${#batch[@]} >= 300)); then
      _s3h_put_batch "${batch[@]}" || return
      batch=()
    fi
  done < <(find "$dir" -type f -print0 | sort -z)
  if ((${#batch[@]} > 0)); then
    _s3h_put_batch "${batch[@]}" || return
  fi
}

_s3h_put_batch() {
  curl -sS --no-progress-meter --fail --fail-early --parallel --parallel-max 8 --max-time 600 \
    -H 'Content-Type: application/octet-stream' -o /dev/null "$@" ||
    _s3h_die "s3_put_tree: an upload failed"
}

fault_start() {
  (($# == 1 || $# == 3)) || _s3h_die "usage: fault_start TARGET_ENDPOINT [TLS_CERT TLS_KEY]" || return
  local log scheme=http
  local tls=()
  if (($# == 3)); then
    tls=(--tls-cert "$2" --tls-key "$3")
    scheme=https
  fi
  log="$(mktemp "${TMPDIR:-/tmp}/fault_proxy.XXXXXX")" || return
  node "$S3H_PROXY_JS" --target "$1" "${tls[@]}" >"$log" 2>&1 </dev/null &
  local pid=$!
  _s3h_fault_pids+=("$pid")
  s3_add_cleanup "_s3h_stop_pid $pid; rm -f '$log'"
  local port
  if ! port="$(_s3h_wait_for_line "$log" "$pid" 10 '^[0-9]+$')"; then
    _s3h_die "fault_proxy did not start:"
    cat "$log" >&2
    _s3h_stop_pid "$pid"
    return 1
  fi
  export FAULT_PID="$pid" FAULT_PORT="$port" FAULT_ENDPOINT="$scheme://127.0.0.1:$port"
}

fault_stop() {
  local pid
  if (($# == 1)); then
    _s3h_stop_pid "$1"
    [[ "${FAULT_PID:-}" != "$1" ]] || unset FAULT_PID FAULT_PORT FAULT_ENDPOINT
    return 0
  fi
  for pid in "${_s3h_fault_pids[@]}"; do
    _s3h_stop_pid "$pid"
  done
  _s3h_fault_pids=()
  unset FAULT_PID FAULT_PORT FAULT_ENDPOINT
}

fault_arm() {
  (($# == 3 || $# == 4)) || _s3h_die "usage: fault_arm MODE COUNT MATCH [PROXY]" || return
  local mode="$1" ms="" proxy="${4:-${FAULT_ENDPOINT:-}}"
  [[ -n "$proxy" ]] || _s3h_die "fault_arm: no fault proxy running" || return
  if [[ "$mode" == delay=* ]]; then
    ms="${mode#delay=}"
    mode=delay
  fi
  curl -sS --fail --max-time 5 -o /dev/null -X POST -G "$proxy/__fault" \
    --data-urlencode "mode=$mode" --data-urlencode "count=$2" --data-urlencode "match=$3" \
    ${ms:+--data-urlencode "ms=$ms"} || _s3h_die "fault_arm: proxy $proxy refused $mode"
}

fault_clear() {
  local proxy="${1:-${FAULT_ENDPOINT:-}}"
  [[ -n "$proxy" ]] || _s3h_die "fault_clear: no fault proxy running" || return
  curl -sS --fail --max-time 5 -o /dev/null -X POST "$proxy/__fault/clear"
}

fault_stats() {
  local proxy="${1:-${FAULT_ENDPOINT:-}}"
  [[ -n "$proxy" ]] || _s3h_die "fault_stats: no fault proxy running" || return
  curl -sS --fail --max-time 5 "$proxy/__fault/stats"
}
