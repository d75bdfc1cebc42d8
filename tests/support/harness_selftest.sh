#!/usr/bin/env bash
# Self-test of the S3 test harness (s3rver_harness.sh) and the fault proxy (fault_proxy.js):
# starts s3rver, uploads keys with spaces and plus signs, lists and pages, reads through the proxy
# with every fault mode armed, checks that the EXIT-trap cleanup chain stops everything, and
# checks that nothing is left running. Prints one line per check; exits non-zero on the first
# failure.
# The harness's fault_* functions take an optional proxy argument; calling them without is meant.
# shellcheck disable=SC2119
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tests/support/s3rver_harness.sh
source "$HERE/s3rver_harness.sh"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/imgfs-harness-selftest.XXXXXX")"
s3_add_cleanup "rm -rf '$WORK'"

pass() { echo "ok: $*"; }
die() {
  echo "FAIL: $*" >&2
  exit 1
}

BUCKET=imgfs-selftest
KEY="dir one/disk image+1.part.0"

s3_start "$WORK/data" "$BUCKET" other-bucket
pass "s3rver up at $S3_ENDPOINT (pid $S3_PID)"
SERVER_ENDPOINT="$S3_ENDPOINT"
SERVER_PID="$S3_PID"

# 1 MB of distinct text, so that a wrong range cannot compare equal.
seq 1 200000 >"$WORK/object"
truncate -s 1000000 "$WORK/object"
s3_put "$BUCKET" "$KEY" "$WORK/object"
curl -sS --fail -o "$WORK/fetched" "$(s3_url "$BUCKET" "$KEY")"
cmp -s "$WORK/object" "$WORK/fetched" || die "object read back differs"
pass "PUT and GET of '$KEY'"

curl -sS --fail -o "$WORK/head" -I "$(s3_url "$BUCKET" "$KEY")"
grep -qi '^content-length: 1000000' "$WORK/head" || die "HEAD size wrong"
pass "HEAD gives the size"

curl -sS --fail -o "$WORK/list.xml" "$S3_ENDPOINT/$BUCKET?list-type=2&prefix=dir%20one%2F"
grep -q "<Key>$KEY</Key>" "$WORK/list.xml" || die "listing lacks '$KEY': $(cat "$WORK/list.xml")"
pass "ListObjectsV2 shows the key with its space and plus"

mkdir -p "$WORK/tree/sub dir"
for i in 1 2 3 4 5; do
  printf 'file %s\n' "$i" >"$WORK/tree/sub dir/f+$i.txt"
done
printf 'top\n' >"$WORK/tree/top.txt"
s3_put_tree "$BUCKET" "$WORK/tree" "pre fix"
curl -sS --fail -o "$WORK/tree.xml" "$S3_ENDPOINT/$BUCKET?list-type=2&prefix=pre%20fix%2F"
[[ "$(grep -o '<Key>' "$WORK/tree.xml" | wc -l)" -eq 6 ]] ||
  die "tree listing: $(cat "$WORK/tree.xml")"
grep -q '<Key>pre fix/sub dir/f+3.txt</Key>' "$WORK/tree.xml" || die "tree key missing"
curl -sS --fail "$(s3_url "$BUCKET" "pre fix/sub dir/f+3.txt")" | grep -qx 'file 3' ||
  die "tree object content"
pass "s3_put_tree uploaded 6 files under 'pre fix/'"

# Paging needs the continuation token, which needs --openssl-legacy-provider (TESTING.md).
token=""
pages=0
keys=0
while :; do
  url="$S3_ENDPOINT/$BUCKET?list-type=2&max-keys=2&prefix=pre%20fix%2F"
  [[ -z "$token" ]] || url+="&continuation-token=$(_s3h_encode_segment "$token")"
  curl -sS --fail -o "$WORK/page.xml" "$url" || die "listing page $pages failed"
  pages=$((pages + 1))
  keys=$((keys + $(grep -o '<Key>' "$WORK/page.xml" | wc -l)))
  token="$(grep -o '<NextContinuationToken>[^<]*' "$WORK/page.xml" | sed 's/.*>//' || true)"
  [[ -n "$token" ]] || break
done
[[ "$pages" -eq 3 && "$keys" -eq 6 ]] || die "paging gave $pages pages, $keys keys"
pass "ListObjectsV2 paging with continuation tokens (3 pages of 2)"

fault_start "$S3_ENDPOINT"
pass "fault proxy up at $FAULT_ENDPOINT (pid $FAULT_PID)"
PROXY_PID="$FAULT_PID"
PROXIED="$FAULT_ENDPOINT/$BUCKET/$(_s3h_encode_key "$KEY")"
dd if="$WORK/object" of="$WORK/range.expected" bs=1000 skip=100 count=1 status=none

curl -sS --fail -r 100000-100999 -o "$WORK/range" "$PROXIED"
cmp -s "$WORK/range" "$WORK/range.expected" || die "unarmed proxy changed the bytes"
pass "unarmed proxy passes a range GET through"

fault_arm 503 2 "image+1.part.0"
curl --no-progress-meter --fail --retry 3 --retry-all-errors --retry-delay 0 -r 100000-100999 \
  -o "$WORK/range" "$PROXIED" 2>"$WORK/curl.err"
cmp -s "$WORK/range" "$WORK/range.expected" || die "range after 503 retries differs"
[[ "$(grep -c 'Will retry' "$WORK/curl.err")" -eq 2 ]] ||
  die "expected 2 retries: $(cat "$WORK/curl.err")"
stats="$(fault_stats)"
[[ "$stats" == *'"503":2'* ]] || die "stats: $stats"
pass "503 SlowDown x2, curl --retry-all-errors retried twice and got the right range"

fault_arm 503 1 ""
status=0
curl -sS --fail -o "$WORK/body" "$PROXIED" 2>/dev/null || status=$?
[[ "$status" -eq 22 ]] || die "503 without retry: curl exit $status"
curl -sS -o "$WORK/body" -w '%{http_code}' "$PROXIED" >"$WORK/code"
cmp -s "$WORK/body" "$WORK/object" || die "503 rule fired more than once"
pass "a 503 without retries fails (curl exit 22); the rule then expires"

fault_arm 500 1 "part.0"
status=0
code="$(curl -sS -o "$WORK/body" -w '%{http_code}' "$PROXIED")" || status=$?
[[ "$status" -eq 0 && "$code" == 500 ]] || die "500 mode gave $code / $status"
grep -q '<Code>InternalError</Code>' "$WORK/body" || die "500 body: $(cat "$WORK/body")"
pass "500 InternalError with an S3 XML body"

fault_arm short 1 "part.0"
status=0
curl -sS --fail -o "$WORK/body" "$PROXIED" 2>/dev/null || status=$?
[[ "$status" -ne 0 ]] || die "short body was not detected"
[[ "$(stat -c %s "$WORK/body")" -eq 500000 ]] || die "short gave $(stat -c %s "$WORK/body") bytes"
pass "short: curl fails (exit $status) after 500000 of 1000000 bytes"

fault_arm reset 1 "part.0"
status=0
curl -sS --fail -o "$WORK/body" "$PROXIED" 2>/dev/null || status=$?
[[ "$status" -ne 0 ]] || die "reset was not detected"
pass "reset: curl fails (exit $status)"

fault_arm delay=400 1 "part.0"
start_ns="$(date +%s%N)"
curl -sS --fail -r 100000-100999 -o "$WORK/range" "$PROXIED"
elapsed_ms=$((($(date +%s%N) - start_ns) / 1000000))
cmp -s "$WORK/range" "$WORK/range.expected" || die "delayed range differs"
[[ "$elapsed_ms" -ge 400 ]] || die "delay took only $elapsed_ms ms"
pass "delay=400: right bytes after $elapsed_ms ms"

fault_arm down -1 ""
for attempt in 1 2 3; do
  status=0
  curl -sS --fail -o /dev/null "$PROXIED" 2>/dev/null || status=$?
  [[ "$status" -ne 0 ]] || die "down: request $attempt got through"
done
fault_clear
curl -sS --fail -o "$WORK/body" "$PROXIED"
cmp -s "$WORK/body" "$WORK/object" || die "after clear the object differs"
pass "down: 3 requests refused (last curl exit $status); after clear the object reads again"

fault_stats >"$WORK/stats.json"
node -e '
  const s = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
  const want = { "503": 3, "500": 1, reset: 1, short: 1, delay: 1, down: 3 };
  for (const [mode, n] of Object.entries(want)) {
    if (s.faults[mode] !== n) { console.error(mode, s.faults[mode], "!=", n); process.exit(1); }
  }
  if (s.armed.length !== 0) process.exit(1);
' "$WORK/stats.json" || die "stats: $(cat "$WORK/stats.json")"
pass "stats count every injected fault: $(tr -d '\n' <"$WORK/stats.json")"

fault_stop
s3_stop
s3_stop
kill -0 "$SERVER_PID" 2>/dev/null && die "s3rver $SERVER_PID still running"
kill -0 "$PROXY_PID" 2>/dev/null && die "fault proxy $PROXY_PID still running"
curl -s -o /dev/null --max-time 2 "$SERVER_ENDPOINT/" && die "s3rver still answers"
pass "s3_stop and fault_stop stop both (s3_stop twice is harmless)"

# A script that exits without stopping anything, with its own EXIT trap set before sourcing.
bash -c '
  set -euo pipefail
  trap "echo previous-exit-trap-ran" EXIT
  source "$1"
  s3_start "$2/data2" b
  fault_start "$S3_ENDPOINT"
  echo "pids $S3_PID $FAULT_PID"
  exit 3
' _ "$HERE/s3rver_harness.sh" "$WORK" >"$WORK/child.out" 2>&1 && die "child exit status lost"
grep -q previous-exit-trap-ran "$WORK/child.out" || die "previous EXIT trap not chained"
read -r _ child_s3 child_proxy < <(grep '^pids ' "$WORK/child.out")
sleep 0.2
for pid in "$child_s3" "$child_proxy"; do
  kill -0 "$pid" 2>/dev/null && die "child left pid $pid running"
done
pass "EXIT trap stopped the child's s3rver ($child_s3) and proxy ($child_proxy)," \
  "ran the child's own EXIT trap and kept its exit status 3"

LEFT_PATTERN="$WORK|fault_proxy.js --target $SERVER_ENDPOINT"
if pgrep -f "$LEFT_PATTERN" >/dev/null; then
  die "processes left behind: $(pgrep -af "$LEFT_PATTERN")"
fi
pass "pgrep finds nothing left behind"
echo "harness self-test passed"
